"""The L2 channel-chunk sweep of tools/gpu_check.sh, kept apart from the main benchmark so that a fault
in the chunked path cannot cost the main benchmark's results.

Times bnlib's training step with channel chunks for the L2 cache (bnlib.cuda.L2_CHUNK_BYTES, off by
default) at several working-set sizes (a chunk's working set: the bytes its second pass reads and
writes, x and y in the forward, x, dy and dx in the backward; MiB), next to the unchunked step and torch's, on the cases that chunk:
the benchmark's NCHW shapes walked as planes, in float32 and bfloat16. Writes
gpu_l2chunks_<card>_design<N>.json (environment with card, date, versions and the card's L2 size; the
rows as bench_gpu gives them), rewritten after every case.

    python tools/gpu_l2_chunks.py --json OUT.json [--sizes 24 32 48 64] [--repeats 20]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_record import recorded_bench_gpu  # noqa: E402

SHAPES = [(256, 64, 56, 56), (32, 32, 112, 112)]
CONFIGS = [("float32", "NCHW"), ("bfloat16", "NCHW")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--sizes", nargs="+", type=float, default=[24, 32, 48, 64], metavar="MiB",
                        help="chunk working sets in MiB (default 24 32 48 64: 64 exceeds a 50 MiB L2; "
                             "reversed second passes still reuse part of it)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    from bnlib import bench
    rows = recorded_bench_gpu(args.json, shapes=SHAPES, configs=CONFIGS, repeats=args.repeats, progress=False,
                              l2_chunks=tuple(args.sizes))
    if rows is None:
        return 2
    print(bench.format_gpu_table(rows))
    for r in rows:
        if r.get("l2_chunk_mb"):
            alone = (f"{r['step_device_ratio_vs_bnlib']:.2f} ({r['step_device_passes']:.2f} passes)"
                     if r.get("step_device_ratio_vs_bnlib") is not None else "n/a")
            print(f"{str(tuple(r['shape'])):>18} {r['dtype']:>8} {r['l2_chunk_mb']:4g} MiB: {r['chunks_forward']} + "
                  f"{r['chunks_backward']} chunks, {r['launches_per_step']} launches, step over unchunked "
                  f"{r['step_ratio_vs_bnlib']:.2f}, GPU alone {alone}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
