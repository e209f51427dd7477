"""The code that reads GPU recordings, checked on the CPU: bnlib.bench.gpu_goals on rows made to
meet or miss each goal, and chapter 05's design-3 report on a recording shaped like the ones
tools/gpu_check.sh writes (the chapter itself runs that report only once such a file exists, so
without this test its first run would be the GPU session's)."""
import copy
import importlib.resources
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bnlib import bench

CHAPTER = Path(__file__).resolve().parents[1] / "chapters" / "05_cupy.ipynb"


def _row(shape, dtype, layout, impl, step, floor=1.0, mb=50.0, device=None, launches=6, extra=10.0):
    r = {"shape": list(shape), "dtype": dtype, "layout": layout, "impl": impl, "forward_ms": step / 2,
         "step_ms": step, "floor_ms": floor, "tensor_mb": mb, "launches_per_step": launches, "peak_extra_mb": extra}
    if device is not None:
        r["step_device_ms"] = device
    return r


def _goals(rows, time="step_ms"):
    return {text: (met, of, misses) for text, met, of, misses in bench.gpu_goals(rows, time)}


def test_gpu_goals_count_each_goal_and_name_the_misses():
    big, small, conv, tied = (256, 64, 56, 56), (8192, 1024), (64, 128, 28, 28), (32, 32, 112, 112)
    rows = [_row(big, "float32", "NCHW", "torch", 3.0, floor=0.4, mb=205, device=2.0),
            _row(big, "float32", "NCHW", "torch.compile", 2.0, floor=0.4, mb=205),
            _row(big, "float32", "NCHW", "bnlib", 0.39, floor=0.4, mb=205, device=0.3),   # 7.7x faster than eager, below the floor
            _row(big, "bfloat16", "NHWC", "torch", 1.0, floor=0.2, mb=103),
            _row(big, "bfloat16", "NHWC", "bnlib", 1.1, floor=0.2, mb=103, launches=None),  # slower; no launch count
            _row(conv, "float32", "NCHW", "torch", 0.3, floor=0.05, device=0.1),
            _row(conv, "float32", "NCHW", "bnlib", 0.25, floor=0.05, device=0.05),        # 1.2x: misses 1.5x
            _row(small, "float32", "NCHW", "torch", 0.3, floor=0.06),
            _row(small, "float32", "NCHW", "bnlib", 0.29, floor=0.06),
            _row(small, "float32", "NCHW", "torch.compile", 0.2, floor=0.06),             # compiled is torch's best
            _row(tied, "float32", "NHWC", "torch", 1.0, floor=0.1),
            _row(tied, "float32", "NHWC", "bnlib", 1.03, floor=0.1)]                       # within 5%: not slower
    g = _goals(rows)
    assert list(g) == [t for t, *_ in bench.gpu_goals(rows)] and len(g) == 6
    never, x15, x25, floor80, l2, recorded = g.values()
    assert never == (3, 5, ["(8192, 1024) float32 NCHW", "(256, 64, 56, 56) bfloat16 NHWC"])   # NCHW first
    assert bench.gpu_goals(rows, tie=0)[0][1:3] == (2, 5)        # without the 5% band the tie is a miss
    assert x15 == (1, 2, ["(64, 128, 28, 28) float32 NCHW"])      # 2-D shapes are not convolution shapes
    assert x25 == (1, 1, [])                                      # 3.0 / 0.39 = 7.7
    assert floor80 == (1, 2, ["(256, 64, 56, 56) bfloat16 NHWC"])  # over 100 MB: the two big-shape cases
    assert l2 == (1, 2, ["(256, 64, 56, 56) bfloat16 NHWC"])       # the largest shape: 0.39 < 0.4 only
    assert recorded == (4, 5, ["(256, 64, 56, 56) bfloat16 NHWC"])
    # GPU-alone times: a case where bnlib or torch eager lacks one is a miss, marked, and "of" stays the same
    d = list(_goals(rows, "step_device_ms").values())
    assert d[0] == (2, 5, ["(8192, 1024) float32 NCHW (no time)", "(256, 64, 56, 56) bfloat16 NHWC (no time)",
                           "(32, 32, 112, 112) float32 NHWC (no time)"])
    assert d[1] == (2, 2, []) and d[4] == (1, 2, ["(256, 64, 56, 56) bfloat16 NHWC (no time)"])
    assert d[5] == recorded                                        # recorded counts need no time
    assert bench.gpu_goals([], "step_device_ms")[0][1:3] == (0, 0)


