# GENERATED FILE: do not edit.
# bnlib.bench is generated from chapters/04_numpy.ipynb, chapters/05_cupy.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['SETTLE_S', 'median_ms', 'copy_bandwidth', 'peak_extra_memory', 'CPU_SHAPES', 'roofline', 'bench_cpu', 'format_table', 'environment', 'write_recording', 'main', 'GPU_SHAPES', 'GPU_CONFIGS', 'gpu_copy_bandwidth', 'bench_gpu', 'format_gpu_table', 'GOAL_FAST_SHAPES', 'gpu_goals', 'format_gpu_goals', 'gpu_environment']

import argparse
import contextlib
import datetime
import json
import numbers
import os
import platform
import sys
import time
import tracemalloc

import numpy as np

try:
    import resource                     # page-fault counts (Linux, macOS; absent on Windows)
except ImportError:
    resource = None

from bnlib import cpu
from bnlib import functional as F

SETTLE_S = 0.003


def _seconds_and_faults(fn):
    """Wall time of one call of fn, taken in steady state, and the minor page faults of that call (None where the
    system does not count them). Steady state: fn first runs back to back for SETTLE_S, so that its own thread pool
    is awake and the previous implementation's pool (torch's and numba's OpenMP threads both spin for a while after
    their work) has gone idle, as it would be in a training loop that calls the same layer over and over. The
    faults are counted outside the timed interval."""
    start = time.perf_counter()
    while time.perf_counter() - start < SETTLE_S:
        fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else None
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    if before is None:
        return elapsed, None
    return elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _seconds(fn):
    """Wall time of one call of fn, taken in steady state (_seconds_and_faults)."""
    return _seconds_and_faults(fn)[0]


def median_ms(fn, repeats=7):
    """Median wall time of fn in milliseconds over `repeats` calls, each timed in steady state."""
    repeats = F._check_positive_int(repeats, "repeats")
    return 1e3 * float(np.median([_seconds(fn) for _ in range(repeats)]))


def copy_bandwidth(nbytes=256 << 20, repeats=5):
    """This machine's copy bandwidth in bytes/s: bytes read + bytes written per second by np.copyto
    between two arrays of nbytes (default 256 MiB, larger than CPU caches), on one thread."""
    if F._check_positive_int(nbytes, "nbytes") < 4:
        raise ValueError(f"nbytes must be at least 4 (one float32 value), got {nbytes}")
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.zeros_like(src)                  # both touched once already: no page faults in the timing
    return 2 * src.nbytes / (median_ms(lambda: np.copyto(dst, src), repeats) / 1e3)


def peak_extra_memory(x, dy, gamma, beta, forward=None, backward=None):
    """Peak bytes a training step (forward + backward) allocates beyond its outputs y and dx, measured with
    tracemalloc (NumPy reports its allocations to it); returns (bytes, in tensors). forward(x, gamma, beta)
    returns (y, cache) and backward(dy, cache) returns (dx, dgamma, dbeta): by default bnlib's
    F.batch_norm_forward and F.batch_norm_backward. One untraced step runs first: a first call compiles
    numba's kernels, whose allocations are not the step's."""
    forward = F.batch_norm_forward if forward is None else forward
    backward = F.batch_norm_backward if backward is None else backward
    backward(dy, forward(x, gamma, beta)[1])
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        y, cache = forward(x, gamma, beta)
        dx, _, _ = backward(dy, cache)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    extra = max(peak - y.nbytes - dx.nbytes, 0)
    return extra, extra / x.nbytes


CPU_SHAPES = [(64, 64, 28, 28), (128, 32, 32, 32), (32, 128, 14, 14), (256, 512), (4096, 1024)]


def _progress(iterable, enabled, **kwargs):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def roofline(nbytes, forward_s, step_s, copy_bw, copy_here_s):
    """Achieved bandwidth against the copy bandwidth (a CPU roofline), for a tensor of nbytes.

    Counts only the traffic no implementation can avoid: 2 tensors for a forward pass (read x,
    write y), 5 for a training step (also read x and dy, write dx). copy_bw: bytes/s of a copy
    out of cache (copy_bandwidth()); copy_here_s: seconds to copy this tensor, in the benchmark's
    cache state. Returns GB/s and the fraction of the copy bandwidth reached.
    """
    forward_gbs, step_gbs = 2 * nbytes / forward_s / 1e9, 5 * nbytes / step_s / 1e9
    return {"tensor_mb": nbytes / 1e6, "forward_gbs": forward_gbs, "step_gbs": step_gbs,
            "copy_gbs": copy_bw / 1e9, "copy_here_gbs": 2 * nbytes / copy_here_s / 1e9,
            "forward_of_copy": forward_gbs / (copy_bw / 1e9), "step_of_copy": step_gbs / (copy_bw / 1e9)}


