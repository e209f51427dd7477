"""Every chapter runs ALONE, as on Colab: one notebook in an empty folder, no checkout on sys.path,
`bnlib` installed from a wheel built from this checkout into a fresh virtual environment (which sees
the system's torch, numba, ... through --system-site-packages), executed (nbclient) by that
environment's kernel.

The test sets BNLIB_SMOKE=1: heavy chapters read it and shrink their experiments (the stored,
nbval-compared outputs come from the full-size run). Outputs are not compared here (the nbval run of
the suite does that); what is tested is that every cell runs, with the packaged bnlib and its data.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import CHAPTERS, ROOT

PACKAGE_DATA = sorted(p.name for p in (ROOT / "bnlib" / "data").glob("*.json"))
KERNEL = "bnlib-alone"


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _clean_env(**extra):
    """The environment of a reader's machine: nothing that points Python at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel of bnlib built from the checkout's files (in a copy, so no build/ lands in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "bnlib", src / "bnlib", ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(out), str(src)], timeout=300, env=_clean_env())
    (whl,) = out.glob("bnlib-*.whl")
    return whl


def test_wheel_ships_the_recorded_results(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert PACKAGE_DATA, "bnlib/data/ holds no recorded results to ship"
    for name in PACKAGE_DATA:
        assert f"bnlib/data/{name}" in names, f"the wheel lacks bnlib/data/{name}"
    modules = {Path(n).stem for n in names if n.startswith("bnlib/") and n.endswith(".py")}
    assert {"__init__", "functional", "layers"} <= modules


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv with the wheel installed and a Jupyter kernel spec that runs its python."""
    home = tmp_path_factory.mktemp("venv")
    env_dir = home / "env"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)], timeout=300)
    python = env_dir / "bin" / "python"
    # --force-reinstall: a bnlib of the same version in the system site-packages must not satisfy it
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", "-q", str(wheel)],
         timeout=300, env=_clean_env())
    spec = home / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "bnlib from the wheel", "language": "python"}))
    return env_dir, python, home / "jupyter"


def test_venv_imports_bnlib_from_the_wheel_with_its_data(venv, tmp_path):
    env_dir, python, _ = venv
    code = ("import bnlib, importlib.resources as r; print(bnlib.__file__); "
            "print(sorted(p.name for p in r.files('bnlib').joinpath('data').iterdir() if p.name.endswith('.json')))")
    out = _run([str(python), "-c", code], cwd=tmp_path, env=_clean_env(), timeout=120).splitlines()
    assert Path(out[0]).resolve().is_relative_to(env_dir.resolve()), f"bnlib came from {out[0]}, not the venv"
    assert out[1] == str(PACKAGE_DATA)


# Run a notebook in place with nbclient, in its own folder, on the venv's kernel (a separate process,
# so that the kernel inherits exactly the environment given to it).
EXECUTE = f"""
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, kernel_name="{KERNEL}", timeout=600, resources={{"metadata": {{"path": "."}}}}).execute()
nbformat.write(nb, sys.argv[1])
"""


# The chapters run two at a time (one per core of a 2-core machine; fewer where there is one): they are
# independent processes, and one at a time the nine of them took most of three minutes of the suite's ten
# on such a machine. The first test to ask starts them all; each test then waits for its own chapter.
WORKERS = max(1, min(2, os.cpu_count() or 1))


def _run_alone(notebook, env_dir, jupyter_path, folder):
    """Execute a copy of `notebook`, alone in `folder`, on the venv's kernel; returns (seconds, the executed
    notebook, the notebooks in the folder). A failed or overlong run raises, through the test's result()."""
    folder.mkdir()
    copy = folder / notebook.name
    shutil.copy2(notebook, copy)
    # one more cell, in the copy only: which bnlib did the chapter use?
    nb = json.loads(copy.read_text(encoding="utf-8"))
    nb["cells"].append({"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                        "source": "import bnlib\nprint('BNLIB_FROM', bnlib.__file__)"})
    copy.write_text(json.dumps(nb), encoding="utf-8")
    start = time.perf_counter()
    _run([sys.executable, "-c", EXECUTE, copy.name], cwd=folder, timeout=900,
         env=_clean_env(JUPYTER_PATH=str(jupyter_path), BNLIB_SMOKE="1", MPLBACKEND="Agg"))
    return (time.perf_counter() - start, json.loads(copy.read_text(encoding="utf-8")),
            sorted(p.name for p in folder.iterdir() if p.suffix == ".ipynb"))


@pytest.fixture(scope="module")
def alone_runs(venv, tmp_path_factory):
    """{chapter: future of _run_alone's result}, the chapters run WORKERS at a time in the background."""
    env_dir, _, jupyter_path = venv
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    runs = {nb.stem: pool.submit(_run_alone, nb, env_dir, jupyter_path, tmp_path_factory.mktemp(nb.stem) / "alone")
            for nb in CHAPTERS}
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("notebook", CHAPTERS, ids=[nb.stem for nb in CHAPTERS])
def test_chapter_runs_alone(notebook, venv, alone_runs):
    env_dir = venv[0]
    seconds, done, notebooks = alone_runs[notebook.stem].result()
    # all of the last cell's stdout: the kernel may deliver one print in several stream messages
    last = "".join("".join(o.get("text", "")) for o in done["cells"][-1]["outputs"] if o.get("name") == "stdout")
    used = Path(last.split("BNLIB_FROM", 1)[1].strip())
    assert used.resolve().is_relative_to(env_dir.resolve()), f"{notebook.name} imported bnlib from {used}"
    assert notebooks == [notebook.name]
    print(f"{notebook.name} ran alone in {seconds:.0f} s ({WORKERS} chapters at a time)")
