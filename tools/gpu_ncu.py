"""Hardware counters of one batch-norm training step's kernels, bnlib's and torch's, with Nsight Compute.

The design-3 run (chapter 05, "Design 3 on a GPU") timed every kernel: on (256, 64, 56, 56) float32
NCHW each of bnlib's kernels ran at about the copy bandwidth, but on (64, 128, 28, 28) the columns
kernels took up to 9.32 passes' time for a 1-pass kernel, and the model of bytes in flight cannot be
the whole cause. Times cannot say why; counters can: the DRAM bytes each kernel really moves (are the
passes the planned ones?), its DRAM throughput, the L2 hit rate, the achieved occupancy, the warps'
cycles per issued instruction, registers, grid and block.

For each case of tools/gpu_profile.py this runs `ncu` on this script's --workload mode (one torch
training step, F.batch_norm through autograd, and one bnlib step, forward_torch + backward_torch, on
the same tensors), with ncu's standard sections SpeedOfLight, MemoryWorkloadAnalysis, Occupancy,
LaunchStats and WarpStateStats plus dram__bytes_read.sum and dram__bytes_write.sum. ncu's defaults
hold: caches flushed before each kernel (so the DRAM bytes are a cold kernel's) and clocks locked to
base (so durations are longer than in the benchmark). One ncu process per case: a failure in one
(no permission to read the counters, a timeout) is recorded and the others still run.

    python tools/gpu_ncu.py --json PATH [--timeout S]      (tools/gpu_check.sh runs it)
    python tools/gpu_ncu.py --workload I                   (what ncu runs: case I)
"""
import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_profile import CASES  # noqa: E402  (the same three cases as the host-time profile)

SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats")
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")
KERNELS = "regex:bn_|batch_norm"        # bnlib's kernels are bn_*; torch's cuDNN bn_*, native batch_norm_*
# the summary's columns: (label, metric name as ncu's sections or --metrics name it, scale, format)
SUMMARY = (("us", "Duration", 1e-3, "8.1f"), ("DRAM rd MB", "dram__bytes_read.sum", 1e-6, "10.2f"),
           ("DRAM wr MB", "dram__bytes_write.sum", 1e-6, "10.2f"), ("DRAM %", "DRAM Throughput", 1, "6.1f"),
           ("L2 hit %", "L2 Hit Rate", 1, "8.1f"), ("occup. %", "Achieved Occupancy", 1, "8.1f"),
           ("cyc/issue", "Warp Cycles Per Issued Instruction", 1, "9.1f"),
           ("regs", "Registers Per Thread", 1, "4.0f"), ("grid", "Grid Size", 1, "7.0f"),
           ("block", "Block Size", 1, "5.0f"))


def ncu_command(ncu, case_index, python=sys.executable):
    """The ncu command line that profiles case `case_index` of CASES."""
    cmd = [ncu, "--csv", "--print-units", "base", "--target-processes", "all", "--kernel-name", KERNELS]
    for section in SECTIONS:
        cmd += ["--section", section]
    cmd += ["--metrics", ",".join(METRICS), python, str(Path(__file__).resolve()), "--workload", str(case_index)]
    return cmd


def _number(text):
    """ncu's value as a float ("1,234.5" with thousands separators), or the text itself."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def parse_ncu_csv(text):
    """ncu --csv (details page) output -> [{"id", "name", "metrics": {metric name: [value, unit]}}], in
    launch order. Lines before the CSV header (==PROF== messages, the workload's own prints) are skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",') and '"Metric Name"' in line), None)
    if start is None:
        return []
    kernels = {}
    for row in csv.DictReader(line for line in lines[start:] if line.startswith('"')):
        kernel = kernels.setdefault(row["ID"], {"id": int(row["ID"]), "name": row["Kernel Name"], "metrics": {}})
        kernel["metrics"][row["Metric Name"]] = [_number(row["Metric Value"]), row["Metric Unit"]]
    return sorted(kernels.values(), key=lambda k: k["id"])


