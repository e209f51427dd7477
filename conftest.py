"""The repository root's conftest: pytest loads it before any test file or notebook. It pins NumPy's BLAS
kernels (below) and holds the shared fixtures: the repository root, the chapter notebooks, the book built
once per run. Test modules import it as `conftest` (pyproject puts the root on sys.path).

Pinned kernels. The stored outputs of the chapters were made with NumPy's OpenBLAS running its Haswell
kernels (AVX2 with FMA): the machine that made them set OPENBLAS_CORETYPE=Haswell. Left to itself, the
DYNAMIC_ARCH OpenBLAS of NumPy's wheels picks kernels for the CPU it finds (SkylakeX on an AVX-512 CPU),
which round float32 dot and matrix products differently; the training chapters (07, 08) and chapter 04's
cancellation table then print other last digits, and nbval's strict comparison fails though every assert
holds (on 2026-11-29, on an AVX-512 AMD EPYC: 12 cells of chapters 04, 07 and 08). So a test run asks for
the same kernels on any x86-64 CPU that has them. nbval's kernels, test_alone's and every other process
pytest starts inherit the environment; OpenBLAS reads the variable when it loads, so it is set here, before
the notebooks' kernels start. A value already set (a maintainer's choice; tools/check_portability.py's
configurations) is kept. Not pinned: PyTorch's CPU code path (ATEN_CPU_CAPABILITY) and numba's target,
which no stored output has been seen to depend on. To re-execute a chapter for its stored outputs outside
pytest, set the same variable (README, "How the repository works").
"""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest


def _has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


if platform.machine() in ("x86_64", "AMD64") and _has_avx2_fma():
    os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")


ROOT = Path(__file__).resolve().parent
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
