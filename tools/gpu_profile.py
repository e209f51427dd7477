"""Where the time of one batch-norm training step goes on a GPU: host time against GPU time.

The design-2 benchmark found bnlib's steps slower than torch's on the small tensors, where no
kernel moves much memory, and bnlib.nn's module step 0.46-0.66 ms slower than its bare kernels. A
CPU profile with the kernels stubbed out (tools/profile_host_step.py) saw only ~60 us of Python
there. This script answers on the card itself, for a few shapes, for each implementation:

- host_us: wall time per call on the host, calls queued back to back without synchronising
  (what the Python and launch work costs; the GPU runs behind);
- step_us: wall time per call with a synchronisation after each (what a caller waits);
- gpu_us: the sum of the kernel durations of one call, from the CUDA profiler (CUPTI sees CuPy's
  kernels as well as torch's), and the kernels that make it up;
- for bnlib, each of the launch paths of bnlib.cuda ("driver" and "cupy"), and the host cost of one
  bare launch through each (other rows use BNLIB_CUDA_LAUNCH, default "driver");
- a cProfile of bnlib.nn's module step: the Python functions with the most own time;
- bnlib.nn's module step taken apart (added after the design-3 run, where it queued 548.9 us of host
  work per step against 198.1 for the bare functions): an empty autograd.Function on the same
  tensors (the floor of any Python autograd wrapper on CUDA, whose backward runs on autograd's device
  thread), bnlib.nn's BatchNormFunction without the module around it, and the module's forward alone;
- the module steps of torch.nn and bnlib.nn captured in a CUDA graph (torch.cuda.graph) and replayed:
  the same kernels without the host work of Python and autograd (rows "... [CUDA graph]", after the
  others, so that a capture that fails costs nothing else).

If host_us > gpu_us, the step is host-bound: a faster kernel cannot help, fewer or cheaper host
operations can. Usage (tools/gpu_check.sh runs it): python tools/gpu_profile.py --json PATH
Every section records its error instead of stopping the others.
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = [((64, 128, 28, 28), "float32", "NCHW"), ((64, 128, 28, 28), "bfloat16", "NHWC"),
         ((256, 64, 56, 56), "float32", "NCHW")]


def case_tensors(torch, shape, dtype, layout):
    """x, dy (`dtype`, NCHW or channels-last memory) and float32 weight and bias of one case, on the GPU,
    the same values in every run (also tools/gpu_ncu.py's)."""
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g).to(getattr(torch, dtype)).contiguous(memory_format=fmt)
    dy = torch.randn(shape, device="cuda", generator=g).to(getattr(torch, dtype)).contiguous(memory_format=fmt)
    w, b = torch.rand(shape[1], device="cuda") + 0.5, torch.randn(shape[1], device="cuda")
    return x, dy, w, b


