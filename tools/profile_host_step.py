"""Host (Python) time per training step of bnlib's CUDA route, measured on the CPU (issue 10).

CPU tensors stand in for CUDA ones and the GPU-only pieces are stubbed out: CuPy is replaced by a
stand-in whose cuLaunchKernel does nothing, and the CUDA-tensor check, torch's stream and the SM
count are replaced, as in tests/test_cuda.py. What remains is bnlib's Python path: argument checks,
tensor allocations, bnlib.cuda's launch path up to the driver call (argument packing included, for
the default "driver" launcher), the autograd Function and the running-statistics update. Not a GPU
measurement: on a GPU every torch operation also pays a launch, and so does every driver call.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/profile_host_step.py [steps] [--profile]

Prints microseconds per step (best of 5 rounds) for forward_torch + backward_torch ("bare"),
bnlib.nn.BatchNorm2d forward + backward + running-statistics update, its evaluation forward under
torch.no_grad, and, for scale: an empty autograd.Function with a backward (the floor of any Python
autograd wrapper), and torch.nn.BatchNorm2d's step and evaluation forward on the same CPU tensor
(torch's host path plus its own arithmetic on 256 values: not what torch's CUDA call costs the host).
"""
import argparse
import cProfile
import pstats
import sys
import time
import types


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"steps must be a positive integer, got {text!r}")
    return value


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", nargs="?", type=_positive_int, default=3000,
                        help="training steps per timing round (a positive integer; default 3000)")
    parser.add_argument("--profile", action="store_true", help="also profile bnlib.nn's step with cProfile")
    return parser.parse_args()


if __name__ == "__main__":       # --help and a bad option are answered before torch and bnlib load (8 s on a
    ARGS = _arguments()          # 2-core machine); tools/gpu_profile.py imports this module for EmptyFunction

import torch  # noqa: E402

from bnlib import cuda  # noqa: E402
from bnlib import nn as bnn  # noqa: E402


class EmptyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.empty_like(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _per_step_us(step, steps, rounds=5):
    for _ in range(200):
        step()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best * 1e6


def main(steps=3000, profile=False):
    torch.set_num_threads(1)
    fake = types.ModuleType("cupy")          # CuPy with a driver whose launches do nothing (device None:
    #                                          a CPU tensor's device index, so no device switch)
    fake.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: None, memGetInfo=lambda: (0, 0)),
        driver=types.SimpleNamespace(launchKernel=lambda *args: None),
        get_current_stream=lambda: types.SimpleNamespace(ptr=0))
    sys.modules["cupy"] = fake
    function = types.SimpleNamespace(ptr=1)
    cuda._function = lambda dev, name: function
    cuda.LAUNCHER = "driver"
    cuda._check_cuda_tensor = lambda x, name: None
    cuda._torch_stream = lambda device: 0
    cuda._sm_count = lambda dev: 132
    bnn._torch_kernels = lambda x: True
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 4, generator=gen)
    dy = torch.randn(2, 8, 4, 4, generator=gen)
    w, b = torch.ones(8), torch.zeros(8)
    module = bnn.BatchNorm2d(8).train()
    evaluated = bnn.BatchNorm2d(8).eval()
    torch_module, torch_evaluated = torch.nn.BatchNorm2d(8).train(), torch.nn.BatchNorm2d(8).eval()
    xr = x.clone().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()

    def bare():
        _, mean, _, inv_std = cuda.forward_torch(x, w, b, 1e-5)
        cuda.backward_torch(dy, x, mean, inv_std, w)

    def nn_step():
        module(xr).backward(dy)

    def nn_eval():
        with torch.no_grad():
            evaluated(x)

    def empty():
        EmptyFunction.apply(xr, wr, br).backward(dy)

    def torch_step():
        torch_module(xr).backward(dy)

    def torch_eval():
        with torch.no_grad():
            torch_evaluated(x)

    for name, step in (("bare forward_torch+backward_torch", bare), ("bnlib.nn.BatchNorm2d step", nn_step),
                       ("bnlib.nn.BatchNorm2d eval forward", nn_eval),
                       ("empty autograd.Function (floor)", empty),
                       ("torch.nn.BatchNorm2d step (CPU)", torch_step),
                       ("torch.nn.BatchNorm2d eval (CPU)", torch_eval)):
        print(f"{name:36s} {_per_step_us(step, steps):7.1f} us/step")
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            nn_step()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main(ARGS.steps, ARGS.profile)
