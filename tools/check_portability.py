"""Do the chapters' asserts hold on other machines' arithmetic? A maintainer's check, not part of pytest.

The stored outputs come from one machine. On another, the compiled routines behind matrix products and
other array operations differ: NumPy's OpenBLAS picks kernels for the CPU (SSE, AVX, AVX2 with FMA,
AVX-512), PyTorch's MKL takes another code path on another CPU, and PyTorch's own CPU code is vectorized
for another instruction set. They round differently, and after hundreds of SGD steps the networks of
chapters 01, 03, 06, 07, 08 and 09 end in different places: accuracies move by up to a few points, more where
the seeds already disagree. A claim whose assert fails there would stop a reader's notebook (on Colab,
say) with an AssertionError.

This script runs chapters first as pytest does (every library's code path pinned, conftest.py),
then under other choices, forced with OPENBLAS_CORETYPE (honoured by the DYNAMIC_ARCH OpenBLAS that NumPy's wheels bundle),
ATEN_CPU_CAPABILITY (PyTorch's vectorized CPU code) and MKL_CBWR (unset: MKL's default path; COMPATIBLE, its
portable path, is the baseline's; on an AMD EPYC, MKL_VERBOSE=1 shows MKL running an instruction-set value such as
MKL_CBWR=AVX2 as CNR:AUTO, another path again), with every assert made non-fatal and recorded (an IPython AST transformer turns `assert t` into
`if not t: record`). For each configuration and chapter it prints what the kernel really ran (OpenBLAS's
core type, PyTorch's CPU capability, MKL_CBWR), how many code cells printed differently from the stored
run (evidence that the arithmetic did change), and each assert that failed. The first configuration, the
one pytest runs (the pins of conftest.py), is the baseline: an assert or error there as well is not about arithmetic (the exercise
checkers' self-tests feed them wrong answers and expect an AssertionError, which a recorded assert no
longer raises, so they report a wrong answer accepted), and the other configurations are judged on what
fails beyond it. Exit status 1 if any configuration has such a failure or a chapter did not finish.

    python tools/check_portability.py [--keep DIR] [chapters ...]   # "08" or "08_variants"; default: 01 03 06 07 08 09

--keep DIR saves each executed notebook as DIR/<configuration number>/<chapter>.ipynb, to read the values
behind a failed assert.

On a 2-core machine (2026-11-29), one configuration took 47-73 s for chapter 01 (2026-12-02, five seeds), 30-37 s for 03
(2026-12-02, with its constant-statistics networks), 16-21 s for 06, 74-147 s for 07, 91-154 s for 08 and 50-99 s for 09
(2026-12-02, 08 with its fine-tuning experiments and recomputed statistics, 09 with Q34 and Q35; 07 and 08 up to
147 and 154 s on 2026-12-03; as the README says); there are four configurations. A TERM signal (`kill`, `timeout`)
does not stop it while a kernel runs (the kernel is interrupted and the run goes on with the next
chapter); stop it with ^C, or `kill -9` its process and its kernels (`pkill -9 -f ipykernel_launcher`). The chapters run in a scratch folder
with the checkout first on PYTHONPATH, at full size (BNLIB_SMOKE unset). Passing here makes a failure on
a reader's machine unlikely, not impossible: other library versions, other MKL paths (an Intel CPU's)
and non-x86 CPUs are not tried.
"""
import copy
import json
import os
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# name: environment; None removes a variable. The first is the baseline: the environment the stored outputs
# were made in, every library on the code path pytest pins (conftest.PINNED: OpenBLAS Haswell, PyTorch AVX2, MKL
# compatible, oneDNN AVX2, NumPy x86-64-v3, numba Haswell). The others leave NumPy's SIMD loops, oneDNN and numba to
# the machine and force other OpenBLAS, PyTorch and MKL paths.
sys.path.insert(0, REPO)
from conftest import PINNED, cpu_flags  # noqa: E402  (the repository root's conftest.py: the pins, one place)

_MACHINE_PICKS = {"NPY_ENABLE_CPU_FEATURES": None, "ONEDNN_MAX_CPU_ISA": None, "NUMBA_CPU_NAME": None}