def _empty_function():
    """tools/profile_host_step.py's empty autograd.Function: it allocates its outputs and does nothing
    else, forward and backward (the floor of any Python autograd wrapper)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from profile_host_step import EmptyFunction
    return EmptyFunction


def make_impls(torch, cuda, bnn, x, dy, w, b, device="cuda"):
    """name -> (step function, launcher or None): a training step, forward and backward (for the
    rows named "forward", the forward alone). `device` is for a test on the CPU."""
    xr = x.detach().requires_grad_()
    c = x.shape[1]
    tnn, bnl = torch.nn.BatchNorm2d(c, device=device), bnn.BatchNorm2d(c, device=device)
    wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    empty = _empty_function()

    def torch_step():
        xr.grad = None
        torch.nn.functional.batch_norm(xr, None, None, w, b, training=True).backward(dy)

    def bnlib_step():
        _, mean, _, inv_std = cuda.forward_torch(x, w, b, 1e-5)
        cuda.backward_torch(dy, x, mean, inv_std, w)

    def module_step(m):
        def step():
            xr.grad = None
            m.zero_grad(set_to_none=True)
            m(xr).backward(dy)
        return step

    def torch_forward():
        with torch.no_grad():
            torch.nn.functional.batch_norm(x, None, None, w, b, training=True)

    def bnlib_forward():
        cuda.forward_torch(x, w, b, 1e-5)

    def empty_step():
        xr.grad = wr.grad = br.grad = None
        empty.apply(xr, wr, br).backward(dy)

    def function_step():
        xr.grad = wr.grad = br.grad = None
        bnn.BatchNormFunction.apply(xr, wr, br, 1e-5)[0].backward(dy)

    def module_forward():
        bnl(xr)

    # the forward alone as well: design 2's recording had bnlib's forward nearly as slow as its whole
    # step on the small tensors (0.133 against 0.154 ms), as if the forward's host work cost far more
    # than the backward's, which does the same kind of work
    impls = {"torch": (torch_step, None), "torch.nn": (module_step(tnn), None),
             "torch forward": (torch_forward, None)}
    for launcher in ("driver", "cupy"):
        impls[f"bnlib [{launcher}]"] = (bnlib_step, launcher)
        impls[f"bnlib.nn [{launcher}]"] = (module_step(bnl), launcher)
    impls["bnlib forward [driver]"] = (bnlib_forward, "driver")
    impls["empty autograd.Function"] = (empty_step, None)
    impls["BatchNormFunction [driver]"] = (function_step, "driver")
    impls["bnlib.nn forward [driver]"] = (module_forward, "driver")
    return impls


def host_and_step_us(torch, fn, calls=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    walls = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    return 1e6 * host, 1e6 * float(np.median(walls))


def kernel_times_us(torch, fn, steps=10):
    """(total kernel time per step, [(kernel, us per step), ...], {CUDA API call: calls per step})
    from torch.profiler (CUPTI records kernels and runtime/driver calls of the whole process, CuPy's
    included: a cudaStreamSynchronize or cudaDeviceSynchronize there is a host sync in the step)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()                # the profile's own: taken off the counts below
    per_kernel, api = {}, {}
    for evt in prof.events():
        kind = str(getattr(evt, "device_type", ""))
        if not kind.endswith("CUDA"):
            if evt.name.startswith("cu"):
                api[evt.name] = api.get(evt.name, 0) + 1 / steps
            continue
        t = getattr(evt, "device_time", None)
        if t is None:
            t = getattr(evt, "cuda_time", 0.0)
        per_kernel[evt.name] = per_kernel.get(evt.name, 0.0) + float(t)
    if "cudaDeviceSynchronize" in api:
        api["cudaDeviceSynchronize"] -= 1 / steps
    top = sorted(((k[:90], v / steps) for k, v in per_kernel.items()), key=lambda kv: -kv[1])
    return sum(v for _, v in top), top[:8], {k: round(v, 3) for k, v in api.items() if abs(v) > 1e-9}


def launch_us(torch, cuda, launcher, calls=200):
    """Host time of one bare launch (a normalize of a tiny tensor) through one launch path."""
    x = torch.randn(4, 3, 8, device="cuda")
    y = torch.empty_like(x)
    ones, zeros = torch.ones(3, device="cuda"), torch.zeros(3, device="cuda")
    dev, stream = x.device.index, torch.cuda.current_stream().cuda_stream
    pl = cuda.plan(4, 3, 8, "float32", True, cuda._sm_count(dev))
    saved, cuda.LAUNCHER = cuda.LAUNCHER, launcher
    try:
        args = (dev, pl, "float32", x.data_ptr(), y.data_ptr(), zeros.data_ptr(), ones.data_ptr(), 0, 0, 1e-5)
        for _ in range(10):
            cuda._run_apply(*args, from_var=True, stream=stream)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            cuda._run_apply(*args, from_var=True, stream=stream)
        host = 1e6 * (time.perf_counter() - t0) / calls
        torch.cuda.synchronize()
        return host
    finally:
        cuda.LAUNCHER = saved


