"""Hardware counters of one batch-norm training step's kernels, bnlib's and torch's, with Nsight Compute.

The design-3 run (chapter 05, "Design 3 on a GPU") timed every kernel: on (256, 64, 56, 56) float32
NCHW each of bnlib's kernels ran at about the copy bandwidth, but on (64, 128, 28, 28) the columns
kernels took up to 9.32 passes' time for a 1-pass kernel, and the model of bytes in flight cannot be
the whole cause. Times cannot say why; counters can: the DRAM bytes each kernel really moves (are the
passes the planned ones?), its DRAM throughput, the L2 hit rate, the achieved occupancy, the warps'
cycles per issued instruction, registers, grid and block.

For the two small-shape cases of tools/gpu_profile.py (the large one already runs at the bandwidth),
this runs `ncu` on this script's --workload mode (one torch training step, F.batch_norm through
autograd, and one bnlib step, forward_torch + backward_torch, on the same tensors), with ncu's
standard sections SpeedOfLight, MemoryWorkloadAnalysis, Occupancy, LaunchStats and WarpStateStats
plus dram__bytes_read.sum and dram__bytes_write.sum, caches flushed before each kernel (so the DRAM
bytes are a cold kernel's) and clocks locked to base (so durations are longer than in the benchmark).
One ncu process per case, in its own process group (killed whole on a timeout); the first case that
fails for want of permission to read the counters (ERR_NVGPUCTRPERM: the driver restricts them to
admin users, which a container's root may not be) ends the run, and the driver's setting is recorded.
With --report-dir, ncu also keeps each case's full report (ncu_case<I>.ncu-rep), from which any other
metric can be read later (ncu -i FILE --csv ...).

    python tools/gpu_ncu.py --json PATH [--timeout S] [--report-dir DIR]   (tools/gpu_check.sh runs it)
    python tools/gpu_ncu.py --workload I                                      (what ncu runs: case I)
"""
import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_profile import CASES as _PROFILE_CASES, case_tensors  # noqa: E402

CASES = [c for c in _PROFILE_CASES if c[0] == (64, 128, 28, 28)]   # the small shape, float32 NCHW and bf16 NHWC

SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats")
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")
KERNELS = "regex:bn_|batch_norm"        # bnlib's kernels are bn_*; torch's cuDNN bn_*, native batch_norm_*
#                                         (matched on demangled names: also a TensorIterator kernel whose
#                                         template arguments name batch_norm)
TIME_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}   # -> us
# the summary's columns: (label, metric name as ncu's sections or --metrics name it, scale, format)
# (the duration's scale is None: by its unit, which ncu versions print as "nsecond" or "ns")
SUMMARY = (("us", "Duration", None, "8.1f"), ("DRAM rd MB", "dram__bytes_read.sum", 1e-6, "10.2f"),
           ("DRAM wr MB", "dram__bytes_write.sum", 1e-6, "10.2f"), ("DRAM %", "DRAM Throughput", 1, "6.1f"),
           ("L2 hit %", "L2 Hit Rate", 1, "8.1f"), ("occup. %", "Achieved Occupancy", 1, "8.1f"),
           ("cyc/issue", "Warp Cycles Per Issued Instruction", 1, "9.1f"),
           ("regs", "Registers Per Thread", 1, "4.0f"), ("grid", "Grid Size", 1, "7.0f"),
           ("block", "Block Size", 1, "5.0f"))


def ncu_command(ncu, case_index, python=sys.executable, report_dir=None):
    """The ncu command line that profiles case `case_index` of CASES."""
    cmd = [ncu, "--csv", "--page", "details", "--print-units", "base", "--target-processes", "all",
           "--cache-control", "all", "--clock-control", "base", "--kernel-name-base", "demangled",
           "--kernel-name", KERNELS, "--print-kernel-base", "function"]
    if report_dir is not None:
        cmd += ["-f", "-o", str(Path(report_dir) / f"ncu_case{case_index}")]
    for section in SECTIONS:
        cmd += ["--section", section]
    cmd += ["--metrics", ",".join(METRICS), python, str(Path(__file__).resolve()), "--workload", str(case_index)]
    return cmd


def run_case(cmd, timeout):
    """(exit status, stdout, stderr) of ncu, in a process group of its own, killed whole after `timeout`
    seconds (the profiled Python would otherwise outlive ncu); None as the status on a timeout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "LC_ALL": "C"})   # "1,234.5", not "1.234,5"
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


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
            value, unit = (k["metrics"].get(metric) or [None, ""])[:2]
            width = int(fmt.split(".")[0])
            factor = TIME_UNITS.get(unit) if scale is None else scale
            ok = isinstance(value, float) and factor is not None
            cells.append(format(value * factor, fmt) if ok else "n/a".rjust(width))
        lines.append(f"  {impl:6s} {name[:50]:50s} " + " ".join(cells))
    return lines


def workload(case_index):
    """One torch training step and one bnlib step on case `case_index`, nothing else on the GPU."""
    import torch

    from bnlib import cuda
    x, dy, w, b = case_tensors(torch, *CASES[case_index])
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
    parser.add_argument("--timeout", type=float, default=100, help="seconds for each case's ncu process")
    parser.add_argument("--report-dir", help="keep ncu's full report of each case here (ncu_case<I>.ncu-rep)")
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
    params = Path("/proc/driver/nvidia/params")
    restricted = [ln for ln in params.read_text().splitlines() if "RmProfilingAdminOnly" in ln] if params.exists() else []
    result = {"environment": bench.gpu_environment(), "ncu": version[-1] if version else None,
              "sections": list(SECTIONS), "metrics": list(METRICS), "driver_profiling_admin_only": restricted,
              "cases": []}
    bnlib_names = {short_name(n) for n in cuda.kernel_names()}
    status = 0
    for i, (shape, dtype, layout) in enumerate(CASES):
        case = {"shape": list(shape), "dtype": dtype, "layout": layout}
        t0 = time.perf_counter()
        code, out, err = run_case(ncu_command(ncu, i, report_dir=args.report_dir), args.timeout)
        case["kernels"] = parse_ncu_csv(out)
        if code is None:
            case["error"] = f"timed out after {args.timeout:g} s: " + (err + out)[-1000:]
            subprocess.run([ncu, "--clock-control", "reset"], capture_output=True)   # a killed ncu may leave clocks locked
        elif code != 0 or not case["kernels"]:
            case["error"] = f"ncu exit {code}: " + (err + out)[-1500:]
        case["seconds"] = round(time.perf_counter() - t0, 1)
        result["cases"].append(case)
        print(f"{str(shape):>18} {dtype:>8} {layout}: {len(case.get('kernels', []))} kernels in {case['seconds']} s"
              + (f"; ERROR {case['error'][:300]}" if "error" in case else ""))
        if case.get("kernels"):
            print("\n".join(summary_lines(case["kernels"], bnlib_names)))
        status |= "error" in case
        if args.json:                                   # after every case: a run cut short keeps what it has
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        if "ERR_NVGPUCTRPERM" in case.get("error", ""):
            print("no permission to read the GPU's counters (driver setting: "
                  f"{restricted or 'not readable'}): the other cases would fail the same way, not run")
            break
    if args.json:
        print("wrote", args.json)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