# OpenBLAS's SkylakeX kernels and PyTorch's AVX-512 code need AVX-512: on a CPU without it the kernel dies (seen on
# an AVX2-only AMD EPYC, 2026-11-30), so there the second configuration takes OpenBLAS's SSE4.2 kernels (Nehalem)
# instead, and the fourth PyTorch's AVX2 code
_AVX512 = "avx512f" in cpu_flags()
_OTHER_CORE = "SkylakeX" if _AVX512 else "Nehalem"
_WIDEST_TORCH = "avx512" if _AVX512 else "avx2"
CONFIGS = {
    "every library pinned as pytest pins it (conftest.py)": dict(PINNED),
    f"OpenBLAS {_OTHER_CORE}, torch AVX2, MKL unpinned": {"OPENBLAS_CORETYPE": _OTHER_CORE,
                                                         "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": None,
                                                         **_MACHINE_PICKS},
    "OpenBLAS Sandybridge (no FMA), torch default, MKL compatible": {
        "OPENBLAS_CORETYPE": "Sandybridge", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
        **_MACHINE_PICKS},
    f"OpenBLAS Prescott (this OpenBLAS runs it as Katmai, SSE), torch {_WIDEST_TORCH}, MKL compatible": {
        "OPENBLAS_CORETYPE": "Prescott", "ATEN_CPU_CAPABILITY": _WIDEST_TORCH, "MKL_CBWR": "COMPATIBLE",
        **_MACHINE_PICKS},
}
DEFAULT_CHAPTERS = ("01_background", "03_backward", "06_pytorch", "07_experiments", "08_variants", "09_faq")

SOFT_ASSERTS = r'''
import ast as _ast, os as _os
_SOFT_FAILS, _SOFT_CELL = [], [-1]
def _soft_fail(src, line):
    _SOFT_FAILS.append((_SOFT_CELL[0], line, src))
class _Soft(_ast.NodeTransformer):
    def visit_Assert(self, node):
        call = _ast.Expr(_ast.Call(_ast.Name("_soft_fail", _ast.Load()),
                                   [_ast.Constant(_ast.unparse(node.test)[:300]), _ast.Constant(node.lineno)], []))
        return _ast.copy_location(_ast.If(_ast.UnaryOp(_ast.Not(), node.test), [call], []), node)
get_ipython().ast_transformers.append(_Soft())
get_ipython().events.register("pre_run_cell", lambda *a: _SOFT_CELL.__setitem__(0, _SOFT_CELL[0] + 1))
import numpy as _np, torch as _torch
try:
    from threadpoolctl import threadpool_info as _pools
    _blas = [i for i in _pools() if i.get("internal_api") == "openblas"]
except ImportError:
    _blas = []
print("RUNTIME=" + f"OpenBLAS {_blas[0]['architecture'] if _blas else '?'}, torch {_torch.backends.cpu.get_cpu_capability()}, "
      f"MKL_CBWR={_os.environ.get('MKL_CBWR', 'unset')}")
'''
REPORT = "import json as _j; print('SOFT_FAILS=' + _j.dumps(_SOFT_FAILS))"


def _text(cell):
    """What a code cell printed: streams, results' plain text, errors."""
    return "".join(o.get("text", "") if "text" in o else f"{o['ename']}: {o.get('evalue', '')}" if "ename" in o
                   else "".join(o.get("data", {}).get("text/plain", "")) for o in cell.get("outputs", []))


