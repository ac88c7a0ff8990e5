"""The extension packages a client-only copy of medmvl_core beside the module; the worker it
starts must still import the full package from its own environment."""

from __future__ import annotations

import json
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


def test_client_only_copy_does_not_shadow_the_worker_package(tmp_path):
    pkg = _client_only_copy(tmp_path / "qt-scripted-modules")
    assert launch.is_client_only_install(str(pkg))
    assert launch.launcher_factory() is launch.WorkerLauncher
    # The worker's Python has the full package (here: the checkout on its PYTHONPATH).
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base["PYTHONPATH"] = str(REPO)
    where = "import medmvl_core; print(medmvl_core.__file__)"
    # On PYTHONPATH the client-only copy would win a plain import...
    shadowed = dict(base, PYTHONPATH=os.pathsep.join([str(pkg), str(REPO)]))
    plain = subprocess.run([sys.executable, "-c", where], env=shadowed, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert plain.stdout.startswith(str(pkg)), plain.stderr
    # ... but the launcher of the client-only copy (imported from it, as in Slicer) leaves it out.
    env_of = ("import json, sys; from medmvl_core.client.launcher import WorkerLauncher; "
              "l = WorkerLauncher(checkpoint='ckpt', base_env=json.loads(sys.argv[1])); "
              "print(l.__module__, sys.modules[l.__module__].__file__); print(json.dumps(l.worker_env()))")
    got = subprocess.run([sys.executable, "-c", env_of, json.dumps(base)], cwd=tmp_path,
                         env=dict(base, PYTHONPATH=str(pkg)), capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    origin, env_json = got.stdout.splitlines()
    assert str(pkg) in origin                        # the copy's launcher ran
    env = json.loads(env_json)
    assert env["PYTHONPATH"] == str(REPO)            # base_env kept, the copy not added
    fixed = subprocess.run([sys.executable, "-c", where], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert fixed.stdout.startswith(str(REPO / "medmvl_core")), fixed.stderr
    cmd = launch.WorkerLauncher(python=sys.executable, checkpoint="ckpt").command()
    assert cmd[1:5] == ["-m", "medmvl_core.cli", "serve", "--checkpoint"]
    ok = subprocess.run(cmd[:3] + ["--version"], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("medmvl "), ok.stderr


def test_a_source_checkout_launcher_puts_the_full_package_first(monkeypatch):
    base = {"PATH": "/usr/bin", "PYTHONPATH": "/elsewhere", "DROPPED": ""}
    env = launch.WorkerLauncher(checkpoint="ckpt", base_env=base, env={"EXTRA": "1"}).worker_env()
    assert env["PYTHONPATH"] == os.pathsep.join([str(REPO), "/elsewhere"])
    assert env["EXTRA"] == "1" and env["PATH"] == "/usr/bin" and "HOME" not in env
    monkeypatch.setenv("MEDMVL_LAUNCH_PROBE", "x")   # default base: this process's environment
    assert launch.WorkerLauncher(checkpoint="ckpt").worker_env()["MEDMVL_LAUNCH_PROBE"] == "x"
    made = launch.launcher_factory(base)(checkpoint="ckpt")
    assert made.base_env == base and made.worker_env()["PATH"] == "/usr/bin"
