"""The repository root's conftest: pytest loads it before any test file or notebook. It pins the numerical
libraries' CPU code paths (below) and holds the shared fixtures: the repository root, the chapter notebooks, the book built
once per run. Test modules import it as `conftest` (pyproject puts the root on sys.path).

Pinned kernels. The stored outputs of the chapters were made with each numerical library on a code path
fixed by an environment variable, so that every x86-64 CPU with AVX2 and FMA computes them alike:

- NumPy's OpenBLAS on its Haswell kernels (OPENBLAS_CORETYPE=Haswell). Left to itself, the DYNAMIC_ARCH
  OpenBLAS of NumPy's wheels picks kernels for the CPU it finds (SkylakeX on an AVX-512 CPU), which round
  float32 dot and matrix products differently (on 2026-11-29, on an AVX-512 AMD EPYC: 12 cells of chapters
  04, 07 and 08 printed other last digits, every assert holding).
- PyTorch's own vectorized CPU code on its AVX2 build (ATEN_CPU_CAPABILITY=avx2), MKL's matrix products on
  its portable code path (MKL_CBWR=COMPATIBLE, the one setting of MKL's reproducibility mode that gives the
  same results on Intel and AMD CPUs; MKL_CBWR=AVX2 is honoured on Intel only, and on this AMD EPYC it
  changed float64 products against MKL's default, checked on 2026-11-30),
  oneDNN's convolutions on AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2), NumPy's own SIMD loops on their
  x86-64-v3 versions (NPY_ENABLE_CPU_FEATURES=X86_V3) and numba's code generated for Haswell
  (NUMBA_CPU_NAME=haswell). The outputs stored until 2026-11-30 were made on an AVX-512 AMD EPYC with these
  left to the machine; on an AVX2-only AMD EPYC (2026-11-30) 8 cells of chapters 01, 04, 07 and 09 printed
  otherwise, the accuracies of chapter 01's torch-trained networks by up to 0.05 (one of the 8, chapter 07's
  gradient check, is NumPy-only). The outputs are now made with all of them pinned.

So a test run asks for the same code paths on any x86-64 CPU that has them. nbval's kernels (AloneKernel, below)
and every other process pytest starts inherit the environment; each library reads its variable when it
loads, so they are set here, before the notebooks' kernels start. A value already set (a maintainer's
choice; tools/check_portability.py's configurations) is kept. On a CPU without x86-64-v3 (or not x86) nothing
is pinned, and nbval may report other last digits. To re-execute a chapter for its stored
outputs outside pytest, set the same variables (README, "How the repository works"; `PINNED` below).

Order and randomness. pytest_collection_modifyitems runs the longest files first (LONGEST_FIRST), so that
pytest-xdist's workers finish together; an autouse fixture seeds the global random generators before every test
function, from its id, so that no test's data depends on which tests ran before it in its worker (module- and
session-scoped fixtures are set up before that seeding: none of them draws random numbers).
"""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest


# x86-64-v3 (Haswell and later, AMD's Zen): AVX2, FMA and the bit-manipulation extensions that NumPy's X86_V3
# target needs (NumPy refuses, at import, a target the CPU lacks)
_X86_V3_FLAGS = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}


def cpu_flags() -> set:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is no such file);
    tools/check_portability.py reads them too."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((line.split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def _has_x86_v3() -> bool:
    return _X86_V3_FLAGS <= cpu_flags()


# the code paths the stored outputs were made with (see the docstring)
PINNED = {"OPENBLAS_CORETYPE": "Haswell", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE",
          "ONEDNN_MAX_CPU_ISA": "AVX2", "NPY_ENABLE_CPU_FEATURES": "X86_V3", "NUMBA_CPU_NAME": "haswell"}

if platform.machine() in ("x86_64", "AMD64") and _has_x86_v3():
    for _name, _value in PINNED.items():
        os.environ.setdefault(_name, _value)

