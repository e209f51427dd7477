"""A few small training steps and eval passes of bnlib.cuda, for NVIDIA's compute-sanitizer.

tools/gpu_check.sh runs it under `compute-sanitizer --tool racecheck` (shared-memory races: the
merge trees of the columns kernels, the block reductions) and `--tool memcheck` (out-of-bounds and
misaligned accesses: unaligned data, partial last rows, single channels). Each case takes both
walks' kernels through forward_torch (with the running statistics), backward_torch and
inference_torch, and checks y against float64 torch, so that a wrong result shows here too. Two cases
walk channel chunks for the L2 cache (bnlib.cuda.L2_CHUNK_BYTES, off by default), so that memcheck sees
each chunk's kernels at their offset addresses; the last two walk small planes as planes
(bnlib.cuda.PLANES_MIN_BYTES = 0, off by default: the planes kernels' FLAT instantiations, FlatPlaneCursor),
with MIN_VECTORS_PER_THREAD = 8, so that each block walks 10 or 24 planes and a thread steps on 4 to 8 times;
one of them unaligned.
Exit status 0 when every case ran and matched; the sanitizer adds its own status on an error.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (shape, channels_last, aligned, chunks, small planes as planes): planes (large planes), columns (small planes,
# NHWC, 2-D), one channel, partial last rows, unaligned data (vector width 1), channel chunks (aligned and not),
# short segments shared by several planes, the FLAT kernels (7 x 7 planes; 14 x 14 unaligned, one value per load)
CASES = [((2, 3, 32, 64), False, True, False, False), ((3, 5, 7, 9), False, True, False, False),
         ((4, 3, 5, 7), True, True, False, False), ((40, 3), False, True, False, False),
         ((5, 70), False, False, False, False), ((2, 1, 1024, 512), False, True, False, False),
         ((3, 4, 6, 6), True, False, False, False), ((2, 5, 32, 64), False, True, True, False),
         ((2, 5, 32, 64), False, False, True, False), ((48, 3, 7, 7), False, True, False, True),
         ((20, 2, 14, 14), False, False, False, True)]


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    import torch
    from bnlib import cuda
    failures = 0
    for shape, channels_last, aligned, chunks, small_planes in CASES:
        cuda.PLANES_MIN_BYTES, cuda.MIN_VECTORS_PER_THREAD = (0, 8) if small_planes else (4096, 1)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            channel_bytes = shape[0] * (shape[2] * shape[3] if len(shape) == 4 else 1) * dtype.itemsize
            cuda.L2_CHUNK_BYTES = int(4.5 * channel_bytes) if chunks else None     # forward chunks of 1-2 channels
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            g = torch.Generator(device="cuda").manual_seed(0)
            n = 1
            for s in shape:
                n *= s
            base = torch.randn(n + 1, device="cuda", generator=g).to(dtype)
            flat = base[1:] if not aligned else base[:n]         # one element past 16 bytes: unaligned
            if channels_last:                                    # NHWC memory, seen as (N, C, H, W)
                x = flat.view((shape[0],) + shape[2:] + (shape[1],)).permute(0, 3, 1, 2)
            else:
                x = flat.view(shape)
            dy = torch.randn(shape, device="cuda", generator=g).to(dtype)
            w, b = torch.rand(shape[1], device="cuda") + 0.5, torch.randn(shape[1], device="cuda")
            rm, rv = torch.zeros(shape[1], device="cuda", dtype=acc), torch.ones(shape[1], device="cuda", dtype=acc)
            nbt = torch.zeros((), dtype=torch.long, device="cuda")
            y, mean, var, inv_std = cuda.forward_torch(x, w, b, 1e-5, running_mean=rm, running_var=rv, momentum=None,
                                                       num_batches_tracked=nbt)
            cuda.backward_torch(dy, x, mean, inv_std, w)
            cuda.inference_torch(x, rm, rv, w, b)
            ref = torch.nn.functional.batch_norm(x.double(), None, None, w.double(), b.double(), training=True)
            err = ((y.double() - ref).abs().max() / ref.abs().max().clamp(min=1)).item()
            ok = err < (2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4)
            failures += not ok
            print(f"{str(shape):>18} {'NHWC' if channels_last else 'NCHW'} {'aligned' if aligned else 'unaligned':9s} "
                  f"{'chunks ' if chunks else ''}{'as planes ' if small_planes else ''}"
                  f"{str(dtype):15s} y error {err:.2e} {'ok' if ok else 'WRONG'}")
    cuda.PLANES_MIN_BYTES, cuda.MIN_VECTORS_PER_THREAD = 4096, 1
    torch.cuda.synchronize()
    print(f"{failures} wrong of {len(CASES) * 4}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
