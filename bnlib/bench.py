# GENERATED FILE: do not edit.
# bnlib.bench is generated from chapters/04_numpy.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['SETTLE_S', 'median_ms', 'copy_bandwidth', 'CPU_SHAPES', 'peak_extra_memory', 'roofline', 'bench_cpu', 'format_table', 'environment', 'main']

import argparse
import datetime
import json
import os
import platform
import sys
import time
import tracemalloc

import numpy as np

from bnlib import cpu
from bnlib import functional as F

SETTLE_S = 0.003


def _seconds(fn):
    """Wall time of one call of fn, taken in steady state: fn first runs back to back for SETTLE_S,
    so that its own thread pool is awake and the previous implementation's pool (torch's and
    numba's OpenMP threads both spin for a while after their work) has gone idle, as it would be
    in a training loop that calls the same layer over and over."""
    start = time.perf_counter()
    while time.perf_counter() - start < SETTLE_S:
        fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ms(fn, repeats=7):
    """Median wall time of fn in milliseconds over `repeats` calls, each timed in steady state."""
    return 1e3 * float(np.median([_seconds(fn) for _ in range(repeats)]))


def copy_bandwidth(nbytes=256 << 20, repeats=5):
    """This machine's copy bandwidth in bytes/s: bytes read + bytes written per second by np.copyto
    between two arrays of nbytes (default 256 MiB, larger than CPU caches), on one thread."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.zeros_like(src)                  # both touched once already: no page faults in the timing
    return 2 * src.nbytes / (median_ms(lambda: np.copyto(dst, src), repeats) / 1e3)


CPU_SHAPES = [(64, 64, 28, 28), (128, 32, 32, 32), (32, 128, 14, 14), (256, 512), (4096, 1024)]


def _progress(iterable, enabled, **kwargs):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def peak_extra_memory(x, dy, gamma, beta):
    """Peak bytes a bnlib training step (forward + backward) allocates beyond its outputs y and dx,
    measured with tracemalloc (NumPy reports its allocations to it); returns (bytes, in tensors)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        y, cache = F.batch_norm_forward(x, gamma, beta)
        dx, _, _ = F.batch_norm_backward(dy, cache)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    extra = max(peak - y.nbytes - dx.nbytes, 0)
    return extra, extra / x.nbytes


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
    """Time bnlib's CPU paths against torch.nn.functional.batch_norm, float32, training mode.

    Same process, same thread count, interleaved repeats (torch, then each bnlib backend, in
    turn), medians. Returns one dict per (shape, implementation) with forward and forward+backward
    medians in ms, their ratios to torch, the achieved bandwidth against this machine's copy
    bandwidth (roofline(); the copy of copy_nbytes is measured once), and bnlib's peak extra
    memory for a training step. shapes: default CPU_SHAPES.
    """
    import torch
    threads = int(threads or torch.get_num_threads())
    torch.set_num_threads(threads)
    if cpu.numba is not None:
        cpu.numba.set_num_threads(min(threads, cpu.numba.config.NUMBA_NUM_THREADS))
    backends = list(backends or cpu.available_backends())
    shapes = CPU_SHAPES if shapes is None else shapes
    copy_bw = copy_bandwidth(copy_nbytes)
    rng = np.random.default_rng(seed)
    rows = []
    previous = cpu.get_backend()
    try:
        for shape in _progress(shapes, progress, desc="CPU benchmark", unit="shape"):
            x = rng.standard_normal(shape, dtype=np.float32)
            dy = rng.standard_normal(shape, dtype=np.float32)
            c = shape[1]
            gamma, beta = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.standard_normal(c, dtype=np.float32)
            xt = torch.from_numpy(x).requires_grad_()
            gt, bt = torch.from_numpy(gamma).requires_grad_(), torch.from_numpy(beta).requires_grad_()
            dyt = torch.from_numpy(dy)

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

            impls = {"torch": (torch_forward, torch_step)}
            impls.update({f"bnlib[{b}]": bnlib_pair(b) for b in backends})
            times = {name: ([], []) for name in impls}
            for fwd, step in impls.values():          # warm-up: compilation, caches, allocator
                fwd(), step(), step()
            for _ in range(repeats):                    # interleaved, so drift hits everyone alike
                for name, (fwd, step) in impls.items():
                    times[name][0].append(_seconds(fwd))
                    times[name][1].append(_seconds(step))
            out = np.empty_like(x)
            copy_here_s = float(np.median([_seconds(lambda: np.copyto(out, x)) for _ in range(repeats)]))
            base_f, base_s = (float(np.median(t)) for t in times["torch"])
            for name, (tf, ts) in times.items():
                row = {"shape": list(shape), "impl": name, "threads": threads,
                       "forward_ms": 1e3 * float(np.median(tf)), "step_ms": 1e3 * float(np.median(ts)),
                       "forward_ratio": float(np.median(tf)) / base_f, "step_ratio": float(np.median(ts)) / base_s}
                row.update(roofline(x.nbytes, float(np.median(tf)), float(np.median(ts)), copy_bw, copy_here_s))
                if name != "torch":
                    cpu.set_backend(name[6:-1])
                    row["extra_bytes"], row["extra_tensors"] = peak_extra_memory(x, dy, gamma, beta)
                rows.append(row)
    finally:
        cpu.set_backend(previous)
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
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnlib.bench",
                                     description="bnlib batch norm against PyTorch's kernels, as ratios.")
    parser.add_argument("--cpu", action="store_true", help="NumPy/numba paths vs torch on the CPU (the default)")
    parser.add_argument("--gpu", action="store_true", help="CuPy kernels vs torch on the GPU (chapter 05)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per case (default 15)")
    parser.add_argument("--threads", type=int, default=None, help="threads for torch and numba (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="also write the results and the environment as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.gpu:
        from bnlib import cuda                      # chapter 05; needs CuPy and a CUDA device
        if not cuda.available():
            print("--gpu: no CUDA device visible to CuPy (is CuPy installed and a GPU present?)", file=sys.stderr)
            return 2
        rows = cuda.bench_gpu(repeats=args.repeats, progress=not args.no_progress)
        env, table = cuda.gpu_environment(), cuda.format_gpu_table(rows)
    else:
        rows = bench_cpu(repeats=args.repeats, threads=args.threads, progress=not args.no_progress)
        env, table = environment(), format_table(rows)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__" and "__file__" in globals():   # `python -m bnlib.bench`, not the notebook
    sys.exit(main())
