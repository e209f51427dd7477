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


def _late_rebinds(path):
    """(function, nested def, name, line) wherever a def nested in a function reads a name from that function's
    scope which the function binds again below the def: the closure, called later, sees the new value."""
    import ast
    scopes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
              ast.GeneratorExp, ast.ClassDef)
    tree = ast.parse(Path(path).read_text())
    found = []
    for outer in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        stores, inner = [], []

        def visit(node):                      # the outer function's own scope, nested scopes not entered
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inner.append(child)
                    stores.append((child.name, child.lineno))
                elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                    stores.append((child.id, child.lineno))
                elif isinstance(child, ast.ExceptHandler) and child.name:
                    stores.append((child.name, child.lineno))
                elif isinstance(child, ast.alias):
                    stores.append(((child.asname or child.name).split(".")[0], child.lineno))
                if not isinstance(child, scopes):
                    visit(child)
        visit(outer)
        for fn in inner:
            bound = {a.arg for a in ast.walk(fn) if isinstance(a, ast.arg)}
            bound |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            bound |= {n.name for n in ast.walk(fn) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ExceptHandler))
                      and n.name}
            bound |= {(n.asname or n.name).split(".")[0] for n in ast.walk(fn) if isinstance(n, ast.alias)}
            read = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound
            found += [(outer.name, fn.name, name, line) for name, line in stores if name in read and line > fn.end_lineno]
    return found


# deliberate: bench_gpu sets cycles_per_s to None to switch its GPU-alone timing off, after which host_s and
# timed_device are not called; main's save_partial is defined in the --gpu branch and env rebound in the other
_LATE_REBINDS_MEANT = {("bench_gpu", "cycles_per_s"), ("main", "env")}


def test_no_closure_reads_a_name_rebound_below_it(tmp_path):
    """A closure that reads a variable of its enclosing function sees the variable's value at call time, not at
    definition: bench_gpu's loop over grid settings once rebound b, the bias tensor that torch's timed closures
    read, to an integer (found on the GPU: torch.batch_norm refused the int). No module of bnlib nor script in
    tools/ does that, except where listed above; the checker itself finds the pattern in a small example."""
    example = ("def f(xs):\n    b = 1\n    def g():\n        return b\n    for name, b in xs:\n        pass\n"
               "    def h(y):\n        c = y\n        return c\n    c = 2\n    return g, h\n")
    (tmp_path / "example.py").write_text(example)
    assert _late_rebinds(tmp_path / "example.py") == [("f", "g", "b", 5)]
    paths = sorted(Path(bnlib.__file__).parent.glob("*.py")) + sorted((ROOT / "tools").glob("*.py"))
    found = [(path.name, *hit) for path in paths for hit in _late_rebinds(path) if hit[::2] not in _LATE_REBINDS_MEANT]
    assert not found, found