def test_gpu_goals_on_the_recorded_design_2_run():
    run = json.loads(importlib.resources.files("bnlib").joinpath("data", "gpu_bench_NVIDIA_H200_design2.json")
                     .read_text())
    goals = bench.gpu_goals(run["results"])
    assert [(met, of) for _, met, of, _ in goals] == [(17, 27), (2, 5), (2, 2), (1, 5), (0, 5), (27, 27)]
    assert goals[4][3][0].startswith("(256, 64, 56, 56)") and len(goals[4][3]) == 5    # the largest shape, 5 configs
    text = bench.format_gpu_goals(goals)
    assert "met in 17 of 27" in text and text.count("missed:") == 4


def test_gpu_goals_on_the_recorded_design_3_run():
    """The H200 run of design 3 (tools/gpu_check.sh): every recorded step faster than torch's best, but on
    the GPU alone (no host time) only 5 of 27 cases; the chunk sweep beside it lost at every working set."""
    data = importlib.resources.files("bnlib").joinpath("data")
    run = json.loads(data.joinpath("gpu_bench_NVIDIA_H200_design3.json").read_text())
    assert run["environment"]["design"] == 3 and run["environment"]["card"] == "NVIDIA H200"
    assert [(met, of) for _, met, of, _ in bench.gpu_goals(run["results"])] == \
        [(27, 27), (5, 5), (2, 2), (1, 5), (0, 5), (27, 27)]
    assert [(met, of) for _, met, of, _ in bench.gpu_goals(run["results"], "step_device_ms")] == \
        [(5, 27), (2, 5), (2, 2), (3, 5), (0, 5), (27, 27)]
    sweep = json.loads(data.joinpath("gpu_l2chunks_NVIDIA_H200_design3.json").read_text())
    chunked = [r for r in sweep["results"] if r.get("l2_chunk_mb")]
    assert len(chunked) == 16 and min(r["step_device_ratio_vs_bnlib"] for r in chunked) > 1
    check = json.loads(data.joinpath("gpu_check_NVIDIA_H200_design3.json").read_text())
    assert check["logs"]["test_cuda.log"] == ["222 passed, 33 skipped, 48 deselected in 26.23s"]


def _chapter_cell(marker):
    cells = json.loads(CHAPTER.read_text())["cells"]
    return next("".join(c["source"]) for c in cells if c["cell_type"] == "code" and marker in "".join(c["source"]))