def short_name(kernel_name):
    """'void bn_stats_cols<float, 4>(float const*, ...)' -> 'bn_stats_cols'."""
    name = kernel_name.split("(")[0].replace("void ", "").strip()
    return name.split("<")[0].split("::")[-1]


def summary_lines(kernels, bnlib_names):
    head = f"  {'impl':6s} {'kernel':50s}" + "".join(f" {label:>{int(fmt.split('.')[0])}s}" for label, _, _, fmt in SUMMARY)
    lines = [head]
    for k in kernels:
        name = short_name(k["name"])
        impl = "bnlib" if name in bnlib_names else "torch"
        cells = []
        for label, metric, scale, fmt in SUMMARY:
            value = k["metrics"].get(metric, [None])[0]
            width = int(fmt.split(".")[0])
            cells.append(format(value * scale, fmt) if isinstance(value, float) else "n/a".rjust(width))
        lines.append(f"  {impl:6s} {name[:50]:50s} " + " ".join(cells))
    return lines


def workload(case_index):
    """One torch training step and one bnlib step on case `case_index`, nothing else on the GPU."""
    import torch

    from bnlib import cuda
    shape, dtype, layout = CASES[case_index]
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g).to(getattr(torch, dtype)).contiguous(memory_format=fmt)
    dy = torch.randn(shape, device="cuda", generator=g).to(getattr(torch, dtype)).contiguous(memory_format=fmt)
    w, b = torch.rand(shape[1], device="cuda") + 0.5, torch.randn(shape[1], device="cuda")
    cuda.module().compile()                              # NVRTC before any profiled launch
    xr = x.detach().requires_grad_()
    torch.nn.functional.batch_norm(xr, None, None, w, b, training=True).backward(dy)
    _, mean, _, inv_std = cuda.forward_torch(x, w, b, 1e-5)
    cuda.backward_torch(dy, x, mean, inv_std, w)
    torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--workload", type=int, help="run case I's two steps (what ncu profiles)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds for each case's ncu process")
    args = parser.parse_args(argv)
    if args.workload is not None:
        workload(args.workload)
        return 0
    ncu = shutil.which("ncu") or next((str(p) for p in sorted(Path("/usr/local").glob("cuda*/bin/ncu"))), None)
    if ncu is None:
        print("ncu (Nsight Compute) not found: no counters")
        return 2
    from bnlib import bench, cuda
    version = subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    result = {"environment": bench.gpu_environment(), "ncu": version[-1] if version else None,
              "sections": list(SECTIONS), "metrics": list(METRICS), "cases": []}
    bnlib_names = {short_name(n) for n in cuda.kernel_names()}
    status = 0
    for i, (shape, dtype, layout) in enumerate(CASES):
        case = {"shape": list(shape), "dtype": dtype, "layout": layout}
        t0 = time.perf_counter()
        try:
            run = subprocess.run(ncu_command(ncu, i), capture_output=True, text=True, timeout=args.timeout)
            case["kernels"] = parse_ncu_csv(run.stdout)
            if run.returncode != 0 or not case["kernels"]:
                case["error"] = f"ncu exit {run.returncode}: " + (run.stderr + run.stdout)[-1500:]
        except subprocess.TimeoutExpired:
            case["error"] = f"timed out after {args.timeout:g} s"
        case["seconds"] = round(time.perf_counter() - t0, 1)
        result["cases"].append(case)
        print(f"{str(shape):>18} {dtype:>8} {layout}: {len(case.get('kernels', []))} kernels in {case['seconds']} s"
              + (f"; ERROR {case['error'][:300]}" if "error" in case else ""))
        if case.get("kernels"):
            print("\n".join(summary_lines(case["kernels"], bnlib_names)))
        status |= "error" in case
        if args.json:                                   # after every case: a run cut short keeps what it has
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if args.json:
        print("wrote", args.json)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