def bench_cpu(shapes=None, repeats=15, threads=None, backends=None, seed=0, progress=True,
              copy_nbytes=256 << 20):
    """Time bnlib's CPU paths against PyTorch's CPU batch-norm kernels, float32, training mode.

    PyTorch's kernels are timed two ways: called directly ("torch": aten's native_batch_norm, and in a training
    step native_batch_norm_backward after it, the counterparts of bnlib.functional's two calls), and through
    torch.nn.functional.batch_norm and autograd, as a training step calls them ("torch (autograd)", its forward
    under torch.no_grad). Both run the same kernels, so the reference time of each shape (ratio 1) is the faster
    of the two medians, forward and step separately: on a noisy machine the better estimate of the kernels'
    time, and one that cannot flatter bnlib.

    Same process, same thread count for torch, numba and NumPy's BLAS (which the numpy backend's
    reductions call; set through threadpoolctl where it is installed, as scikit-learn installs it,
    else left at BLAS's own count: each row's blas_threads is None then), interleaved repeats
    (torch's kernels, torch through autograd, then each bnlib backend, in turn), medians; the three
    thread counts are restored on return. Returns one dict per (shape, implementation) with forward and forward+backward medians
    in ms, their ratios to torch, every repeat's time in ms in the order taken (forward_repeats_ms, step_repeats_ms:
    repeat i of every row ran in the same round, so rows can be compared repeat by repeat) and the minor page faults
    of each timed call (forward_repeat_faults, step_repeat_faults; None where the system does not count them), the
    achieved bandwidth against this machine's copy bandwidth
    (roofline(); the copy of copy_nbytes is measured once), and bnlib's peak extra memory for a
    training step. shapes: default CPU_SHAPES.
    """
    import torch
    shapes = list(CPU_SHAPES if shapes is None else shapes)      # (a generator is read once, here)
    for shape in shapes:                       # everything is checked before any timing or thread count changes
        if (not isinstance(shape, (tuple, list, np.ndarray)) or len(shape) < 2
                or not all(isinstance(n, numbers.Integral) and n >= 1 for n in shape)):
            raise ValueError(f"shapes must be a list of shapes (N, C, *spatial) with positive sizes, got {shape!r} "
                             f"in it")
        if np.prod(shape) // shape[1] < 2:     # torch refuses a training batch of one value per channel
            raise ValueError(f"shape {tuple(shape)} has 1 value per channel: batch statistics need at least 2")
    shapes = [tuple(int(n) for n in s) for s in shapes]
    repeats = F._check_positive_int(repeats, "repeats")
    if threads is not None:
        F._check_positive_int(threads, "threads (or None: torch's count)")
    if isinstance(backends, str):
        raise TypeError(f"backends must be a list of backend names, e.g. [{backends!r}], got the string {backends!r}")
    backends = list(backends or cpu.available_backends())
    unknown = [b for b in backends if b not in cpu.available_backends()]
    if unknown:
        raise ValueError(f"backends must be among {cpu.available_backends()} (here), got {unknown}")
    if F._check_positive_int(copy_nbytes, "copy_nbytes") < 4:
        raise ValueError(f"copy_nbytes must be at least 4 (one float32 value), got {copy_nbytes}")
    torch_threads = torch.get_num_threads()
    numba_threads = cpu.numba.get_num_threads() if cpu.numba is not None else None
    threads = int(threads or torch_threads)
    copy_bw = copy_bandwidth(copy_nbytes)
    rng = np.random.default_rng(seed)
    rows = []
    previous = cpu.get_backend()
    try:
        torch.set_num_threads(threads)
        if cpu.numba is not None:
            cpu.numba.set_num_threads(min(threads, cpu.numba.config.NUMBA_NUM_THREADS))
        try:
            import threadpoolctl
            blas_seen = any(info["user_api"] == "blas" for info in threadpoolctl.threadpool_info())
        except ImportError:
            threadpoolctl, blas_seen = None, False
        blas_threads = threads if blas_seen else None
        with (threadpoolctl.threadpool_limits(limits=threads, user_api="blas") if blas_seen
              else contextlib.nullcontext()):
            for shape in _progress(shapes, progress, desc="CPU benchmark", unit="shape"):
                x = rng.standard_normal(shape, dtype=np.float32)
                dy = rng.standard_normal(shape, dtype=np.float32)
                c = shape[1]
                gamma, beta = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.standard_normal(c, dtype=np.float32)
                xt = torch.from_numpy(x).requires_grad_()
                gt, bt = torch.from_numpy(gamma).requires_grad_(), torch.from_numpy(beta).requires_grad_()
                dyt = torch.from_numpy(dy)

                xk, gk, bk = torch.from_numpy(x), torch.from_numpy(gamma), torch.from_numpy(beta)   # no autograd

                def kernel_forward():
                    torch.ops.aten.native_batch_norm(xk, gk, bk, None, None, True, 0.1, 1e-5)

                def kernel_step():
                    _, mean, invstd = torch.ops.aten.native_batch_norm(xk, gk, bk, None, None, True, 0.1, 1e-5)
                    torch.ops.aten.native_batch_norm_backward(dyt, xk, gk, None, None, mean, invstd, True, 1e-5,
                                                              [True, True, True])

                def torch_forward():
                    with torch.no_grad():
                        torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True)

                def torch_step():
                    xt.grad = gt.grad = bt.grad = None
                    torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True).backward(dyt)

                def bnlib_pair(name):
                    def forward():
                        cpu.set_backend(name)
                        F.batch_norm_forward(x, gamma, beta)

                    def step():
                        cpu.set_backend(name)
                        _, cache = F.batch_norm_forward(x, gamma, beta)
                        F.batch_norm_backward(dy, cache)
                    return forward, step

                impls = {"torch": (kernel_forward, kernel_step), "torch (autograd)": (torch_forward, torch_step)}
                impls.update({f"bnlib[{b}]": bnlib_pair(b) for b in backends})
                times = {name: ([], []) for name in impls}
                faults = {name: ([], []) for name in impls}     # page faults of each timed call
                for fwd, step in impls.values():          # warm-up: compilation, caches, allocator
                    fwd(), step(), step()
                for _ in range(repeats):                    # interleaved, so drift hits everyone alike
                    for name, (fwd, step) in impls.items():
                        for k, fn in enumerate((fwd, step)):
                            seconds, met = _seconds_and_faults(fn)
                            times[name][k].append(seconds)
                            faults[name][k].append(met)
                out = np.empty_like(x)
                copy_here_s = float(np.median([_seconds(lambda: np.copyto(out, x)) for _ in range(repeats)]))
                base_f, base_s = (min(float(np.median(times[name][k])) for name in ("torch", "torch (autograd)"))
                                  for k in (0, 1))           # the faster way of calling the same kernels
                for name, (tf, ts) in times.items():
                    row = {"shape": list(shape), "impl": name, "threads": threads, "blas_threads": blas_threads,
                           "forward_ms": 1e3 * float(np.median(tf)), "step_ms": 1e3 * float(np.median(ts)),
                           "forward_ratio": float(np.median(tf)) / base_f, "step_ratio": float(np.median(ts)) / base_s,
                           "forward_repeats_ms": [1e3 * t for t in tf], "step_repeats_ms": [1e3 * t for t in ts],
                           "forward_repeat_faults": faults[name][0], "step_repeat_faults": faults[name][1]}
                    row.update(roofline(x.nbytes, float(np.median(tf)), float(np.median(ts)), copy_bw, copy_here_s))
                    if name.startswith("bnlib["):
                        cpu.set_backend(name[6:-1])
                        row["extra_bytes"], row["extra_tensors"] = peak_extra_memory(x, dy, gamma, beta)
                    rows.append(row)
    finally:
        cpu.set_backend(previous)
        torch.set_num_threads(torch_threads)
        if numba_threads is not None:
            cpu.numba.set_num_threads(numba_threads)
    return rows


