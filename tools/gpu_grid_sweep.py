"""The grid sweep of tools/gpu_check.sh: fewer, busier blocks (bnlib.cuda.MIN_VECTORS_PER_THREAD) and small
NCHW planes walked as planes (bnlib.cuda.PLANES_MIN_BYTES).

Design 3's plan aims every grid at 2 x SMs x 8 blocks, however little work each thread then gets, and walks
NCHW planes under 4 KB as columns of the (N, C*H*W) view, whose partial results grow with C*H*W (chapter 05,
"The next experiments", counts both for the benchmark's cases); on the H200 those columns kernels ran at a
fraction of the copy bandwidth (chapter 05's design-3 report). This times bnlib's training step with
MIN_VECTORS_PER_THREAD set to each value (a first-pass thread then loads about that many vectors; fewer
blocks, fewer partials), and with PLANES_MIN_BYTES set to each of its values, alone and with each
MIN_VECTORS_PER_THREAD value, next to the default step and torch's, on every benchmark case whose walk or
grid a setting changes (each distinct plan once), queued (host time included where it outlasts the flush)
and on the GPU alone. Writes gpu_grid_<card>_design<N>.json (environment with card, date and versions;
the rows as bench_gpu gives them, with min_vectors, planes_min_bytes, walk, blocks, blocks_default and the
ratios to the default step), rewritten after every case, and prints for each case the setting that gave
the shortest GPU-alone step.

    python tools/gpu_grid_sweep.py --json OUT.json [--values 4 8 16 32] [--planes 0] [--repeats 10]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_record import recorded_bench_gpu  # noqa: E402


TIE = 0.05            # as chapter 05: one run's medians, no spread, so within 5% counts as even


def setting(row) -> str:
    """A grid row's setting, as its name gives it: '>=8 vec', 'planes >=0 B', 'planes >=0 B, >=8 vec'."""
    return row["impl"].split("[", 1)[1].rstrip("]")


def best_per_case(rows):
    """{(shape, dtype, layout): (the best row's setting, or None when none is more than TIE faster than the
    default; its GPU-alone step over the default's; the default's GPU-alone step over torch eager's)} from the
    rows with GPU-alone times."""
    out = {}
    keys = {(tuple(r["shape"]), r["dtype"], r["layout"]) for r in rows}
    for key in sorted(keys):
        case = [r for r in rows if (tuple(r["shape"]), r["dtype"], r["layout"]) == key]
        base = next((r for r in case if r["impl"] == "bnlib"), None)
        if base is None or base.get("step_device_ms") is None:
            continue
        ratios = {setting(r): r["step_device_ratio_vs_bnlib"] for r in case
                  if r.get("min_vectors") and r.get("step_device_ratio_vs_bnlib") is not None}
        best, ratio = min(ratios.items(), key=lambda kv: kv[1], default=(None, 1.0))
        if ratio >= 1 - TIE:
            best, ratio = None, 1.0
        out[key] = (best, ratio, base.get("step_device_ratio"))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--values", nargs="+", type=int, default=[4, 8, 16, 32], metavar="K",
                        help="MIN_VECTORS_PER_THREAD values to time (integers >= 2; default 4 8 16 32)")
    parser.add_argument("--planes", nargs="*", type=int, default=[0], metavar="BYTES",
                        help="PLANES_MIN_BYTES values to time, alone and with each K (integers >= 0 below "
                             "bnlib.cuda.PLANES_MIN_BYTES, 4096; default 0; none: --planes with no value)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if any(k < 2 for k in args.values):
        parser.error(f"--values must be integers >= 2 (1 is the default step), got {args.values}")
    from bnlib import bench, cuda
    if any(not 0 <= b < cuda.PLANES_MIN_BYTES for b in args.planes):
        parser.error(f"--planes must be integers in [0, {cuda.PLANES_MIN_BYTES}) (PLANES_MIN_BYTES, "
                     f"{cuda.PLANES_MIN_BYTES}, is the default step), got {args.planes}")
    rows = recorded_bench_gpu(args.json, repeats=args.repeats, progress=False, min_vectors=tuple(args.values),
                              planes_min_bytes=tuple(args.planes))
    if rows is None:
        return 2
    print(bench.format_gpu_table(rows))
    print("\nGPU alone, per case: the default's step over torch eager's, and the best setting's step over the default's")
    for (shape, dtype, layout), (best, ratio, vs_torch) in best_per_case(rows).items():
        tried = [r for r in rows if (tuple(r["shape"]), r["dtype"], r["layout"]) == (shape, dtype, layout)
                 and r.get("min_vectors")]
        note = ("no setting changes this plan" if not tried else f"best [{best}]: {ratio:.2f}" if best
                else f"none more than {TIE:.0%} faster")
        print(f"{str(shape):>18} {dtype:>8} {layout:>5} default/torch "
              f"{'n/a' if vs_torch is None else f'{vs_torch:.2f}'}: {note}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
