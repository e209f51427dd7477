"""The grid sweep of tools/gpu_check.sh: fewer, busier blocks (bnlib.cuda.MIN_VECTORS_PER_THREAD).

Design 3's plan aims every grid at 2 x SMs x 8 blocks, however little work each thread then gets (chapter
05, "The next experiment", counts it for the benchmark's columns walks); on the H200 those columns kernels
ran at a fraction of the copy bandwidth (chapter 05's design-3 report). This times bnlib's training step with
MIN_VECTORS_PER_THREAD set to each value (a first-pass thread then loads about that many vectors; fewer
blocks, fewer partials) next to the default step and torch's, on every benchmark case whose grid the
value changes, queued (host time included where it outlasts the flush) and on the GPU alone. Writes
gpu_grid_<card>_design<N>.json (environment with card, date and versions; the rows as bench_gpu gives
them, with min_vectors, walk, blocks, blocks_default and the ratios to the default step), rewritten
after every case, and prints for each case the value that gave the shortest GPU-alone step.

    python tools/gpu_grid_sweep.py --json OUT.json [--values 4 8 16 32] [--repeats 10]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_record import recorded_bench_gpu  # noqa: E402


TIE = 0.05            # as chapter 05: one run's medians, no spread, so within 5% counts as even


def best_per_case(rows):
    """{(shape, dtype, layout): (best value, or 1 when none is more than TIE faster than the default; its
    GPU-alone step over the default's; the default's GPU-alone step over torch eager's)} from the rows
    with GPU-alone times."""
    out = {}
    keys = {(tuple(r["shape"]), r["dtype"], r["layout"]) for r in rows}
    for key in sorted(keys):
        case = [r for r in rows if (tuple(r["shape"]), r["dtype"], r["layout"]) == key]
        base = next((r for r in case if r["impl"] == "bnlib"), None)
        if base is None or base.get("step_device_ms") is None:
            continue
        ratios = {r["min_vectors"]: r["step_device_ratio_vs_bnlib"] for r in case
                  if r.get("min_vectors") and r.get("step_device_ratio_vs_bnlib") is not None}
        k, ratio = min(ratios.items(), key=lambda kv: kv[1], default=(1, 1.0))
        if ratio >= 1 - TIE:
            k, ratio = 1, 1.0
        out[key] = (k, ratio, base.get("step_device_ratio"))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--values", nargs="+", type=int, default=[4, 8, 16, 32], metavar="K",
                        help="MIN_VECTORS_PER_THREAD values to time (integers >= 2; default 4 8 16 32)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if any(k < 2 for k in args.values):
        parser.error(f"--values must be integers >= 2 (1 is the default step), got {args.values}")
    from bnlib import bench
    rows = recorded_bench_gpu(args.json, repeats=args.repeats, progress=False, min_vectors=tuple(args.values))
    if rows is None:
        return 2
    print(bench.format_gpu_table(rows))
    print("\nGPU alone, per case: the default's step over torch eager's, and the best value's step over the default's")
    for (shape, dtype, layout), (k, ratio, vs_torch) in best_per_case(rows).items():
        tried = [r for r in rows if (tuple(r["shape"]), r["dtype"], r["layout"]) == (shape, dtype, layout)
                 and r.get("min_vectors")]
        note = "no value changes this grid" if not tried else (f"best >= {k} vectors: {ratio:.2f}" if k > 1
                                                              else f"none more than {TIE:.0%} faster")
        print(f"{str(shape):>18} {dtype:>8} {layout:>5} default/torch "
              f"{'n/a' if vs_torch is None else f'{vs_torch:.2f}'}: {note}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