def format_table(rows) -> str:
    """The benchmark as a table: times, ratios to torch, achieved GB/s against the copy bandwidth."""
    lines = []
    if rows and "copy_gbs" in rows[0]:
        lines.append(f"copy bandwidth (np.copyto, out of cache, one thread): {rows[0]['copy_gbs']:.1f} GB/s; "
                     "GB/s below count the unavoidable traffic (forward 2 tensors, step 5)")
    lines.append(f"{'shape':>18} {'implementation':>16} {'fwd ms':>8} {'fwd/torch':>9} {'fwd+bwd ms':>10} "
                 f"{'step/torch':>10} {'step GB/s':>9} {'of copy':>7} {'extra mem':>9}")
    for r in rows:
        extra = f"{r['extra_tensors']:.2f}x" if "extra_tensors" in r else "-"
        gbs = f"{r['step_gbs']:9.1f} {r['step_of_copy']:7.0%}" if "step_gbs" in r else f"{'-':>9} {'-':>7}"
        lines.append(f"{str(tuple(r['shape'])):>18} {r['impl']:>16} {r['forward_ms']:8.3f} {r['forward_ratio']:9.2f} "
                     f"{r['step_ms']:10.3f} {r['step_ratio']:10.2f} {gbs} {extra:>9}")
    return "\n".join(lines)


def environment() -> dict:
    import torch
    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if cpu.numba is not None:
        info["numba"] = cpu.numba.__version__
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:                                   # the last-level cache, where Linux reports it
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            info["l3_cache"] = f.read().strip()
    except OSError:
        pass
    return info


def write_recording(path, env, rows, partial=False):
    """Write a benchmark's recording as JSON: {"environment": env, "partial": partial, "results": rows}.
    partial=True marks a run still going (or cut short): it keeps the cases finished so far."""
    with open(path, "w") as f:
        json.dump({"environment": env, "partial": partial, "results": rows}, f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnlib.bench",
                                     description="bnlib batch norm against PyTorch's kernels, as ratios.")
    parser.add_argument("--cpu", action="store_true", help="NumPy/numba paths vs torch on the CPU (the default)")
    parser.add_argument("--gpu", action="store_true", help="CuPy kernels vs torch on the GPU (chapter 05)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per case (default 15)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch, numba and NumPy's BLAS (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="also write the results and the environment as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--compile", action="store_true", help="--gpu: also time torch.compile'd batch norm")
    parser.add_argument("--portable", action="store_true",
                        help="--gpu only: also time chapters 02-03's portable code on CuPy arrays")
    parser.add_argument("--compile-budget", type=float, default=None, metavar="S",
                        help="--gpu --compile: stop compiling new cases after S seconds in all (default 60)")
    parser.add_argument("--modules", action="store_true",
                        help="--gpu only: also time torch.nn vs bnlib.nn BatchNorm modules through autograd")
    parser.add_argument("--launchers", nargs="+", default=[], choices=["driver", "cupy"],
                        help="--gpu only: also time bnlib through these launch paths of bnlib.cuda")
    parser.add_argument("--l2-chunks", nargs="+", type=float, default=[], metavar="MiB",
                        help="--gpu only: also time bnlib with channel chunks for the L2 cache at these working "
                             "sets (MiB: the bytes a chunk's second pass reads and writes; see "
                             "bnlib.cuda.L2_CHUNK_BYTES)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.modules and not args.gpu:
        parser.error("--modules times the GPU modules and needs --gpu (the CPU benchmark has no module rows)")
    if args.launchers and not args.gpu:
        parser.error("--launchers chooses how CUDA kernels are launched and needs --gpu")
    if args.portable and not args.gpu:
        parser.error("--portable times CuPy arrays and needs --gpu")
    if args.l2_chunks and not args.gpu:
        parser.error("--l2-chunks sets the CUDA kernels' channel chunks and needs --gpu")
    if any(not (mb > 0 and np.isfinite(mb)) for mb in args.l2_chunks):
        parser.error(f"--l2-chunks sizes must be > 0 MB, got {' '.join(f'{mb:g}' for mb in args.l2_chunks)}")
    if (args.compile or args.compile_budget is not None) and not args.gpu:
        parser.error("--compile and --compile-budget time torch.compile on the GPU and need --gpu")
    if args.compile_budget is not None and not args.compile_budget > 0:
        parser.error(f"--compile-budget must be > 0 seconds, got {args.compile_budget}")
    if args.threads is not None and (args.threads < 1 or args.gpu):
        parser.error(f"--threads sets the CPU benchmark's threads and must be >= 1, got {args.threads}"
                     if args.threads < 1 else "--threads sets the CPU benchmark's threads; --gpu does not use it")
    if args.json is not None:                       # before the run, not after it: the results would be lost
        folder = os.path.dirname(os.path.abspath(args.json))
        if not args.json or args.json.endswith(("/", os.sep)) or os.path.isdir(args.json):
            parser.error(f"--json {args.json!r}: give a file name (the JSON is written to it), not a folder")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(f"--json {args.json}: the folder {folder} does not exist or is not writable")
        if os.path.exists(args.json) and not os.access(args.json, os.W_OK):
            parser.error(f"--json {args.json}: the file exists and is not writable")
    if args.gpu:
        from bnlib import cuda                      # chapter 05; needs CuPy and a CUDA device
        if not cuda.available():
            print("--gpu: no CUDA device visible to CuPy (is CuPy installed and a GPU present?)", file=sys.stderr)
            return 2
        from bnlib import bench as gpu                # chapter 05 appends bench_gpu to bnlib.bench
        env = gpu.gpu_environment()

        def save_partial(rows):                     # a run cut short still leaves the cases it finished
            if args.json:
                write_recording(args.json, env, rows, partial=True)
        rows = gpu.bench_gpu(repeats=args.repeats, progress=not args.no_progress, compile=args.compile,
                             compile_budget_s=60.0 if args.compile_budget is None else args.compile_budget,
                             modules=args.modules,
                             launchers=tuple(args.launchers), on_rows=save_partial, portable=args.portable,
                             l2_chunks=tuple(args.l2_chunks))
        table = gpu.format_gpu_table(rows)
    else:
        rows = bench_cpu(repeats=args.repeats, threads=args.threads, progress=not args.no_progress)
        env, table = environment(), format_table(rows)
    print(table)
    if args.json:
        write_recording(args.json, env, rows)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__" and "__file__" in globals():   # `python -m bnlib.bench`, not the notebook
    sys.exit(main())


GPU_SHAPES = [(256, 64, 56, 56), (256, 256, 14, 14), (64, 128, 28, 28), (32, 32, 112, 112), (128, 1024, 7, 7),
              (8192, 1024)]
GPU_CONFIGS = [("float32", "NCHW"), ("float32", "NHWC"), ("float16", "NHWC"), ("bfloat16", "NCHW"),
               ("bfloat16", "NHWC")]


def gpu_copy_bandwidth(nbytes=1 << 30, repeats=10):
    """Measured GPU device-to-device copy bandwidth in bytes/s (bytes read + bytes written per second)."""
    import torch
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(repeats + 2):
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(stop) / 1e3)
    return 2 * nbytes / float(np.median(times))


def _compiled_batch_norm(torch):
    """One torch.compile'd training batch norm, reused for every case (dynamic=False: one graph per
    shape, dtype and layout, as a model would see them); dynamo's recompile limit raised to match."""
    import torch._dynamo
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))

    def bn(x, w, b):
        return torch.nn.functional.batch_norm(x, None, None, w, b, training=True)

    return torch.compile(bn, dynamic=False)