def run_chapter(path, folder, keep=None):
    """One run of the chapter at `path` in `folder`, in a kernel started with this process's environment.
    Returns a dict: fails [(code cell, line, test)] (None if the run did not get to the end), errors
    [(code cell, exception name, message)], runtime (what the kernel ran on), differing (code cells whose
    printed text differs from the stored notebook's; cells marked NBVAL_IGNORE_OUTPUT aside)."""
    stored = nbformat.read(path, 4)
    nb = copy.deepcopy(stored)
    nb.cells.insert(0, nbformat.v4.new_code_cell(SOFT_ASSERTS))
    nb.cells.append(nbformat.v4.new_code_cell(REPORT))
    finished = True
    try:
        NotebookClient(nb, timeout=1200, kernel_name="python3", allow_errors=True,
                       resources={"metadata": {"path": folder}}).execute()
    except Exception as exc:                       # a cell timeout or a dead kernel escapes allow_errors
        finished = False
        print(f"      did not finish: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    if keep:
        os.makedirs(os.path.dirname(keep), exist_ok=True)
        nbformat.write(nb, keep)
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [(i - 1, o.get("ename"), o.get("evalue", "")[:200]) for i, c in enumerate(code[:-1])
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    runtime = [ln[len("RUNTIME="):] for ln in _text(code[0]).splitlines() if ln.startswith("RUNTIME=")]
    report = [ln[len("SOFT_FAILS="):] for ln in _text(code[-1]).splitlines() if ln.startswith("SOFT_FAILS=")]
    fails = [tuple(f) for f in json.loads(report[0])] if finished and report else None
    originals = [c for c in stored.cells if c.cell_type == "code"]
    differing = sum(1 for a, b in zip(originals, code[1:-1])
                    if "NBVAL_IGNORE_OUTPUT" not in a.source and _text(a) != _text(b))
    return {"fails": fails, "errors": errors, "runtime": runtime[0] if runtime else "?", "differing": differing}


def check(chapters, configs=CONFIGS, runner=run_chapter, chapter_dir=os.path.join(REPO, "chapters"), keep=None):
    """Run `chapters` under every configuration (environment set for the kernels it starts) and print the
    report. Returns 1 if a configuration after the first has a failed assert or an error that the first
    has not, or a chapter did not finish; else 0."""
    baseline, bad, saved = {}, False, dict(os.environ)
    try:
        for k, (name, env) in enumerate(configs.items()):
            os.environ.clear()
            os.environ.update(saved)
            os.environ.pop("BNLIB_SMOKE", None)
            os.environ["PYTHONPATH"] = REPO + os.pathsep + saved.get("PYTHONPATH", "")
            for variable, value in env.items():
                if value is None:
                    os.environ.pop(variable, None)
                else:
                    os.environ[variable] = value
            print(f"== {name}", flush=True)
            for chapter in chapters:
                start = time.time()
                with tempfile.TemporaryDirectory() as folder:
                    result = runner(os.path.join(chapter_dir, chapter + ".ipynb"), folder,
                                    os.path.join(keep, str(k), chapter + ".ipynb") if keep else None)
                fails, errors = result["fails"], result["errors"]
                if k == 0:
                    baseline[chapter] = (set(fails or ()), {e[:2] for e in errors})
                known, known_errors = baseline.get(chapter, (set(), set()))
                new = [f for f in fails or () if f not in known]
                new_errors = [e for e in errors if e[:2] not in known_errors]
                print(f"   {chapter}: {time.time() - start:.0f} s on {result['runtime']}; "
                      f"{result['differing']} code cells print differently from the stored run; "
                      + ("did not finish" if fails is None else
                         f"{len(fails)} failed asserts, {len(errors)} errors"
                         + (f" ({len(fails) - len(new)} and {len(errors) - len(new_errors)} of them also in the "
                            f"baseline)" if k else "")), flush=True)
                for cell, line, test in (fails if k == 0 else new) or ():
                    print(f"      code cell {cell}, line {line}: assert {test}", flush=True)
                for cell, ename, message in (errors if k == 0 else new_errors):
                    print(f"      code cell {cell}: {ename}: {message}", flush=True)
                bad |= fails is None or (k > 0 and bool(new or new_errors))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return 1 if bad else 0


def _stems(names, chapter_dir=os.path.join(REPO, "chapters")):
    stems = sorted(p[:-6] for p in os.listdir(chapter_dir) if p.endswith(".ipynb"))
    return [next((s for s in stems if s == a or s.startswith(a + "_")), a) for a in names]


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*", help='chapters to run, "08" or "08_variants" (default: '
                        + " ".join(DEFAULT_CHAPTERS) + ")")
    parser.add_argument("--keep", metavar="DIR", help="save each executed notebook as DIR/<configuration>/<chapter>.ipynb")
    args = parser.parse_args()
    stems = _stems(args.chapters) if args.chapters else list(DEFAULT_CHAPTERS)
    known = sorted(p[:-6] for p in os.listdir(os.path.join(REPO, "chapters")) if p.endswith(".ipynb"))
    unknown = [s for s in stems if s not in known]
    if unknown:                                        # before any chapter runs, not when its turn comes
        parser.error(f"no chapter {', '.join(unknown)}; chapters are {', '.join(known)}")
    sys.exit(check(stems, keep=args.keep and os.path.abspath(args.keep)))