def test_design_3_report_reads_a_recording_like_gpu_check_writes(capsys):
    """Chapter 05's design3_report, run on a made-up design-3 recording with every kind of row the
    benchmark writes (GPU-alone and host times, the CuPy launcher, the module pair, the portable code)
    and a profile with one failed entry, as tools/gpu_check.sh would leave them in bnlib/data."""
    data = importlib.resources.files("bnlib").joinpath("data")
    run2 = json.loads(data.joinpath("gpu_bench_NVIDIA_H200_design2.json").read_text())
    rows3 = []
    alone = {"torch": 0.9, "torch.compile": 0.9, "bnlib": 0.5}      # GPU-alone / recorded, per implementation
    for r in run2["results"]:
        r3 = copy.deepcopy(r)
        r3.update(step_device_ms=alone[r["impl"]] * r["step_ms"], forward_device_ms=0.4 * r["step_ms"], host_step_ms=0.1)
        rows3.append(r3)
        if r["impl"] == "bnlib":
            rows3.append({**r3, "impl": "bnlib [cupy]", "step_ms": 1.1 * r["step_ms"]})
            if r["dtype"] == "float32":
                rows3.append({**r3, "impl": "cupy portable", "step_ms": 3 * r["step_ms"]})
        if r["impl"] in ("bnlib", "torch") and r["layout"] == "NCHW":
            rows3.append({**r3, "impl": r["impl"].split()[0] + ".nn", "step_ms": 1.5 * r["step_ms"]})
    run3 = {"environment": {**run2["environment"], "design": 3, "launcher": "driver"}, "results": rows3}
    profile = {"environment": run3["environment"], "cases": [
        {"shape": [256, 64, 56, 56], "dtype": "float32", "layout": "NCHW",
         "impls": {"bnlib [driver]": {"host_us": 40.0, "step_us": 300.0, "gpu_us": 250.0},
                   "torch": {"host_step": {"error": "RuntimeError: made up"}}}}]}
    base = next(r for r in rows3 if r["impl"] == "bnlib" and r["shape"] == [256, 64, 56, 56] and r["dtype"] == "float32"
                and r["layout"] == "NCHW")
    sweep = {"environment": {**run3["environment"], "l2_bytes": 50 * 2 ** 20}, "results": [
        {**base, "impl": "bnlib [L2 24 MiB]", "l2_chunk_mb": 24, "chunks_forward": 22, "chunks_backward": 32,
         "launches_per_step": 162, "step_ratio_vs_bnlib": 2.5, "step_device_ratio_vs_bnlib": 0.875,
         "step_device_passes": 6.25},
        {**base, "impl": "bnlib [L2 64 MiB]", "l2_chunk_mb": 64, "chunks_forward": 7, "chunks_backward": 11,
         "launches_per_step": 54, "step_ratio_vs_bnlib": 1.25}]}             # no GPU-alone times in this row
    files = {"gpu_bench_FAKE_design3.json": run3, "gpu_profile_FAKE_design3.json": profile,
             "gpu_l2chunks_FAKE_design3.json": sweep}
    ns = {"importlib": importlib, "json": json}
    exec(_chapter_cell("def case_key(r)").split("\neager, ours, compiled, ours1")[0], ns)   # the case helpers
    source = _chapter_cell("def design3_report")
    assert source.rstrip().endswith("run3 = design3_report()")
    exec(source.rstrip()[:-len("run3 = design3_report()")], ns)
    ns.update(env=run2["environment"], TIE=0.05, order={"NCHW": 0, "NHWC": 1, "float32": 0, "float16": 1, "bfloat16": 2},
              ours={ns["case_key"](r): r for r in run2["results"] if r["impl"] == "bnlib"},
              eager={ns["case_key"](r): r for r in run2["results"] if r["impl"] == "torch"},
              gpu_goals=bench.gpu_goals, format_gpu_goals=bench.format_gpu_goals,
              recordings=lambda kind, design: sorted(n for n in files if n.startswith(f"gpu_{kind}_")
                                                     and n.endswith(f"_design{design}.json")),
              recorded_run=lambda name: files[name])
    assert ns["design3_report"]() is run3
    out = capsys.readouterr().out
    assert "design 3 (gpu_bench_FAKE_design3.json)" in out and "design 3 faster than torch eager in" in out
    assert "the goals, on the recorded step times" in out and "the goals, on the GPU-alone step times" in out
    recorded, alone_part = out.split("the goals, on the GPU-alone step times")
    assert re.search(r"counts\) +met in 17 of 27", recorded.split("the goals, on the recorded step times")[1])
    assert re.search(r"counts\) +met in 27 of 27", alone_part)                  # bnlib's GPU-alone times are the lower ones
    assert "'cupy portable'" in out and "profile (gpu_profile_FAKE_design3.json)" in out
    assert "host    40.0  step   300.0  kernels   250.0" in out
    assert "channel chunks for the L2 cache (gpu_l2chunks_FAKE_design3.json; the card's L2: 50 MiB)" in out
    assert re.search(r"24 MiB, 22 \+ 32 chunks, 162 launches: GPU alone  0\.88,  6\.2 passes; recorded  2\.50", out)
    assert re.search(r"64 MiB,  7 \+ 11 chunks,  54 launches: GPU alone   n/a,  n/a passes; recorded  1\.25", out)


