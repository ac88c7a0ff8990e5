"""The extension packages a client-only copy of medmvl_core beside the module; the worker it
starts must still import the full package from its own environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedMVLSlicer"))
from MedMVLSlicerLib import launch  # noqa: E402

CLIENT_FILES = ["medmvl_core/__init__.py", "medmvl_core/errors.py"] + [
    f"medmvl_core/client/{p.name}" for p in (REPO / "medmvl_core" / "client").glob("*.py")]


def _client_only_copy(dst: Path) -> Path:
    for rel in CLIENT_FILES:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, dst / rel)
    return dst


def test_packaged_file_list_matches_the_module_cmakelists():
    module = REPO / "MedMVLSlicer"
    cmake = (module / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "MedMVLSlicer")
    for rel in CLIENT_FILES:
        assert rel in cmake, f"{rel} is not packaged by MedMVLSlicer/CMakeLists.txt"
    listed = [p for p in module.rglob("*") if p.suffix in (".py", ".ui", ".png")
              and "Testing" not in p.parts and "__pycache__" not in p.parts]
    assert len(listed) >= 6
    for p in listed:
        assert p.relative_to(module).as_posix() in cmake, f"{p} is not listed in the module CMakeLists"
    assert not launch.is_client_only_install()  # a source checkout has the full package


def test_client_only_copy_does_not_shadow_the_worker_package(tmp_path, monkeypatch):
    pkg = _client_only_copy(tmp_path / "qt-scripted-modules")
    assert launch.is_client_only_install(str(pkg))
    monkeypatch.setattr(launch, "PACKAGE_PARENT", str(pkg))
    cmd = launch.ClientOnlyInstallLauncher(python=sys.executable, checkpoint="ckpt").command()
    assert cmd[1] == "-c" and cmd[3:5] == ["serve", "--checkpoint"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg), str(REPO)]))
    where = "import medmvl_core; print(medmvl_core.__file__)"
    # On PYTHONPATH (as the launcher puts it) the client-only copy wins a plain import...
    plain = subprocess.run([sys.executable, "-c", where], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert plain.stdout.startswith(str(pkg)), plain.stderr
    # ... the bootstrap drops it first and reaches the full package.
    prefix = cmd[2].split("from medmvl_core.cli")[0]
    fixed = subprocess.run([sys.executable, "-c", prefix + where], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert fixed.stdout.startswith(str(REPO / "medmvl_core")), fixed.stderr
    ok = subprocess.run([cmd[0], "-c", cmd[2], "--version"], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("medmvl "), ok.stderr