def _module_pair(torch, shape, w, b):
    """torch.nn.BatchNorm1d/2d/3d and bnlib.nn's drop-in of the same class for `shape`, in training
    mode, with float32 parameters (as autocast keeps them) copied from w and b: both compute the
    parameter gradients and update their running statistics, through autograd."""
    from bnlib import nn as bnn
    name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    pair = []
    for cls in (getattr(torch.nn, name), getattr(bnn, name)):
        m = cls(shape[1], device="cuda")
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
        pair.append(m.train())
    return pair


def _with_setting(cuda, name, value, fn):
    """fn with bnlib.cuda's module setting `name` (LAUNCHER: the launch path; L2_CHUNK_BYTES: the channel
    chunks for the L2 cache; MIN_VECTORS_PER_THREAD and PLANES_MIN_BYTES: the grid and the walk) set to
    value during the call."""
    def call(i):
        saved = getattr(cuda, name)
        setattr(cuda, name, value)
        try:
            fn(i)
        finally:
            setattr(cuda, name, saved)
    return call


def _ratio_quartiles(times, base_times):
    """The 25th, 50th and 75th percentiles of times[r] / base_times[r], repeat by repeat (bench_gpu times every
    implementation once per round, so repeat r of two rows ran in the same round); None unless both hold the same
    number of positive times. The spread of one run: it says how far a single median ratio can be trusted."""
    a, b = np.asarray(times, dtype=float), np.asarray(base_times, dtype=float)
    if a.size == 0 or a.shape != b.shape or not (a > 0).all() or not (b > 0).all():
        return None
    return [float(q) for q in np.percentile(a / b, [25, 50, 75])]


def _other_plans(plan_with, default, min_vectors=(), planes_min_bytes=()):
    """The rows of bench_gpu's grid sweep for one case: [(row name, min_vectors k, planes_min_bytes b, plan,
    [other values of k that give the same plan])], one per distinct plan (walk and grid) that differs from
    the default's. plan_with(k, b) is the case's plan under those settings; default = (k0, b0), the
    settings in force. The settings are tried in order: each k of min_vectors with b0 (rows "bnlib [>=8
    vec]"), then each b of planes_min_bytes with k0 ("bnlib [planes >=0 B]") and with each other k ("bnlib
    [planes >=0 B, >=8 vec]")."""
    k0, b0 = default
    first = plan_with(k0, b0)
    given = {(first.walk, first.grid): None}           # (walk, grid): the row that times it (None: the default)
    ks = sorted({int(k) for k in min_vectors})
    settings = [(k, b0) for k in ks] + [(k, int(b)) for b in sorted({int(b) for b in planes_min_bytes})
                                        for k in [k0] + [k for k in ks if k != k0]]
    rows = {}
    for k, b in settings:
        pl = plan_with(k, b)
        key = (pl.walk, pl.grid)
        if key in given:                               # timed already: not again
            same = rows.get(given[key])
            if same is not None and k != same[1] and k not in same[4]:
                same[4].append(k)
            continue
        name = given[key] = (f"bnlib [>={k} vec]" if b == b0 else f"bnlib [planes >={b} B]" if k == k0
                             else f"bnlib [planes >={b} B, >={k} vec]")
        rows[name] = (name, k, b, pl, [])
    return list(rows.values())


