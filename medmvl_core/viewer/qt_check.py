"""Say which system packages Qt's platform plugin needs before Qt aborts without saying it.

When the xcb plugin cannot load, Qt ends the process with "This application failed to start
because no Qt platform plugin could be initialized. Reinstalling the application may fix this
problem." — reinstalling never helps on a plain Debian/Ubuntu, where the plugin's X11 libraries
are missing. :func:`platform_problem` checks first (``ldd`` on the plugin) and names the packages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

#: library soname -> Debian/Ubuntu package that provides it (what PySide6's xcb plugin loads).
DEBIAN_PACKAGES: dict[str, str] = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1",
    "libOpenGL.so.0": "libopengl0",
    "libfontconfig.so.1": "libfontconfig1",
    "libdbus-1.so.3": "libdbus-1-3",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-xinerama.so.0": "libxcb-xinerama0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb.so.1": "libxcb1",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libX11.so.6": "libx11-6",
    "libSM.so.6": "libsm6",
    "libICE.so.6": "libice6",
}
#: What the docs tell a user to install on a plain desktop (covers the plugin's usual gaps).
RECOMMENDED = ("libxcb-cursor0", "libxkbcommon-x11-0", "libegl1", "libxcb-icccm4", "libxcb-image0",
               "libxcb-keysyms1", "libxcb-randr0", "libxcb-render-util0", "libxcb-shape0",
               "libxcb-xinerama0", "libxcb-xkb1", "libfontconfig1", "libdbus-1-3")


def _xcb_plugin() -> Path | None:
    try:
        from qtpy import QtCore
    except Exception:
        return None
    plugins = Path(QtCore.QLibraryInfo.path(QtCore.QLibraryInfo.LibraryPath.PluginsPath)) \
        if hasattr(QtCore.QLibraryInfo, "path") else None
    if plugins is None:
        return None
    p = plugins / "platforms" / "libqxcb.so"
    return p if p.is_file() else None


def missing_libraries(ldd_output: str) -> list[str]:
    """Sonames ``ldd`` reported as "not found", in order, without repeats."""
    out: list[str] = []
    for name in re.findall(r"^\s*(\S+)\s+=>\s+not found", ldd_output, re.M):
        if name not in out:
            out.append(name)
    return out


def install_hint(missing: list[str]) -> str:
    """The apt-get line for the missing libraries (unknown ones named as they are)."""
    pkgs = [DEBIAN_PACKAGES[m] for m in missing if m in DEBIAN_PACKAGES]
    unknown = [m for m in missing if m not in DEBIAN_PACKAGES]
    hint = f"sudo apt-get install {' '.join(dict.fromkeys(pkgs))}" if pkgs else ""
    if unknown:
        hint += ("; " if hint else "") + f"also install the packages providing {', '.join(unknown)}"
    return hint


def platform_problem(env: dict[str, str] | None = None) -> str | None:
    """A message when Qt will not be able to open a window here, else None (Linux only)."""
    env = dict(os.environ if env is None else env)
    platform = env.get("QT_QPA_PLATFORM", "")
    if platform and not platform.startswith("xcb"):
        return None  # offscreen, wayland, vnc...: the xcb plugin is not used
    if os.name != "posix" or not Path("/proc").exists():
        return None
    if not platform and env.get("WAYLAND_DISPLAY"):
        return None  # Qt picks Wayland
    if not env.get("DISPLAY"):
        return ("no display to open the viewer on (DISPLAY is not set): run it on a desktop, over "
                "ssh -X, or with QT_QPA_PLATFORM=offscreen for --screenshot")
    plugin, ldd = _xcb_plugin(), shutil.which("ldd")
    if plugin is None or ldd is None:
        return None
    try:
        res = subprocess.run([ldd, str(plugin)], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    missing = missing_libraries(res.stdout)
    if not missing:
        return None
    return (f"Qt's X11 (xcb) platform plugin cannot load: {', '.join(missing)} missing. On "
            f"Debian/Ubuntu: {install_hint(missing)} (docs/saving-results.md lists the full set)")
