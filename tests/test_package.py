"""The package as a user imports it: `from bnlib import *` works and names only real modules; its first parallel
CPU call leaves torch's thread count alone."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import bnlib
from conftest import ROOT


def test_star_import_works_in_a_fresh_interpreter():
    code = "from bnlib import *; import bnlib; print(sorted(n for n in bnlib.__all__ if n in globals()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(sorted(bnlib.__all__))


def test_every_name_in_all_is_a_module_of_the_package():
    package_dir = Path(bnlib.__file__).parent
    assert bnlib.__all__, "bnlib.__all__ is empty"
    for name in bnlib.__all__:
        assert (package_dir / f"{name}.py").is_file(), f"bnlib.__all__ names {name!r}, but bnlib/{name}.py does not exist"
        module = importlib.import_module(f"bnlib.{name}")
        assert getattr(bnlib, name) is module
    generated = {p.stem for p in package_dir.glob("*.py") if p.stem != "__init__"}
    assert generated == set(bnlib.__all__), f"modules missing from bnlib.__all__: {sorted(generated - set(bnlib.__all__))}"


def test_first_parallel_call_keeps_torchs_thread_count():
    """numba's OpenMP thread pool, started by bnlib's first parallel CPU call, must not change the
    thread count a user gave torch (it did: torch.set_num_threads(1) silently became 2). A fresh
    process, since the pool starts once per process; with bnlib's default CPU path, so once, not once per path as
    the tests of test_functional.py run."""
    pytest.importorskip("torch")
    from bnlib import cpu
    if cpu.numba is None:
        pytest.skip("numba not installed: no thread pool")
    code = ("import torch; torch.set_num_threads(1)\n"
            "import numpy as np\n"
            "from bnlib import functional as F\n"
            "x = np.random.default_rng(0).standard_normal((64, 64, 28, 28)).astype(np.float32)\n"
            "y, cache = F.batch_norm_forward(x); F.batch_norm_backward(x, cache)\n"
            "print(torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "1"