def bench_gpu(shapes=GPU_SHAPES, configs=GPU_CONFIGS, repeats=20, rotate=4, progress=True, compile=False,
              compile_budget_s=60.0, modules=False, launchers=(), on_rows=None, portable=False, l2_chunks=(),
              min_vectors=(), planes_min_bytes=()):
    """bnlib.cuda's kernels (forward_torch, backward_torch) against torch.nn.functional.batch_norm
    (eager, and with compile=True also torch.compile'd) on the same GPU, in one process.

    The "torch" step runs through autograd (batch_norm(...).backward(dy), weight and bias not
    requiring gradients), the "bnlib" step calls forward_torch and backward_torch directly (no
    autograd, and it also computes dgamma and dbeta): not the same work on the host. modules=True
    adds the like-for-like pair, both through autograd: rows "torch.nn" (torch.nn.BatchNorm1d/2d)
    and "bnlib.nn" (bnlib.nn's drop-in, chapter 06), each a module in training mode whose weight
    and bias require gradients and whose running statistics are updated; their rows also carry
    "step_ratio_vs_module", the step time over torch.nn's.

    CUDA events on torch's current stream, warm-up, interleaved repeats, medians; `rotate` different
    inputs per case, used in turn, and a 256 MB write between timed calls (untimed) that evicts the
    L2 cache, so that no timing runs on data a previous call left in L2. forward_ms and step_ms time
    each call as queued right after that write: where issuing the call takes the host longer than
    the write runs, they include host time. forward_device_ms and step_device_ms time the same calls
    on the GPU alone: the flush there reads a 256 MB buffer (a write leaves up to the L2's size of
    dirty lines, written back during the timed call), then a spin kernel (torch.cuda._sleep) holds
    the stream for twice the call's host time, so the whole call is queued before the start event
    runs: kernels and the gaps between them, no host time (None where torch has no _sleep). Each row gives the 8-pass
    and 5-pass DRAM floors of a training step (passes x tensor bytes / copy bandwidth), the fraction
    of the 8-pass floor reached, kernel launches per step (bnlib) and the peak extra memory of a step
    (torch's allocator and CuPy's pool, beyond the inputs; bnlib's adds the scratch its own step requests, per
    thread and stream, not the buffers that earlier cases left cached). Every row also keeps each repeat's times
    (forward_repeats_ms, step_repeats_ms; step_device_repeats_ms for the GPU-alone steps kept) and the quartiles
    of its step time over torch's, repeat by repeat (step_ratio_quartiles; step_device_ratio_quartiles where no
    GPU-alone sample was dropped): the spread within the run, which one median hides.
    Compiling stops after `compile_budget_s` seconds; later cases then have no compiled row.
    `launchers` (e.g. ("cupy",)) adds rows "bnlib [cupy]" (and "bnlib.nn [cupy]"): the same calls
    launched through another path of bnlib.cuda (LAUNCHER); every bnlib row records its launcher.
    on_rows, if given, is called with the rows so far after each case (to save partial results).
    portable=True adds the row "cupy portable": chapters 02-03's array-module code run unchanged on
    CuPy views of the same tensors (float32 and float16; bnlib's CuPy route takes no bfloat16), one CuPy operation
    per line, on torch's stream: the measured cost of not writing kernels. An extra row whose warm-up
    raises (any but "torch" and "bnlib") is reported and left out of that case.
    l2_chunks (working sets in MB of 2**20 bytes, e.g. (24, 32); see bnlib.cuda.L2_CHUNK_BYTES) adds a
    row "bnlib [L2 24 MiB]" per size to each case whose forward or backward would walk channel chunks
    at that size (planes walks of tensors larger than a chunk): bnlib's step with cuda.L2_CHUNK_BYTES
    set. Each such row carries the size, the number of chunks of the forward and of the backward, its
    step time over the "bnlib" row's (step_ratio_vs_bnlib; that row runs with the L2_CHUNK_BYTES the
    environment records, None or 0: no chunks, unless BNLIB_L2_CHUNK_MB is set) and, with GPU-alone
    times, the same ratio of those (step_device_ratio_vs_bnlib) and the GPU-alone step in passes of the
    tensor at the copy bandwidth (step_device_passes: 8 at the 8-pass floor, 5 at the 5-pass floor).
    min_vectors (integers >= 1, e.g. (4, 8, 16); see bnlib.cuda.MIN_VECTORS_PER_THREAD) adds a row
    "bnlib [>=8 vec]" per value to each case whose grid it changes: bnlib's step with
    cuda.MIN_VECTORS_PER_THREAD set, so that a first-pass thread loads about that many vectors of x.
    A value whose grid a smaller one already gave adds no row: it is listed in that row's
    min_vectors_same. Such a row carries the value, the walk, the blocks of its grid and of the
    "bnlib" row's (blocks, blocks_default), the kernels one of its steps launched (kernels), and the same
    ratios to the "bnlib" row as a chunk row.
    planes_min_bytes (integers >= 0, e.g. (0,); see bnlib.cuda.PLANES_MIN_BYTES) adds a row
    "bnlib [planes >=0 B]" per value to each case whose walk or grid it changes (NCHW planes smaller than
    the default's 4096 bytes, walked as planes instead of columns), and one per value of min_vectors with
    it ("bnlib [planes >=0 B, >=8 vec]"), each distinct plan timed once, as above; these rows also carry
    planes_min_bytes.
    """
    import time

    import torch
    from bnlib import cuda
    unknown = [name for name in launchers if name not in ("driver", "cupy")]
    if unknown:
        raise ValueError(f"launchers must be 'driver' or 'cupy', got {unknown}")
    if any(not (mb > 0 and np.isfinite(mb)) for mb in l2_chunks):
        raise ValueError(f"l2_chunks must be sizes in MB > 0, got {tuple(l2_chunks)}")
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in min_vectors):
        raise ValueError(f"min_vectors must be integers >= 1, got {tuple(min_vectors)}")
    if any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 0 for b in planes_min_bytes):
        raise ValueError(f"planes_min_bytes must be integers >= 0, got {tuple(planes_min_bytes)}")
    try:
        import cupy
        pool = cupy.get_default_memory_pool()
    except ImportError:
        pool = None
    bandwidth = gpu_copy_bandwidth()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")   # larger than any L2 (50 MB on an H100; the H200 reported 60 MiB)
    compiled = _compiled_batch_norm(torch) if compile else None
    compile_spent = 0.0

    def timed(fn):
        flush.fill_(1)                                 # untimed: evicts what the last call cached
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3

    sleep = getattr(torch.cuda, "_sleep", None)        # a spin kernel of a given number of GPU cycles
    cycles_per_s = None
    try:                                               # the GPU-alone times are extra: never lose the rest
        if sleep is not None:
            sleep(1000)
            start.record()
            sleep(10_000_000)
            stop.record()
            stop.synchronize()
            cycles_per_s = 10_000_000 / (start.elapsed_time(stop) / 1e3)
    except Exception as exc:
        print(f"no GPU-alone times: calibrating torch.cuda._sleep failed: {type(exc).__name__}: {exc}")

    def host_s(fn):
        """The host time of issuing fn, the GPU kept busy meanwhile (so that no call waits for it)."""
        sleep(int(0.002 * cycles_per_s))
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        return host

    def timed_device(fn, hold_s):
        """GPU time of fn alone, or None when issuing it took the host longer than the hold (the GPU
        may then have waited for the host inside the timed span)."""
        flush.sum()                                    # untimed: a read evicts L2 without leaving dirty lines
        sleep(int(hold_s * cycles_per_s))              # the host queues all of fn before the start event runs
        t0 = time.perf_counter()
        start.record()
        fn()
        stop.record()
        issued = time.perf_counter() - t0
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 if issued < hold_s else None

    def peak_extra_mb(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, pool_base = torch.cuda.memory_allocated(), pool.total_bytes() if pool else 0
        fn()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base + ((pool.total_bytes() - pool_base) if pool else 0)
        return extra / 1e6

    rows = []
    cases = [(s, d, lay) for s in shapes for d, lay in configs if not (len(s) == 2 and lay == "NHWC")]
    try:
        from tqdm.auto import tqdm
        cases_iter = tqdm(cases, desc="GPU benchmark", disable=not progress)
    except ImportError:
        cases_iter = cases
    for shape, dtype, layout in cases_iter:
        tdtype = getattr(torch, dtype)
        c = shape[1]
        fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
        xs = [torch.randn(shape, device="cuda", dtype=tdtype).contiguous(memory_format=fmt) for _ in range(rotate)]
        dys = [torch.randn(shape, device="cuda", dtype=tdtype).contiguous(memory_format=fmt) for _ in range(rotate)]
        w = torch.rand(c, device="cuda") + 0.5                 # float32 parameters, as autocast keeps them
        b = torch.randn(c, device="cuda")
        xs_req = [x.detach().requires_grad_() for x in xs]     # same storage: same cache state for everyone

        def torch_fwd(i, fn=torch.nn.functional.batch_norm):
            with torch.no_grad():
                fn(xs[i], None, None, w, b, training=True)

        def torch_step(i):
            xs_req[i].grad = None
            torch.nn.functional.batch_norm(xs_req[i], None, None, w, b, training=True).backward(dys[i])

        def compiled_fwd(i):                                   # the training graph's forward: one
            compiled(xs_req[i], w, b)                          # compiled graph per case, not two

        def compiled_step(i):
            xs_req[i].grad = None
            compiled(xs_req[i], w, b).backward(dys[i])

        def bnlib_fwd(i):
            cuda.forward_torch(xs[i], w, b, 1e-5)

        def bnlib_step(i):
            _, mean, _, inv_std = cuda.forward_torch(xs[i], w, b, 1e-5)
            cuda.backward_torch(dys[i], xs[i], mean, inv_std, w)

        impls = {"torch": (torch_fwd, torch_step), "bnlib": (bnlib_fwd, bnlib_step)}
        if modules:
            for name, m in zip(("torch.nn", "bnlib.nn"), _module_pair(torch, shape, w, b)):
                def module_fwd(i, m=m):
                    with torch.no_grad():
                        m(xs[i])

                def module_step(i, m=m):
                    xs_req[i].grad = None
                    m.zero_grad(set_to_none=True)
                    m(xs_req[i]).backward(dys[i])

                impls[name] = (module_fwd, module_step)
        if portable and dtype in ("float32", "float16"):
            import cupy
            from bnlib import functional as bn_functional
            cxs, cdys = [cupy.from_dlpack(x) for x in xs], [cupy.from_dlpack(d) for d in dys]
            cw, cb = cupy.from_dlpack(w), cupy.from_dlpack(b)

            def portable_fwd(i):
                with cuda.cupy_stream(torch.cuda.current_stream()):
                    bn_functional.portable_batch_norm_forward(cxs[i], cw, cb)

            def portable_step(i):
                with cuda.cupy_stream(torch.cuda.current_stream()):
                    _, cache = bn_functional.portable_batch_norm_forward(cxs[i], cw, cb)
                    bn_functional.portable_batch_norm_backward(cdys[i], cache)

            impls["cupy portable"] = (portable_fwd, portable_step)
        for launcher in (name for name in launchers if name != cuda.LAUNCHER):
            for base in [k for k in ("bnlib", "bnlib.nn") if k in impls]:
                impls[f"{base} [{launcher}]"] = tuple(_with_setting(cuda, "LAUNCHER", launcher, fn) for fn in impls[base])
        chunking = {}                                  # name: (MB, chunks of the forward, of the backward)
        try:                                           # extra rows: never lose the others
            _, (kr, kc, kl) = cuda._torch_input(xs[0], "x")
            for mb in l2_chunks:
                nbytes = int(mb * 2 ** 20)
                fwd_plan, bwd_plan = (cuda.plan(kr, kc, kl, dtype, True, cuda._sm_count(xs[0].device.index),
                                                cuda._chunk_bytes(a, nbytes)) for a in (2, 3))
                if fwd_plan.chunks or bwd_plan.chunks:
                    name = f"bnlib [L2 {mb:g} MiB]"
                    impls[name] = tuple(_with_setting(cuda, "L2_CHUNK_BYTES", nbytes, fn) for fn in impls["bnlib"])
                    chunking[name] = (mb, len(cuda._pieces(fwd_plan)), len(cuda._pieces(bwd_plan)))
        except Exception as exc:
            print(f"no L2-chunk rows for {shape} {dtype} {layout}: {type(exc).__name__}: {exc}")
        grids = {}                 # name: (min_vectors, planes_min_bytes, walk, blocks, the "bnlib" row's, same plan)
        try:                                           # extra rows: never lose the others
            _, (kr, kc, kl) = cuda._torch_input(xs[0], "x")
            sms = cuda._sm_count(xs[0].device.index)
            default = (cuda._min_vectors(), cuda._planes_min_bytes())

            def plan_with(k, b):
                return cuda.plan(kr, kc, kl, dtype, True, sms, cuda._chunk_bytes(2), min_vectors=k, planes_min_bytes=b)
            blocks_default = int(np.prod(plan_with(*default).grid))
            # (no loop name b: b is the bias tensor that torch's closures above read when they run, after this loop)
            for name, vectors, min_bytes, other, same in _other_plans(plan_with, default, min_vectors, planes_min_bytes):
                impls[name] = tuple(_with_setting(cuda, "PLANES_MIN_BYTES", min_bytes,
                                                  _with_setting(cuda, "MIN_VECTORS_PER_THREAD", vectors, fn))
                                    for fn in impls["bnlib"])
                grids[name] = (vectors, min_bytes, other.walk, int(np.prod(other.grid)), blocks_default, same)
        except Exception as exc:
            print(f"no grid rows for {shape} {dtype} {layout}: {type(exc).__name__}: {exc}")
        if compiled is not None and compile_spent < compile_budget_s:
            t0 = time.perf_counter()
            try:
                for i in range(rotate):
                    compiled_fwd(i), compiled_step(i)
                torch.cuda.synchronize()
                impls["torch.compile"] = (compiled_fwd, compiled_step)
            except Exception as exc:                           # report, keep benchmarking the others
                print(f"torch.compile failed on {shape} {dtype} {layout}: {type(exc).__name__}: {exc}")
            compile_spent += time.perf_counter() - t0
        torch.cuda.synchronize()
        for name in list(impls):                       # warm-up; an extra row that fails is reported and
            try:                                       # dropped, so that it cannot cost the other rows
                for i in range(rotate):
                    impls[name][0](i), impls[name][1](i)
                torch.cuda.synchronize()
            except Exception as exc:
                if name in ("torch", "bnlib"):
                    raise
                print(f"dropped {name} on {shape} {dtype} {layout}: {type(exc).__name__}: {exc}")
                del impls[name]
        times = {k: ([], []) for k in impls}
        device_times = {k: ([], []) for k in impls}
        hosts, holds, dropped = {}, {}, {k: 0 for k in impls}
        if cycles_per_s is not None:                   # the slower of 2 host times; hold twice that, >= 0.2 ms
            try:
                hosts = {name: tuple(max(host_s(lambda: fn(0)) for _ in range(2)) for fn in pair)
                         for name, pair in impls.items()}
                holds = {name: tuple(max(2e-4, 2 * h) for h in pair) for name, pair in hosts.items()}
            except Exception as exc:                   # report; the queued times go on
                print(f"no GPU-alone times: measuring host times failed: {type(exc).__name__}: {exc}")
                hosts, holds, cycles_per_s = {}, {}, None
        for r in range(repeats):
            i, j = r % rotate, (r + rotate // 2) % rotate     # the step runs on other data than the forward
            for name, (fwd, step) in impls.items():
                times[name][0].append(timed(lambda: fwd(i)))
                times[name][1].append(timed(lambda: step(j)))
                if holds:
                    try:
                        for k, (fn, hold) in enumerate([(lambda: fwd(i), holds[name][0]),
                                                        (lambda: step(j), holds[name][1])]):
                            t = timed_device(fn, hold)
                            if t is None:
                                dropped[name] += 1
                            else:
                                device_times[name][k].append(t)
                    except Exception as exc:           # report once; the queued times go on
                        print(f"GPU-alone times dropped: {type(exc).__name__}: {exc}")
                        holds, cycles_per_s = {}, None
        launch_counts, launched, scratch = {}, {}, {}
        real_launch = cuda._launch
        for name in [k for k in impls if k.startswith("bnlib")]:
            launches = []
            cuda._launch = lambda *a: (launches.append(a[1]), real_launch(*a))
            try:
                with cuda._requested_workspace() as requested:     # per buffer: one per host thread (torch runs
                    impls[name][1](0)                              # bnlib.nn's backward on its autograd thread)
            finally:
                cuda._launch = real_launch
            # the scratch this case's step asks for (per buffer, the largest of its calls): the cached buffer a
            # thread keeps is the largest any earlier case needed, so counting it would charge this case for another's
            launch_counts[name], launched[name], scratch[name] = len(launches), launches, sum(requested.values())
        nbytes = xs[0].numel() * xs[0].element_size()
        floor8, floor5 = 8 * nbytes / bandwidth, 5 * nbytes / bandwidth
        base = [float(np.median(t)) for t in times["torch"]]
        base_d = [float(np.median(t)) for t in device_times["torch"]] if all(device_times["torch"]) else None
        for name, (tf, ts) in times.items():
            f, s = float(np.median(tf)), float(np.median(ts))
            extra = peak_extra_mb(lambda: impls[name][1](0))
            if name in scratch:
                extra += scratch[name] / 1e6
            rows.append({"shape": list(shape), "dtype": dtype, "layout": layout, "impl": name,
                         "forward_ms": 1e3 * f, "step_ms": 1e3 * s, "forward_ratio": f / base[0],
                         "step_ratio": s / base[1], "floor_ms": 1e3 * floor8, "floor5_ms": 1e3 * floor5,
                         "floor_fraction": floor8 / s, "tensor_mb": nbytes / 1e6,
                         "copy_bandwidth_gbs": bandwidth / 1e9, "peak_extra_mb": extra,
                         "launches_per_step": launch_counts.get(name), "repeats": repeats, "rotate": rotate,
                         "forward_repeats_ms": [1e3 * t for t in tf], "step_repeats_ms": [1e3 * t for t in ts],
                         "step_ratio_quartiles": _ratio_quartiles(ts, times["torch"][1])})
            if holds and all(device_times[name]) and base_d:
                fd, sd = (float(np.median(t)) for t in device_times[name])
                rows[-1].update(forward_device_ms=1e3 * fd, step_device_ms=1e3 * sd,
                                step_device_ratio=sd / base_d[1], floor_fraction_device=floor8 / sd,
                                host_forward_ms=1e3 * hosts[name][0], host_step_ms=1e3 * hosts[name][1],
                                device_samples_dropped=dropped[name],
                                step_device_repeats_ms=[1e3 * t for t in device_times[name][1]])
                if not dropped[name] and not dropped["torch"]:       # every round kept: repeats still paired
                    rows[-1]["step_device_ratio_quartiles"] = _ratio_quartiles(device_times[name][1],
                                                                               device_times["torch"][1])
            if name.startswith("bnlib"):
                tag = name.split("[")[1].rstrip("]") if "[" in name else ""
                rows[-1]["launcher"] = tag if tag in ("driver", "cupy") else cuda.LAUNCHER
            if name in chunking:
                mb, nf, nb_ = chunking[name]
                rows[-1].update(l2_chunk_mb=mb, chunks_forward=nf, chunks_backward=nb_)
            if name in grids:
                vectors, min_bytes, walk, blocks, blocks_default, same = grids[name]
                rows[-1].update(min_vectors=vectors, min_vectors_same=same, planes_min_bytes=min_bytes, walk=walk, blocks=blocks,
                                blocks_default=blocks_default, kernels=launched.get(name))
            if name in chunking or name in grids:
                rows[-1]["step_ratio_vs_bnlib"] = s / float(np.median(times["bnlib"][1]))
                if "step_device_ms" in rows[-1] and all(device_times["bnlib"]):
                    sd = rows[-1]["step_device_ms"] / 1e3
                    rows[-1].update(step_device_ratio_vs_bnlib=sd / float(np.median(device_times["bnlib"][1])),
                                    step_device_passes=8 * sd / floor8)
            if name in ("torch.nn", "bnlib.nn") and "torch.nn" in times:
                rows[-1]["step_ratio_vs_module"] = s / float(np.median(times["torch.nn"][1]))
        del xs, dys, xs_req
        if on_rows is not None:
            on_rows(rows)
    return rows


def format_gpu_table(rows) -> str:
    """The GPU rows as a table; step/torch is the step time over torch eager's (lower is better)."""
    device = any(r.get("step_device_ms") for r in rows)       # recordings from the third design on
    lines = [f"{'shape':>20} {'dtype':>8} {'layout':>6} {'impl':>16} {'fwd ms':>8} {'step ms':>8} "
             f"{'step/torch':>10} {'8-pass ms':>9} {'of floor':>8} {'launches':>8} {'extra MB':>9}"
             + (f" {'GPU-alone step ms':>17} {'host step ms':>12}" if device else "")]
    for r in rows:
        launches = r.get("launches_per_step")
        extra = r.get("peak_extra_mb")
        lines.append(f"{str(tuple(r['shape'])):>20} {r['dtype']:>8} {r['layout']:>6} {r['impl']:>16} "
                     f"{r['forward_ms']:8.3f} {r['step_ms']:8.3f} {r['step_ratio']:10.2f} "
                     f"{r['floor_ms']:9.3f} {r['floor_fraction']:8.0%} {'' if launches is None else launches:>8} "
                     f"{'' if extra is None else f'{extra:.1f}':>9}"
                     + (f" {r.get('step_device_ms') or float('nan'):17.3f} {r.get('host_step_ms') or float('nan'):12.3f}"
                        if device else ""))
    return "\n".join(lines)

GOAL_FAST_SHAPES = ((256, 64, 56, 56), (32, 32, 112, 112))      # the shapes with a >= 2.5x goal (float32 NCHW)


def gpu_goals(rows, time="step_ms", tie=0.05) -> list:
    """The goals set for the GPU kernels (chapter 05, "The goals"), evaluated on one recording's rows. Returns a list of
    (goal, met, of, misses): how many of the cases a goal covers meet it, and the names of those that do
    not. time: "step_ms" (each call timed after a cache flush: host time included where issuing the
    call outlasts the flush) or "step_device_ms" (GPU alone, recorded from design 3 on). A case is one
    that has rows for bnlib and torch eager; where one of them lacks that time, the case counts as a
    miss, marked "(no time)". torch's best is the faster of eager and torch.compile where the compiled
    row has the time (eager alone otherwise); within `tie` of it counts as not slower (the chapter's
    rule for a single recording without spread)."""
    def by(impl):
        return {(tuple(r["shape"]), r["dtype"], r["layout"]): r for r in rows if r["impl"] == impl}

    ours, eager, compiled = by("bnlib"), by("torch"), by("torch.compile")
    keys = sorted(set(ours) & set(eager), key=lambda k: (k[2], k[1], -int(np.prod(k[0])), k[0]))
    timed = {k for k in keys if ours[k].get(time) and eager[k].get(time)}
    best = {k: min(eager[k][time], compiled[k][time]) if compiled.get(k, {}).get(time) else eager[k][time]
            for k in timed}
    conv32 = [k for k in keys if k[1:] == ("float32", "NCHW") and len(k[0]) == 4]
    largest = max((int(np.prod(k[0])) for k in keys), default=0)

    def goal(text, cases, ok, needs_time=True):
        met = [k for k in cases if (k in timed or not needs_time) and ok(k)]
        return (text, len(met), len(cases), [f"{k[0]} {k[1]} {k[2]}" + ("" if k in timed or not needs_time
                                                                        else " (no time)")
                                             for k in cases if k not in met])

    speedup = lambda k: eager[k][time] / ours[k][time]
    return [goal(f"never slower than torch's best (eager or torch.compile; within {tie:.0%} counts)", keys,
                 lambda k: ours[k][time] <= (1 + tie) * best[k]),
            goal("float32 NCHW convolution shapes >= 1.5x faster than eager", conv32, lambda k: speedup(k) >= 1.5),
            goal("float32 NCHW >= 2.5x on " + " and ".join(map(str, GOAL_FAST_SHAPES)),
                 [k for k in conv32 if k[0] in GOAL_FAST_SHAPES], lambda k: speedup(k) >= 2.5),
            goal(">= 80% of the 8-pass floor on tensors over 100 MB",
                 [k for k in keys if ours[k]["tensor_mb"] > 100], lambda k: ours[k]["floor_ms"] / ours[k][time] >= 0.8),
            goal("faster than the 8-pass floor on the largest shape, every configuration (L2 reuse)",
                 [k for k in keys if int(np.prod(k[0])) == largest], lambda k: ours[k][time] < ours[k]["floor_ms"]),
            goal("launches per step and peak extra memory recorded", keys, needs_time=False,
                 ok=lambda k: ours[k].get("launches_per_step") is not None and ours[k].get("peak_extra_mb") is not None)]


def format_gpu_goals(goals) -> str:
    """gpu_goals' list as lines: each goal, how many cases meet it, and the cases that miss it."""
    lines = []
    for text, met, of, misses in goals:
        lines.append(f"  {text:84s} met in {met:2d} of {of:2d}")
        if misses:
            lines.append("      missed: " + "; ".join(misses))
    return "\n".join(lines)


def gpu_environment() -> dict:
    """Card, date and versions of a GPU run (recorded with its results)."""
    import datetime

    import torch
    from bnlib import cuda
    env = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "design": cuda.KERNEL_DESIGN, "launcher": cuda.LAUNCHER, "l2_chunk_bytes": cuda.L2_CHUNK_BYTES,
           "l2_chunk_mb_env": os.environ.get("BNLIB_L2_CHUNK_MB"),
           "l2_bytes": getattr(torch.cuda.get_device_properties(0), "L2_cache_size", None),
           "torch": torch.__version__, "cuda_torch": torch.version.cuda, "numpy": np.__version__,
           "cudnn": torch.backends.cudnn.version(), "cudnn_enabled": torch.backends.cudnn.enabled,
           "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    try:
        import cupy
        env.update(cupy=cupy.__version__, cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                   driver=cupy.cuda.runtime.driverGetVersion())
    except ImportError:
        pass
    return env
