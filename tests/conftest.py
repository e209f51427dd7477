"""Shared fixtures: the repository root, the chapter notebooks, and the book built once per run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


def code_cells(notebook: Path) -> list[dict]:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """Build the book exactly as the README does (-W -n --keep-going), into a temporary folder."""
    out = tmp_path_factory.mktemp("book")
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
           "build", str(ROOT), "-W", "-n", "--keep-going", "--path-output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"jupyter-book build failed:\n{log[-5000:]}"
    return out / "_build" / "html", log


@pytest.fixture
def cpu_backend(request):
    """Run a test once per CPU path of bnlib.functional (numba, numpy, portable), restoring the default."""
    from bnlib import cpu
    previous = cpu.set_backend(request.param)
    yield request.param
    cpu.set_backend(previous)


def pytest_generate_tests(metafunc):
    if "cpu_backend" in metafunc.fixturenames:
        from bnlib import cpu
        metafunc.parametrize("cpu_backend", cpu.available_backends(), indirect=True)