# Not a pin (no result depends on it): OpenMP threads that find no work sleep at once instead of spinning. pytest
# runs one worker per core (pytest-xdist), and a notebook's kernel is a process beside its worker, so the cores are
# shared; a spinning thread then burns the time another process needs. On 2026-11-30, on 2 cores, chapter 06's
# autocast cell (PyTorch on 2 threads) took 154 s under the shared load against 27 s alone, and a 2-thread
# training loop beside one busy process ran 1.8 times as fast with the threads sleeping (alone, 1.6 times as slow).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


ROOT = Path(__file__).resolve().parent
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


# ----------------------------------------------------------------------------- the chapters run alone
# nbval's run of every chapter is also the test that it runs ALONE, as on Colab: its kernel is the Python of a
# fresh virtual environment into which a wheel built from this checkout is installed (--system-site-packages:
# torch, numba, ipykernel and the rest come from this environment; no network), started in an empty folder
# outside the checkout. So the chapter's first cell finds no checkout above it and imports the installed
# bnlib, and a chapter that read a file of the checkout (instead of bnlib's package data) would fail, at full
# size, with its outputs compared. Until 2026-11-30 tests/test_alone.py ran every chapter a second time for
# that, shrunk (BNLIB_SMOKE=1): 186.6 s of the 1190.1 s of test time of a clean-clone run on 2 cores (pytest
# 621.8 s; 504.6 s to 564.4 s without it, the same day). The environment is built once per pytest run, by
# whichever process first needs it (a lock keeps the other xdist worker waiting), in a folder the controlling
# process makes and removes. BNLIB_NBVAL_IN_CHECKOUT=1 turns all this off (below).
_ALONE_DIR = "_BNLIB_PYTEST_ALONE_DIR"          # set by the controlling process, inherited by xdist's workers
_ALONE_CREATED = pytest.StashKey[str]()
ALONE_KERNEL = "bnlib-alone"


def clean_env(**extra) -> dict:
    """The environment of a reader's machine: nothing that points Python at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def run_checked(cmd, **kwargs) -> str:
    """Run cmd; its stdout, or an AssertionError with the end of its output if it failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def alone_env() -> tuple:
    """(wheel, venv folder, its python): a wheel of bnlib built from the working tree's files (uncommitted ones
    too; in a copy, so no build/ lands in the checkout) and a fresh venv with it installed. Built on the first
    call of the pytest run, under a lock; later calls, in any worker, find it. A failed build is not retried:
    every later call raises its error."""
    import fcntl
    import shutil
    import tempfile
    base = Path(os.environ.get(_ALONE_DIR) or _make_alone_dir())
    base.mkdir(parents=True, exist_ok=True)
    env_dir = base / "env"
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (base / "failed").exists():
            raise RuntimeError("building the chapters' environment failed (first attempt's error):\n"
                               + (base / "failed").read_text())
        if not (base / "ready").exists():
            try:
                work = Path(tempfile.mkdtemp(prefix="build-", dir=base))
                src = work / "src"
                src.mkdir()
                for name in ("pyproject.toml", "README.md"):
                    shutil.copy2(ROOT / name, src / name)
                shutil.copytree(ROOT / "bnlib", src / "bnlib", ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
                run_checked([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                             "-w", str(base / "wheel"), str(src)], timeout=300, env=clean_env())
                (wheel,) = (base / "wheel").glob("bnlib-*.whl")
                # no pip of its own (ensurepip took 8.5 s of the build here): with the system site-packages the
                # venv's python runs the outer pip, which installs into the venv (sys.prefix)
                run_checked([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)],
                            timeout=300)
                run_checked([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
                             "--force-reinstall", "-q", str(wheel)], timeout=300, env=clean_env())
            except BaseException as error:
                (base / "failed").write_text(f"{type(error).__name__}: {error}")
                raise
            (base / "ready").write_text(str(wheel))
    return Path((base / "ready").read_text()), env_dir, env_dir / "bin" / "python"


