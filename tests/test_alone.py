"""The package the chapters run alone with, as on Colab: conftest's alone environment (a fresh virtual
environment with a wheel built from this checkout installed) is the Python of nbval's kernel for every chapter,
each started in an empty folder outside the checkout (conftest.AloneKernel). nbval's run of the chapters is
therefore the test that each runs alone, at full size and with its outputs compared; this file checks the wheel
(it ships the recorded results in bnlib/data/) and that kernel (bnlib from the wheel, no checkout in reach).
"""
import json
import zipfile
from pathlib import Path

import pytest

import conftest
from conftest import ROOT, alone_env, clean_env

PACKAGE_DATA = sorted(p.name for p in (ROOT / "bnlib" / "data").glob("*.json"))


@pytest.fixture(scope="module")
def alone():
    return alone_env()


def test_wheel_ships_the_recorded_results(alone):
    names = zipfile.ZipFile(alone[0]).namelist()
    assert PACKAGE_DATA, "bnlib/data/ holds no recorded results to ship"
    for name in PACKAGE_DATA:
        assert f"bnlib/data/{name}" in names, f"the wheel lacks bnlib/data/{name}"
    modules = {Path(n).stem for n in names if n.startswith("bnlib/") and n.endswith(".py")}
    assert {"__init__", "functional", "layers"} <= modules


def test_venv_imports_bnlib_from_the_wheel_with_its_data(alone, tmp_path):
    _, env_dir, python = alone
    code = ("import bnlib, importlib.resources as r; print(bnlib.__file__); "
            "print(sorted(p.name for p in r.files('bnlib').joinpath('data').iterdir() if p.name.endswith('.json')))")
    out = conftest.run_checked([str(python), "-c", code], cwd=tmp_path, env=clean_env(), timeout=120).splitlines()
    assert Path(out[0]).resolve().is_relative_to(env_dir.resolve()), f"bnlib came from {out[0]}, not the venv"
    assert out[1] == str(PACKAGE_DATA)


def test_nbval_runs_every_chapter_on_the_alone_kernel():
    """conftest puts AloneKernel in nbval's place, and pyproject runs nbval on 'the current environment' (which
    AloneKernel's environment extends), never on a kernel named by a notebook."""
    import nbval.plugin
    assert nbval.plugin.RunningKernel is conftest.AloneKernel
    assert "--nbval-current-env" in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_the_alone_kernel_has_no_checkout_in_reach():
    """What a chapter's first cell sees in nbval's kernel: an empty folder outside the checkout, no checkout on
    sys.path, and bnlib from the wheel (its package data with it); and the check the kernel runs before it stops."""
    kernel = conftest.AloneKernel("python3", cwd=str(ROOT / "chapters"))
    try:
        out = kernel.run_and_read(
            "import json, os, sys, bnlib, importlib.resources as r\n"
            "print(json.dumps([os.getcwd(), os.listdir('.'), sys.path, bnlib.__file__, "
            "sorted(p.name for p in r.files('bnlib').joinpath('data').iterdir() if p.name.endswith('.json')), "
            "os.environ.get('PYTHONPATH')]))")
        cwd, listing, path, used, data, pythonpath = json.loads(out)
        assert listing == [] and not Path(cwd).resolve().is_relative_to(ROOT)
        assert Path(cwd).resolve() == kernel.folder.resolve()
        assert not any(Path(p).resolve() == ROOT for p in path if p)
        assert Path(used).resolve().is_relative_to(kernel.env_dir.resolve()) and data == PACKAGE_DATA
        assert pythonpath is None
        assert kernel.bnlib_origin() == used
    finally:
        kernel.stop()
    assert not kernel.folder.exists()                                  # the folder goes with the kernel


def test_the_alone_kernel_fails_a_chapter_that_imported_another_bnlib(tmp_path):
    """A chapter whose bnlib came from elsewhere (a checkout put on sys.path) fails at the kernel's stop."""
    fake = tmp_path / "bnlib"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    kernel = conftest.AloneKernel("python3")
    kernel.run_and_read(f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import bnlib")
    with pytest.raises(AssertionError, match="imported bnlib from .*, not from the wheel"):
        kernel.stop()


def test_the_alone_kernel_fails_a_chapter_that_never_imported_bnlib_and_reads_past_redirected_stdout():
    kernel = conftest.AloneKernel("python3")
    assert kernel.bnlib_origin() == "None"
    kernel.run_and_read("import io, sys; sys.stdout = io.StringIO()")
    with pytest.raises(AssertionError, match="never imported bnlib"):
        kernel.stop()


def test_a_failed_build_of_the_environment_is_reported_not_retried(tmp_path, monkeypatch):
    """The first failure's error, written beside the lock, is what every later chapter reports."""
    monkeypatch.setenv(conftest._ALONE_DIR, str(tmp_path))
    (tmp_path / "failed").write_text("CalledProcessError: pip wheel failed")
    with pytest.raises(RuntimeError, match=r"first attempt's error\):\n.*pip wheel failed"):
        alone_env()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failed", "lock"]     # nothing built again


def test_the_gpu_check_keeps_nbvals_own_kernel():
    """tools/gpu_check.sh sets BNLIB_NBVAL_IN_CHECKOUT=1 (the GPU image may lack venv and ipykernel outside the
    carried wheels); with it, conftest leaves nbval's kernel in place, and without it puts AloneKernel there."""
    import subprocess
    import sys
    assert "BNLIB_NBVAL_IN_CHECKOUT=1" in (ROOT / "tools" / "gpu_check.sh").read_text(encoding="utf-8")
    code = "import conftest, nbval.plugin; print(nbval.plugin.RunningKernel is conftest.AloneKernel)"
    for value, patched in (("1", "False"), ("0", "True")):
        out = conftest.run_checked([sys.executable, "-c", code], cwd=ROOT, timeout=120,
                                   env=clean_env(BNLIB_NBVAL_IN_CHECKOUT=value, PYTHONPATH=str(ROOT)))
        assert out.strip() == patched, (value, out)