def test_the_l2_chunk_sweep_tool_writes_its_recording(tmp_path, monkeypatch, capsys):
    """tools/gpu_l2_chunks.py (step 9 of tools/gpu_check.sh) with bench_gpu faked: what it asks
    the benchmark for, the JSON it writes (partial after each case, whole at the end), and its lines
    for the chunked rows, with and without GPU-alone times."""
    import importlib.util

    from bnlib import cuda
    spec = importlib.util.spec_from_file_location("gpu_l2_chunks", CHAPTER.parents[1] / "tools" / "gpu_l2_chunks.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    calls, partial = [], []
    out = tmp_path / "sweep.json"
    row = _row((256, 64, 56, 56), "float32", "NCHW", "bnlib", 0.5, floor=0.4)
    row.update(forward_ratio=0.5, step_ratio=0.4, floor_fraction=0.8, peak_extra_mb=1.0)
    chunked = [{**row, "impl": "bnlib [L2 24 MiB]", "l2_chunk_mb": 24.0, "chunks_forward": 22, "chunks_backward": 32,
                "launches_per_step": 162, "step_ratio_vs_bnlib": 2.5, "step_device_ratio_vs_bnlib": 0.9,
                "step_device_passes": 6.4},
               {**row, "impl": "bnlib [L2 64 MiB]", "l2_chunk_mb": 64.0, "chunks_forward": 7, "chunks_backward": 11,
                "launches_per_step": 54, "step_ratio_vs_bnlib": 1.2}]

    def fake_bench_gpu(**kw):
        calls.append(kw)
        kw["on_rows"]([row])
        partial.append(json.loads(out.read_text()))
        return [row] + chunked
    monkeypatch.setattr(cuda, "available", lambda: True)
    monkeypatch.setattr(bench, "bench_gpu", fake_bench_gpu)
    monkeypatch.setattr(bench, "gpu_environment", lambda: {"card": "FAKE", "l2_bytes": 50 << 20})
    assert tool.main(["--json", str(out), "--sizes", "24", "64", "--repeats", "3"]) == 0
    assert calls[0]["l2_chunks"] == (24.0, 64.0) and calls[0]["repeats"] == 3
    assert calls[0]["shapes"] == [(256, 64, 56, 56), (32, 32, 112, 112)]
    assert calls[0]["configs"] == [("float32", "NCHW"), ("bfloat16", "NCHW")]
    assert partial == [{"environment": {"card": "FAKE", "l2_bytes": 50 << 20}, "partial": True, "results": [row]}]
    written = json.loads(out.read_text())
    assert written["partial"] is False and len(written["results"]) == 3
    text = capsys.readouterr().out
    assert "24 MiB: 22 + 32 chunks, 162 launches, step over unchunked 2.50, GPU alone 0.90 (6.40 passes)" in text
    assert "64 MiB: 7 + 11 chunks, 54 launches, step over unchunked 1.20, GPU alone n/a" in text
    monkeypatch.setattr(cuda, "available", lambda: False)
    assert tool.main(["--json", str(out)]) == 2


def test_the_grid_sweep_tool_writes_its_recording_and_names_each_cases_best(tmp_path, monkeypatch, capsys):
    """tools/gpu_grid_sweep.py (MIN_VECTORS_PER_THREAD and PLANES_MIN_BYTES, step 6 of tools/gpu_check.sh) with
    bench_gpu faked: what it asks the benchmark for, the JSON it writes (partial after each case, whole at the
    end), and its line per case: the best setting where one beats the default by more than 5% on the GPU
    alone (a planes row among them), none otherwise, a case whose plan no setting changes, and one without
    GPU-alone times left out."""
    import importlib.util

    from bnlib import cuda
    spec = importlib.util.spec_from_file_location("gpu_grid_sweep", CHAPTER.parents[1] / "tools" / "gpu_grid_sweep.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    calls, partial = [], []
    out = tmp_path / "grid.json"

    def case(shape, dtype, layout, vs_torch, ratios, device=True):
        base = _row(shape, dtype, layout, "bnlib", 0.1, device=0.1 if device else None)
        base.update(forward_ratio=1.0, step_ratio=1.0, floor_fraction=0.5, peak_extra_mb=1.0)
        if device:
            base["step_device_ratio"] = vs_torch
        extra = []
        for (k, planes), r in ratios.items():
            name = (f"bnlib [>={k} vec]" if planes is None else f"bnlib [planes >={planes} B]" if k == 1
                    else f"bnlib [planes >={planes} B, >={k} vec]")
            extra.append({**base, "impl": name, "min_vectors": k, "planes_min_bytes": 4096 if planes is None else planes,
                          "walk": "cols" if planes is None else "planes", "blocks": 2112 // k, "blocks_default": 2112,
                          "step_ratio_vs_bnlib": r, **({"step_device_ratio_vs_bnlib": r} if device else {})})
        return [base] + extra

    rows = (case((64, 128, 28, 28), "float16", "NHWC", 2.3, {(4, None): 0.8, (8, None): 0.6, (16, None): 0.65})
            + case((128, 1024, 7, 7), "float32", "NHWC", 1.3, {(8, None): 0.97, (16, None): 1.10})   # within 5%
            + case((64, 128, 28, 28), "float32", "NCHW", 1.3, {(8, None): 0.9, (1, 0): 0.7, (8, 0): 0.5})
            + case((256, 64, 56, 56), "float32", "NCHW", 0.25, {})
            + case((8192, 1024), "float32", "NCHW", None, {(8, None): 0.9}, device=False))

    def fake_bench_gpu(**kw):
        calls.append(kw)
        kw["on_rows"](rows[:4])
        partial.append(json.loads(out.read_text()))
        return rows
    monkeypatch.setattr(cuda, "available", lambda: True)
    monkeypatch.setattr(bench, "bench_gpu", fake_bench_gpu)
    monkeypatch.setattr(bench, "gpu_environment", lambda: {"card": "FAKE"})
    assert tool.main(["--json", str(out), "--values", "4", "8", "16", "--repeats", "3"]) == 0
    assert calls[0]["min_vectors"] == (4, 8, 16) and calls[0]["repeats"] == 3 and "shapes" not in calls[0]
    assert calls[0]["planes_min_bytes"] == (0,)                  # the default: every NCHW plane as planes
    assert partial == [{"environment": {"card": "FAKE"}, "partial": True, "results": rows[:4]}]
    written = json.loads(out.read_text())
    assert written["partial"] is False and written["results"] == rows
    text = capsys.readouterr().out
    assert "(64, 128, 28, 28)  float16  NHWC default/torch 2.30: best [>=8 vec]: 0.60" in text
    assert "(128, 1024, 7, 7)  float32  NHWC default/torch 1.30: none more than 5% faster" in text
    assert "(64, 128, 28, 28)  float32  NCHW default/torch 1.30: best [planes >=0 B, >=8 vec]: 0.50" in text
    assert "(256, 64, 56, 56)  float32  NCHW default/torch 0.25: no setting changes this plan" in text
    assert "(8192, 1024)" not in text.split("GPU alone, per case")[1]
    with pytest.raises(SystemExit):
        tool.main(["--json", str(out), "--values", "1", "8"])
    for bad in (["-1"], ["4096"]):                               # 4096 is the default step; below 0 means nothing
        with pytest.raises(SystemExit):
            tool.main(["--json", str(out), "--planes", *bad])
    assert tool.main(["--json", str(out), "--planes"]) == 0 and calls[-1]["planes_min_bytes"] == ()
    monkeypatch.setattr(cuda, "available", lambda: False)
    assert tool.main(["--json", str(out)]) == 2


def test_chapter_05_grid_sweep_report_reads_a_recording_like_the_sweep_writes(capsys):
    """Chapter 05's grid_sweep_report (ch05-busier) on a made-up recording of tools/gpu_grid_sweep.py: per
    case the default's GPU-alone step over torch's, then per other plan (busier grids first, then planes
    walks, each by k) its setting and values of k (one plan timed once for several), its blocks and its
    step over the default's, GPU alone ("n/a" without that time) and queued; the count of cases where
    another plan won by more than 5%; and its line when there is no recording."""
    ns = {"importlib": importlib, "json": json}
    exec(_chapter_cell("def case_key(r)").split("\neager, ours, compiled, ours1")[0], ns)   # the case helpers
    source = _chapter_cell("def grid_sweep_report")
    assert source.rstrip().endswith("grid_sweep = grid_sweep_report()")
    exec(source.rstrip()[:-len("grid_sweep = grid_sweep_report()")], ns)
    small, big = (64, 128, 28, 28), (256, 64, 56, 56)

    def busier(shape, dtype, layout, k, blocks, default, queued, alone=None, same=(), planes=None):
        name = f"bnlib [>={k} vec]" if planes is None else f"bnlib [planes >={planes} B, >={k} vec]"
        r = {**_row(shape, dtype, layout, name, 0.2), "min_vectors": k, "min_vectors_same": list(same),
             "planes_min_bytes": 4096 if planes is None else planes,
             "blocks": blocks, "blocks_default": default, "step_ratio_vs_bnlib": queued}
        return {**r, "step_device_ratio_vs_bnlib": alone} if alone is not None else r
    rows = [_row(small, "float16", "NHWC", "torch", 0.2, device=0.05),
            _row(small, "float16", "NHWC", "bnlib", 0.2, device=0.1),
            busier(small, "float16", "NHWC", 32, 98, 2112, 1.1),
            busier(small, "float16", "NHWC", 8, 392, 2112, 0.9, alone=0.6),
            _row(small, "float32", "NCHW", "torch", 0.2, device=0.1),
            _row(small, "float32", "NCHW", "bnlib", 0.2, device=0.1),
            busier(small, "float32", "NCHW", 8, 896, 3136, 0.8, alone=0.97, planes=0, same=(16,)),
            busier(small, "float32", "NCHW", 8, 1568, 3136, 0.9, alone=1.2),
            _row(big, "float32", "NCHW", "torch", 1.6, device=1.6),
            _row(big, "float32", "NCHW", "bnlib", 0.4, device=0.4),
            busier(big, "float32", "NCHW", 32, 1600, 2112, 1.0, alone=0.97, same=(64,))]
    files = {"gpu_grid_FAKE_design3.json": {"environment": {"card": "FAKE", "date": "2026-12-01", "torch": "2.11",
                                                            "cupy": "14.2"}, "partial": False, "results": rows}}
    ns.update(KERNEL_DESIGN=3, MIN_VECTORS_PER_THREAD=1, PLANES_MIN_BYTES=4096, TIE=0.05,
              recorded_run=lambda name: files[name],
              order={"NCHW": 0, "NHWC": 1, "float32": 0, "float16": 1, "bfloat16": 2},
              recordings=lambda kind, design: sorted(n for n in files if n.startswith(f"gpu_{kind}_")
                                                     and n.endswith(f"_design{design}.json")))
    assert ns["grid_sweep_report"]() is files["gpu_grid_FAKE_design3.json"]
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == "grid sweep (gpu_grid_FAKE_design3.json): FAKE, 2026-12-01; torch 2.11, CuPy 14.2"
    assert lines[2:] == [
        "(64, 128, 28, 28) float32 NCHW default over torch eager, GPU alone: 1.00",
        "k = 8 1568 of 3136 blocks: GPU alone 1.20, queued 0.90",
        "planes >= 0 B, k = 8, 16 896 of 3136 blocks: GPU alone 0.97, queued 0.80",
        "(256, 64, 56, 56) float32 NCHW default over torch eager, GPU alone: 0.25",
        "k = 32, 64 1600 of 2112 blocks: GPU alone 0.97, queued 1.00",
        "(64, 128, 28, 28) float16 NHWC default over torch eager, GPU alone: 2.00",
        "k = 8 392 of 2112 blocks: GPU alone 0.60, queued 0.90",
        "k = 32 98 of 2112 blocks: GPU alone n/a, queued 1.10",
        "another plan (a busier grid or planes) more than 5% faster than the default on the GPU alone in 1 of 3 "
        "cases timed so"]
    ns["recordings"] = lambda kind, design: []
    assert ns["grid_sweep_report"]() is None
    assert "grid sweep: no recording yet" in capsys.readouterr().out


def test_design_3_report_without_a_recording(capsys):
    ns = {"importlib": importlib, "json": json}
    exec(_chapter_cell("def design3_report").rstrip()[:-len("run3 = design3_report()")], ns)
    ns["recordings"] = lambda kind, design: []
    assert ns["design3_report"]() is None
    assert "no recording yet" in capsys.readouterr().out


_NCU_OUTPUT = """==PROF== Connected to process 4242 (/usr/bin/python3.12)
==PROF== Profiling "bn_stats_cols" - 0: 0%....50%....100% - 38 passes
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3.12","127.0.0.1","void at::native::batch_norm_collect_statistics_channels_last_kernel<at::native::Var, c10::BFloat16, float, 4>(const T2 *, T3 *, T3 *, int *, int, int, double)","1","7","(512, 1, 1)","(128, 16, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","nsecond","24,512"
"0","4242","python3.12","127.0.0.1","void at::native::batch_norm_collect_statistics_channels_last_kernel<at::native::Var, c10::BFloat16, float, 4>(const T2 *, T3 *, T3 *, int *, int, int, double)","1","7","(512, 1, 1)","(128, 16, 1)","0","9.0","GPU Speed Of Light Throughput","DRAM Throughput","%","12.5"
"1","4242","python3.12","127.0.0.1","void bn_stats_cols<bf16_t, 8>(const bf16_t *, long long, long long, int, Acc<bf16_t>::type *)","1","7","(256, 1, 1)","(1, 2112, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","ns","28900"
"1","4242","python3.12","127.0.0.1","void bn_stats_cols<bf16_t, 8>(const bf16_t *, long long, long long, int, Acc<bf16_t>::type *)","1","7","(256, 1, 1)","(1, 2112, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","12,845,056"
"1","4242","python3.12","127.0.0.1","void bn_stats_cols<bf16_t, 8>(const bf16_t *, long long, long long, int, Acc<bf16_t>::type *)","1","7","(256, 1, 1)","(1, 2112, 1)","0","9.0","Launch Statistics","Registers Per Thread","register/thread","40"
==PROF== Disconnected from process 4242
"""


def _ncu_tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_ncu", CHAPTER.parents[1] / "tools" / "gpu_ncu.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_the_ncu_tool_parses_counters_and_records_each_case(tmp_path, monkeypatch, capsys):
    """tools/gpu_ncu.py (Nsight Compute counters of one training step's kernels, step 7 of
    tools/gpu_check.sh) with ncu faked: ncu's CSV is parsed (its ==PROF== lines skipped, thousands
    separators read, durations in either unit ncu versions print), kernels are told apart (bnlib's by
    bnlib.cuda's kernel names), a case that times out is recorded (and the clocks reset) while the next
    still runs, a refused permission to read the counters ends the run, and the JSON is written after
    every case."""
    from bnlib import cuda
    tool = _ncu_tool()
    kernels = tool.parse_ncu_csv(_NCU_OUTPUT)
    assert [k["id"] for k in kernels] == [0, 1] and tool.parse_ncu_csv("==PROF== no kernels") == []
    assert kernels[1]["metrics"]["Duration"] == [28900.0, "ns"]
    assert kernels[1]["metrics"]["dram__bytes_read.sum"] == [12845056.0, "byte"]
    assert [tool.short_name(k["name"]) for k in kernels] == ["batch_norm_collect_statistics_channels_last_kernel",
                                                            "bn_stats_cols"]
    assert [c[0] for c in tool.CASES] == [(64, 128, 28, 28)] * 2
    cmd = tool.ncu_command("ncu", 1, python="py", report_dir="/r")
    assert cmd[:4] == ["ncu", "--csv", "--page", "details"] and cmd[-4:] == ["py", str(Path(tool.__file__).resolve()),
                                                                              "--workload", "1"]
    assert all(s in cmd for s in tool.SECTIONS) and cmd[cmd.index("--metrics") + 1] == ",".join(tool.METRICS)
    assert cmd[cmd.index("-o") + 1] == "/r/ncu_case1" and "-o" not in tool.ncu_command("ncu", 0)
    names = {tool.short_name(n) for n in cuda.kernel_names()}
    text = "\n".join(tool.summary_lines(kernels, names))
    torch_row, bnlib_row = text.splitlines()[1:]
    assert torch_row.split()[:3] == ["torch", "batch_norm_collect_statistics_channels_last_kernel", "24.5"]  # nsecond
    assert bnlib_row.split()[:4] == ["bnlib", "bn_stats_cols", "28.9", "12.85"] and " 40 " in bnlib_row       # ns
    assert "n/a" in bnlib_row                                    # metrics ncu did not give
    runs, others = [], []

    def fake_run_case(cmd, timeout):
        runs.append(cmd[-1])
        return outcomes[int(cmd[-1])]

    def fake_run(cmd, capture_output, text=False):
        others.append(cmd[1:])
        return subprocess.CompletedProcess(cmd, 0, "NVIDIA (R) Nsight Compute Command Line Profiler\nVersion 2025.3.1\n", "")
    monkeypatch.setattr(tool.shutil, "which", lambda name: "/opt/ncu")
    monkeypatch.setattr(tool, "run_case", fake_run_case)
    monkeypatch.setattr(tool.subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "gpu_environment", lambda: {"card": "FAKE"})
    out = tmp_path / "ncu.json"
    outcomes = [(None, "", "==PROF== Profiling ..."), (0, _NCU_OUTPUT, "")]        # a timeout, then a good case
    assert tool.main(["--json", str(out)]) == 1
    written = json.loads(out.read_text())
    assert written["ncu"] == "Version 2025.3.1" and [len(c["kernels"]) for c in written["cases"]] == [0, 2]
    assert written["cases"][0]["error"].startswith("timed out") and "error" not in written["cases"][1]
    assert ["--clock-control", "reset"] in others and runs == ["0", "1"]
    assert "bnlib  bn_stats_cols" in capsys.readouterr().out
    runs.clear()
    outcomes = [(1, "", "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission"), (0, _NCU_OUTPUT, "")]
    assert tool.main(["--json", str(out)]) == 1
    assert runs == ["0"] and len(json.loads(out.read_text())["cases"]) == 1           # the run ends there
    assert "no permission to read the GPU's counters" in capsys.readouterr().out
    monkeypatch.setattr(tool.shutil, "which", lambda name: None)
    monkeypatch.setattr(tool.Path, "glob", lambda self, pattern: iter(()))
    assert tool.main([]) == 2                                   # no ncu: said, nothing run


def test_the_ncu_tool_kills_a_case_whole_on_its_timeout():
    """run_case puts ncu in a process group of its own and kills the group on a timeout: a child it
    started (the profiled Python) does not outlive it and hold the GPU for the next case."""
    tool = _ncu_tool()
    assert tool.run_case([sys.executable, "-c", "print('1,234.5')"], 30)[:2] == (0, "1,234.5\n")
    marker = Path(tempfile.mkdtemp()) / "child_alive"
    child = f"import time, pathlib; time.sleep(3); pathlib.Path({str(marker)!r}).touch()"
    script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    t0 = time.perf_counter()
    assert tool.run_case([sys.executable, "-c", script], 1)[0] is None
    assert time.perf_counter() - t0 < 10
    time.sleep(4)
    assert not marker.exists()                                  # the grandchild was killed with the group


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))