def _make_alone_dir() -> str:
    """The folder for alone_env(), made by the process that has none (pytest_configure makes it first). It must
    be outside the checkout: a chapter's first cell looks for the checkout in its folder's parents."""
    import tempfile
    folder = tempfile.mkdtemp(prefix="bnlib-pytest-alone-")
    if Path(folder).resolve().is_relative_to(ROOT):
        os.rmdir(folder)
        raise pytest.UsageError(f"the temporary folder {folder} is inside the checkout {ROOT}: set TMPDIR elsewhere, "
                                "so that the chapters' kernels start outside it")
    os.environ[_ALONE_DIR] = folder
    return folder


def pytest_configure(config):
    """The controlling process (or the only one) makes the folder of the alone environment, before xdist
    starts its workers, which inherit its name; it removes it at the end (pytest_unconfigure)."""
    if not hasattr(config, "workerinput") and not os.environ.get(_ALONE_DIR):
        config.stash[_ALONE_CREATED] = _make_alone_dir()


def pytest_unconfigure(config):
    import shutil
    created = config.stash.get(_ALONE_CREATED, None)
    if created:
        shutil.rmtree(created, ignore_errors=True)
        os.environ.pop(_ALONE_DIR, None)


try:
    import nbval.kernel
    import nbval.plugin
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager
except ImportError:                    # pragma: no cover - without nbval no notebook is collected
    nbval = None