def captured_step(torch, module, x, dy):
    """The replay of a CUDA graph holding one training step of `module` on a copy of x (forward, backward,
    the running statistics' update), captured as torch's documentation does it: warm-up steps on a side
    stream (on a copy of the module, so that its statistics are not moved), gradients set to None, then
    torch.cuda.graph."""
    import copy
    xr = x.detach().clone().requires_grad_()

    def step(m):
        m(xr).backward(dy)
    warm = copy.deepcopy(module)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            xr.grad = None
            step(warm)
    torch.cuda.current_stream().wait_stream(side)
    xr.grad = None
    module.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(module)

    def replay():                # holds xr: the graph reads its memory, allocated outside the graph's pool
        graph.replay()
    replay.inputs = (xr, dy)
    return replay


def profile_module(torch, step, calls=100):
    step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    lines = [ln for ln in text.getvalue().splitlines() if ln.strip()]
    return {"calls": calls, "lines": lines[-15:]}


def guarded(record, key, fn):
    try:
        record[key] = fn()
    except Exception as exc:                   # record and go on: one failure must not cost the others
        record[key] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
        print(f"{key}: {type(exc).__name__}: {exc}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    import torch
    from bnlib import bench, cuda
    from bnlib import nn as bnn
    default = os.environ.get("BNLIB_CUDA_LAUNCH", "driver")      # gpu_check.sh's choice after its preflight
    result = {"environment": bench.gpu_environment(), "default_launcher": default, "cases": []}

    def save():                                  # after every section: a run cut short keeps what it has
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    for launcher in ("driver", "cupy"):
        guarded(result, f"launch_host_us_{launcher}", lambda: launch_us(torch, cuda, launcher))
        print(f"one bare launch through {launcher}, host us:", result[f"launch_host_us_{launcher}"])
    save()
    for shape, dtype, layout in CASES:
        x, dy, w, b = case_tensors(torch, shape, dtype, layout)
        case = {"shape": list(shape), "dtype": dtype, "layout": layout, "impls": {}}
        impls = make_impls(torch, cuda, bnn, x, dy, w, b)
        graphs = {}                              # last: a capture that fails (or breaks the context) costs no row
        for name, module in (("torch.nn [CUDA graph]", torch.nn.BatchNorm2d(shape[1], device="cuda")),
                             ("bnlib.nn [CUDA graph]", bnn.BatchNorm2d(shape[1], device="cuda"))):
            graphs[name] = lambda module=module: captured_step(torch, module, x, dy)
        for name, entry in list(impls.items()) + list(graphs.items()):
            if name in graphs:                   # capture now, after the other rows have run
                cuda.LAUNCHER = default
                guarded(case["impls"], name, entry)
                if not callable(case["impls"][name]):
                    continue                     # the capture's error is recorded as the row
                entry = (case["impls"][name], None)
            fn, launcher = entry
            cuda.LAUNCHER = launcher or default
            row = case["impls"][name] = {}
            guarded(row, "host_step", lambda: host_and_step_us(torch, fn))
            guarded(row, "kernels", lambda: kernel_times_us(torch, fn))
            if isinstance(row["host_step"], tuple) and isinstance(row["kernels"], tuple):
                (host, step), (gpu, top, api) = row.pop("host_step"), row.pop("kernels")
                row.update(host_us=host, step_us=step, gpu_us=gpu, top_kernels=top, cuda_api_calls=api)
                syncs = sum(v for k, v in api.items() if "ynchronize" in k)
                print(f"{str(shape):>18} {dtype:>8} {layout} {name:>18}: host {host:7.1f} us, "
                      f"step {step:7.1f} us, kernels {gpu:7.1f} us, syncs/step {syncs:.1f}")
        cuda.LAUNCHER = default
        result["cases"].append(case)
        save()
        if shape == CASES[0][0] and dtype == CASES[0][1]:
            m = bnn.BatchNorm2d(shape[1], device="cuda")
            xr = x.detach().requires_grad_()

            def module_step():
                xr.grad = None
                m(xr).backward(dy)
            guarded(result, "cprofile_bnlib_nn", lambda: profile_module(torch, module_step))
            print("\n".join(result["cprofile_bnlib_nn"].get("lines", [])))
            save()
    if args.json:
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