def test_the_second_design_3_run_is_recorded_with_its_versions_and_spread():
    """The H200 run of 2026-12-04 (chapter 05, "Design 3 again"): every recording names card, date, design and
    versions; the benchmark keeps every round's times for all 27 cases, and its GPU-alone ratios match the first
    run's to 3% while the recorded ones do not; the check record keeps the summary lines the chapter prints."""
    data = importlib.resources.files("bnlib").joinpath("data")
    run1, run2 = (json.loads(data.joinpath(f"gpu_bench_NVIDIA_H200_design3{s}.json").read_text()) for s in ("", "_run2"))
    env = run2["environment"]
    assert (env["card"], env["date"], env["design"], env["torch"], env["cupy"]) == \
        ("NVIDIA H200", "2026-12-04", 3, "2.11.0+cu130", "14.2.0") and not run2["partial"]
    key = lambda r: (tuple(r["shape"]), r["dtype"], r["layout"], r["impl"])
    rows1, rows2 = ({key(r): r for r in run["results"]} for run in (run1, run2))
    bare = [k for k in rows2 if k[3] == "bnlib"]
    assert len(bare) == 27 and all(len(rows2[k]["step_repeats_ms"]) == 20 and len(rows2[k]["step_ratio_quartiles"]) == 3
                                   and 4 <= len(rows2[k]["step_device_repeats_ms"]) <= 20 for k in bare)   # minus drops
    ratio = lambda rows, k, t: rows[k][t] / rows[k[:3] + ("torch",)][t]
    moves = [ratio(rows2, k, "step_device_ms") / ratio(rows1, k, "step_device_ms") for k in bare]
    assert 0.97 < min(moves) and max(moves) < 1.03
    queued = [ratio(rows2, k, "step_ms") / ratio(rows1, k, "step_ms") for k in bare]
    assert min(queued) < 0.7 and max(queued) > 2
    for name in ("gpu_profile_NVIDIA_H200_design3_run2.json", "gpu_ncu_NVIDIA_H200_design3.json"):
        e = json.loads(data.joinpath(name).read_text())["environment"]
        assert (e["card"], e["date"], e["design"], e["torch"]) == ("NVIDIA H200", "2026-12-04", 3, "2.11.0+cu130"), name
    check = json.loads(data.joinpath("gpu_check_NVIDIA_H200_design3_run2.json").read_text())
    assert check["environment"]["commit"] == "68fd3ba" and check["rerun"]["nbval_05.log"] == ["55 passed in 29.10s"]