else:
    class _AloneSpecs(KernelSpecManager):
        """The one kernel spec AloneKernel starts: ipykernel on the alone environment's python."""
        python = None

        def get_kernel_spec(self, kernel_name):
            return KernelSpec(argv=[str(self.python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                              display_name="bnlib from the wheel", language="python")

    class AloneKernel(nbval.kernel.RunningKernel):
        """nbval's kernel for a chapter (conftest puts this class in nbval's place): the alone environment's
        python, started in a new empty folder, with no PYTHONPATH. Before it stops, it asks the kernel where its
        bnlib came from, and fails the chapter's last test unless it is the alone environment's."""

        def __init__(self, kernel_name, cwd=None, startup_timeout=60):
            import tempfile
            _, self.env_dir, python = alone_env()
            self.folder = Path(tempfile.mkdtemp(prefix="chapter-", dir=os.environ[_ALONE_DIR]))
            specs = _AloneSpecs()
            specs.python = python
            self.km = KernelManager(kernel_name=ALONE_KERNEL, kernel_spec_manager=specs)
            self.km.start_kernel(stderr=open(os.devnull, "w"), cwd=str(self.folder), env=clean_env())
            self.kc = self.km.client()
            self.kc.start_channels()
            try:
                self.kc.wait_for_ready(timeout=startup_timeout)
            except RuntimeError:
                self.kc.stop_channels()
                self.km.shutdown_kernel()
                raise
            self._ensure_iopub_up()

        def run_and_read(self, code, timeout=60) -> str:
            """Run `code` in the kernel; its stdout. Raises queue.Empty if the kernel is not done within `timeout` s."""
            import time
            from queue import Empty
            msg_id = self.kc.execute(code, store_history=False, allow_stdin=False)
            out, deadline = [], time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Empty
                msg = self.kc.get_iopub_msg(timeout=left)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                    out.append(msg["content"]["text"])
                elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    return "".join(out)

        def bnlib_origin(self, timeout=30):
            """The file of the bnlib module the kernel holds ('None' if it never imported one), read from the shell
            reply's user_expressions (a chapter that redirected stdout cannot hide it); None if the kernel is dead
            or does not answer within `timeout` s (a chapter stopped by nbval's cell timeout: that is its failure)."""
            import ast
            import time
            from queue import Empty
            if not getattr(self, "km", None) or not self.km.is_alive():
                return None
            expression = "getattr(__import__('sys').modules.get('bnlib'), '__file__', None)"
            msg_id = self.kc.execute("", silent=True, store_history=False, allow_stdin=False,
                                     user_expressions={"file": expression})
            deadline = time.monotonic() + timeout
            try:
                while (left := deadline - time.monotonic()) > 0:
                    msg = self.kc.get_shell_msg(timeout=left)
                    if msg["parent_header"].get("msg_id") == msg_id:
                        found = msg["content"].get("user_expressions", {}).get("file", {})
                        return str(ast.literal_eval(found["data"]["text/plain"])) if found.get("status") == "ok" else None
            except Empty:
                pass
            return None

        def stop(self):
            import shutil
            try:
                used = self.bnlib_origin()
            finally:
                super().stop()
                shutil.rmtree(self.folder, ignore_errors=True)
            if used == "None":
                raise AssertionError("the chapter never imported bnlib")
            if used is not None and not Path(used).resolve().is_relative_to(self.env_dir.resolve()):
                raise AssertionError(f"the chapter imported bnlib from {used}, not from the wheel installed in {self.env_dir}")

    # BNLIB_NBVAL_IN_CHECKOUT=1 keeps nbval's own kernel (this Python, the chapter's folder, the checkout found by the
    # first cell): tools/gpu_check.sh sets it on the GPU machine, whose image may lack venv and ipykernel (the
    # carried wheels reach the kernels through PYTHONPATH, which the alone kernel drops) and whose 15 minutes
    # should not go to building environments; CI checks the chapters alone on the CPU.
    if os.environ.get("BNLIB_NBVAL_IN_CHECKOUT") != "1":
        nbval.plugin.RunningKernel = AloneKernel


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


# The files in the order pytest-xdist hands them out, the longest first, so that the workers of a 2-core machine
# finish together. xdist (--dist loadfile) would otherwise order the files by their number of tests (pyproject
# turns that off: --no-loadscope-reorder), which put a long file with few tests last: in a clean-clone run on
# 2026-11-30 one worker ran tests/test_alone.py (then 152 s in 11 tests) alone at the end, pytest 632.6 s for
# 1146 s of test time. The order is by each file's summed durations in a clean-clone run of 2026-12-01 (.ci/run of
# a39ec47: 07 207 s, 08 171, test_cuda 124, 01 101, test_book 89, 06 88, 09 72, test_nn 64, 04 47,
# test_cuda_on_cpu 40, test_train 37, 05 33, test_package 14, test_cpu_bench 12), with one change: tests/test_cuda.py
# comes second, so that the second worker starts on it while the first builds the environment every chapter's kernel
# needs (alone_env: 12.1 s in the clean-clone run of 8affb6f; with two chapters first, both waited). The other files,
# each under 10 s, follow in
# collection order. A test checks that every name here is a file.
LONGEST_FIRST = ["chapters/07_experiments.ipynb", "tests/test_cuda.py", "chapters/08_variants.ipynb",
                 "chapters/01_background.ipynb", "tests/test_book.py", "chapters/03_backward.ipynb", "chapters/06_pytorch.ipynb",
                 "chapters/09_faq.ipynb", "tests/test_nn.py", "chapters/04_numpy.ipynb", "tests/test_cuda_on_cpu.py",
                 "tests/test_train.py", "chapters/05_cupy.ipynb", "tests/test_package.py", "tests/test_cpu_bench.py"]


def pytest_collection_modifyitems(config, items):
    """Run the files of LONGEST_FIRST first, in its order; a stable sort keeps each file's tests (a notebook's
    cells) in their order, and the other files in theirs."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture(autouse=True)
def _global_generators_seeded_per_test(request):
    """Seed the global random generators (Python's, NumPy's legacy one, torch's if loaded) at the start of
    every test function, from the test's id. Many tests draw their data from them; with pytest-xdist the
    tests are shared among workers differently on every run, so without this a test's data would depend
    on which tests ran before it in its process. On 2026-11-30 a clean-clone CI run failed
    test_nn_layers_give_torchs_layouts_on_an_emulated_device[2] that way (an input the test had never
    drawn before). Now each test sees the same draws whatever the order, and a failure can be re-run."""
    import random
    import zlib

    import numpy as np
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    if "torch" in sys.modules:                 # not imported here: a test without torch must not pay for it
        sys.modules["torch"].manual_seed(seed)
