"""Installing the Slicer module: from a source checkout's folder, or as the extension build with
the client bundled as ``medmvl_client`` (never a second ``medmvl_core``). Each layout is
imported in a fresh, isolated interpreter (``python -I``) so nothing of this test's path leaks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "MedMVLSlicer"
sys.path.insert(0, str(REPO / "scripts"))
import bundle_slicer_client  # noqa: E402


def _run(code: str, path0: Path, *flags: str) -> subprocess.CompletedProcess:
    """Run ``code`` in ``python -I`` (no PYTHONPATH, no cwd on sys.path) with ``path0`` first."""
    prog = f"import sys; sys.path.insert(0, {str(path0)!r})\n" + code
    return subprocess.run([sys.executable, "-I", *flags, "-c", prog], capture_output=True,
                          text=True, timeout=120, cwd="/")


def _extension_layout(root: Path) -> Path:
    """What the extension installs in qt-scripted-modules/: the module, its Lib, the bundle."""
    lib = root / "qt-scripted-modules"
    shutil.copytree(MODULE / "MedMVLSlicerLib", lib / "MedMVLSlicerLib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(MODULE / "MedMVLSlicer.py", lib / "MedMVLSlicer.py")
    shutil.copytree(MODULE / "Resources", lib / "Resources")
    bundle_slicer_client.bundle(lib)
    return lib


def test_folder_install_finds_the_checkout_client_without_touching_sys_path():
    out = _run("import MedMVLSlicerLib.clientlib as c, json, importlib.util\n"
               "import medmvl_core\n"
               "print(json.dumps({'pkg': c.PACKAGE, 'src': c.SOURCE, 'path': sys.path,\n"
               "  'core': medmvl_core.__file__, 'ctl': c.controller.__name__,\n"
               "  'bench': importlib.util.find_spec('bench') is not None,\n"
               "  'scripts': importlib.util.find_spec('scripts') is not None,\n"
               "  'heavy': [m for m in ('torch', 'transformers') if m in sys.modules]}))", MODULE)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["pkg"] == "medmvl_core.client" and got["src"] == f"checkout {REPO}"
    assert got["core"] == str(REPO / "medmvl_core" / "__init__.py")
    assert str(REPO) not in got["path"]  # the checkout root (bench/, training/) stays off sys.path
    assert not got["bench"] and not got["scripts"] and got["heavy"] == []
    assert got["ctl"] == "medmvl_core.client.controller"


def test_bundle_is_its_own_package_and_works_without_medmvl_core(tmp_path):
    files = bundle_slicer_client.bundle(tmp_path)
    names = {p.name for p in files}
    client_files = {p.name for p in (REPO / "medmvl_core" / "client").glob("*.py")}
    assert client_files <= names and {"_core_errors.py", "_version.py"} <= names
    assert all(p.parts[0] == "medmvl_client" for p in files)
    code = ("import io, json, medmvl_client\n"
            "from medmvl_client import controller, errors, sse, qt_transport, roi_geometry\n"
            "from medmvl_client._version import __version__\n"
            "ev = list(sse.iter_sse(io.BytesIO(b'event: token\\ndata: {\"text\": \"a\"}\\n\\n')))\n"
            "e = errors.error_from_response(404, 'unknown_session', 'gone')\n"
            "try:\n    roi_geometry.validate_voxel_box((5, 5, 5, 9, 9, 9), (2, 2, 2))\n"
            "except Exception as x:\n    roi_err = type(x).__name__\n"
            "print(json.dumps({'ev': [ev[0].event, ev[0].data], 'err': type(e).__name__,\n"
            "  'roi': roi_err, 'v': __version__, 'tasks': list(controller.TASK_SPECS),\n"
            "  'core': [m for m in sys.modules if m.startswith('medmvl_core')]}))")
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["ev"] == ["token", {"text": "a"}] and got["err"] == "NotFoundError"
    assert got["roi"] == "RoiError" and got["core"] == []
    assert got["tasks"] == ["ask", "report", "describe", "find", "crop_ask"]
    import medmvl_core

    assert got["v"] == medmvl_core.__version__


def test_bundler_refuses_a_client_file_it_cannot_hold(tmp_path):
    fake = tmp_path / "repo"
    shutil.copytree(REPO / "medmvl_core" / "client", fake / "medmvl_core" / "client",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "medmvl_core" / "__init__.py", fake / "medmvl_core" / "__init__.py")
    shutil.copy(REPO / "medmvl_core" / "errors.py", fake / "medmvl_core" / "errors.py")
    bundle_slicer_client.bundle(tmp_path / "ok", repo=fake)
    (fake / "medmvl_core" / "client" / "extra.py").write_text(
        '"""doc: from medmvl_core.imaging import x is fine in a docstring"""\n'
        "from medmvl_core.imaging import readers\n")
    with pytest.raises(bundle_slicer_client.BundleError, match=r"client/extra.py:2 imports medmvl_core.imaging"):
        bundle_slicer_client.bundle(tmp_path / "bad", repo=fake)
    (fake / "medmvl_core" / "client" / "extra.py").write_text("import torch\n")
    with pytest.raises(bundle_slicer_client.BundleError, match="torch"):
        bundle_slicer_client.bundle(tmp_path / "bad2", repo=fake)
    cli = subprocess.run([sys.executable, str(REPO / "scripts" / "bundle_slicer_client.py"),
                          str(tmp_path / "cli")], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "medmvl_client/controller.py" in cli.stdout.split(";")


def test_extension_layout_imports_the_module_against_the_bundle(tmp_path):
    lib = _extension_layout(tmp_path)
    code = ("sys.path.insert(1, %r)\n"
            "import slicer_stubs; slicer_stubs.install(module_dir=%r)\n"
            "import MedMVLSlicer, MedMVLSlicerLib.clientlib as c\n"
            "w = MedMVLSlicer.MedMVLSlicerWidget(); w.setup()\n"
            "env = c.launcher.WorkerLauncher(checkpoint='ck', base_env={'PATH': '/usr/bin'}).worker_env()\n"
            "print(c.PACKAGE, c.SOURCE.split()[0], type(w.logic.controller.runner).__name__)\n"
            "print(sorted(m for m in sys.modules if m.startswith('medmvl_core')))\n"
            "print(env.get('PYTHONPATH'))" % (str(REPO / "Testing"), str(lib)))
    out = _run(code, lib)
    assert out.returncode == 0, out.stderr
    first, core, pythonpath = out.stdout.splitlines()[-3:]
    assert first == "medmvl_client bundle QtRunner"
    assert core == "[]"  # no medmvl_core in Slicer's Python at all
    assert pythonpath == "None"  # the bundled launcher adds nothing to the worker's PYTHONPATH


def test_missing_client_is_a_clear_import_error(tmp_path):
    lib = tmp_path / "qt-scripted-modules"
    shutil.copytree(MODULE / "MedMVLSlicerLib", lib / "MedMVLSlicerLib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = _run("import MedMVLSlicerLib.clientlib", lib, "-S")  # -S: no installed packages either
    assert out.returncode == 1
    assert "ClientNotFoundError: MedM-VL: the worker client was not found" in out.stderr
    assert "Additional module paths" in out.stderr and str(lib) in out.stderr


def test_extension_cmakelists_lists_every_module_file_and_bundles_the_client():
    cmake = (MODULE / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "MedMVLSlicer")
    listed = [p for p in MODULE.rglob("*") if p.suffix in (".py", ".ui", ".png")
              and "Testing" not in p.parts and "__pycache__" not in p.parts]
    assert len(listed) >= 7
    for p in listed:
        assert p.relative_to(MODULE).as_posix() in cmake, f"{p} is not listed in the module CMakeLists"
    assert "scripts/bundle_slicer_client.py" in cmake and "medmvl_core/client" not in cmake.split(
        "MEDMVL_CLIENT_SOURCES")[0]
    # Each test is registered once: the module's own test by the module, the self-test by Testing/.
    registered = re.findall(r"^\s*slicer_add_python_unittest\(SCRIPT (\S+)\)", cmake, re.M)
    tests = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text()
    registered += re.findall(r"^\s*slicer_add_python_unittest\(SCRIPT (\S+)\)", tests, re.M)
    assert registered == ["MedMVLSlicer.py", "MedMVLSlicerSelfTest.py"]
    assert (MODULE / "Testing" / "Python" / "MedMVLSlicerSelfTest.py").is_file()


def test_a_source_checkout_launcher_puts_the_full_package_first(monkeypatch):
    from medmvl_core.client.launcher import WorkerLauncher

    base = {"PATH": "/usr/bin", "PYTHONPATH": "/elsewhere", "DROPPED": ""}
    env = WorkerLauncher(checkpoint="ckpt", base_env=base, env={"EXTRA": "1"}).worker_env()
    assert env["PYTHONPATH"] == os.pathsep.join([str(REPO), "/elsewhere"])
    assert env["EXTRA"] == "1" and env["PATH"] == "/usr/bin" and "HOME" not in env
    monkeypatch.setenv("MEDMVL_LAUNCH_PROBE", "x")  # default base: this process's environment
    assert WorkerLauncher(checkpoint="ckpt").worker_env()["MEDMVL_LAUNCH_PROBE"] == "x"


PROBE = """cmake_minimum_required(VERSION 3.16)
project(MedMVLProbe NONE)
# Slicer's macros replaced by recorders: this configures MedMVLSlicer/CMakeLists.txt for real
# (bundling included) without a Slicer build tree.
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/qt-scripted-modules)
set(BUILD_TESTING ON)
set(PYTHON_EXECUTABLE "@PY@")
set(LOG ${CMAKE_BINARY_DIR}/probe.txt)
file(WRITE ${LOG} "")
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(M "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  file(APPEND ${LOG} "module ${M_NAME} ${M_SCRIPTS}\\n")
endmacro()
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(C "NO_INSTALL_SUBDIR" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(s ${C_SCRIPTS})
    if(NOT EXISTS ${C_SOURCE_DIR}/${s})
      message(FATAL_ERROR "missing ${C_SOURCE_DIR}/${s}")
    endif()
  endforeach()
  file(APPEND ${LOG} "compile ${C_TARGET_NAME} ${C_SCRIPTS}\\n")
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(U "" "SCRIPT" "" ${ARGN})
  file(APPEND ${LOG} "test ${U_SCRIPT}\\n")
endmacro()
add_subdirectory("@MODULE@" MedMVLSlicer)
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_module_cmakelists_configures_and_bundles_with_recorded_slicer_macros(tmp_path):
    src, build = tmp_path / "src", tmp_path / "build"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(PROBE.replace("@PY@", sys.executable)
                                        .replace("@MODULE@", MODULE.as_posix()))
    out = subprocess.run(["cmake", "-S", str(src), "-B", str(build)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    log = (build / "probe.txt").read_text().splitlines()
    module = next(line for line in log if line.startswith("module "))
    assert module.split()[1] == "MedMVLSlicer" and "MedMVLSlicerLib/clientlib.py" in module
    compiled = next(line for line in log if line.startswith("compile ")).split()
    assert compiled[1] == "MedMVLSlicerMedMVLClient"
    assert {"medmvl_client/controller.py", "medmvl_client/qt_transport.py",
            "medmvl_client/_core_errors.py", "medmvl_client/_version.py"} <= set(compiled[2].split(";"))
    assert [line for line in log if line.startswith("test ")] == [
        "test MedMVLSlicer.py", "test MedMVLSlicerSelfTest.py"]
