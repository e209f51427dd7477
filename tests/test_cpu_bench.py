"""bnlib.cpu backend switching and bnlib.bench (chapter 04); no timings are asserted."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from bnlib import bench, cpu
from bnlib import functional as F
from conftest import ROOT
from reference import numpy_channels_last


def test_backend_switch():
    assert "numpy" in cpu.available_backends() and "portable" in cpu.available_backends()
    previous = cpu.set_backend("portable")
    try:
        assert not cpu.supports(np.ones((2, 2), np.float32))
    finally:
        cpu.set_backend(previous)
    assert cpu.supports(np.ones((2, 2), np.float32)) and not cpu.supports(np.ones((2, 2), np.float16))
    with pytest.raises(ValueError, match="backend"):
        cpu.set_backend("fortran")
    assert cpu.get_backend() == previous


@pytest.mark.parametrize("shape", [(3, 2), (70_000, 1), (300, 300), (2, 1, 70_000), (5, 3, 1, 1), (40, 3, 50, 50)])
def test_fast_paths_on_edge_shapes(shape, cpu_backend):
    """Tiny and large (threaded) sizes, C = 1, L = 1, against the float64 reference."""
    from bnlib import functional as F
    from reference import bn_forward_ref
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) + 1e3).astype(np.float32)
    y, cache = F.batch_norm_forward(x)
    # float32 data at an offset of 1e3 carry about 6e-5 of rounding each; normalized, that grows by 1/sigma
    np.testing.assert_allclose(y, bn_forward_ref(x, None, None, 1e-5)[0], atol=2e-6 * 1e3 * float(cache.inv_std.max()))
    dx, _, _ = F.batch_norm_backward(np.ones_like(x), cache)
    # all-ones dy: the true dx is zero; float32 leaves a residue of order eps32 * offset / sigma
    assert np.abs(dx).max() < 1e-6 * 1e3 * float(cache.inv_std.max())


def test_bench_runs_and_reports_ratios():
    rows = bench.bench_cpu(shapes=[(8, 4, 3, 3), (32, 8)], repeats=2, progress=False)
    impls = {r["impl"] for r in rows}
    assert impls == {"torch", "torch (autograd)"} | {f"bnlib[{b}]" for b in cpu.available_backends()}
    for r in rows:
        assert r["forward_ms"] > 0 and r["step_ms"] > 0
        # every repeat kept, in order, with the page faults of its timed call (counted on Linux)
        assert len(r["forward_repeats_ms"]) == len(r["step_repeats_ms"]) == 2
        assert np.median(r["step_repeats_ms"]) == pytest.approx(r["step_ms"])
        assert np.median(r["forward_repeats_ms"]) == pytest.approx(r["forward_ms"])
        assert len(r["forward_repeat_faults"]) == len(r["step_repeat_faults"]) == 2
        assert all(isinstance(n, int) and n >= 0 for n in r["forward_repeat_faults"] + r["step_repeat_faults"])
        if r["impl"].startswith("torch"):            # the reference: the faster of the two torch rows
            assert r["step_ratio"] >= 1.0 and r["forward_ratio"] >= 1.0
        elif r["impl"].startswith("bnlib"):
            assert r["extra_tensors"] >= 0
        else:
            assert "extra_tensors" not in r
    for shape in ([8, 4, 3, 3], [32, 8]):
        torch_rows = [r for r in rows if r["shape"] == shape and r["impl"].startswith("torch")]
        assert min(r["step_ratio"] for r in torch_rows) == 1.0 and min(r["forward_ratio"] for r in torch_rows) == 1.0
    table = bench.format_table(rows)
    assert "fwd/torch" in table and "(32, 8)" in table


@pytest.mark.parametrize("kwargs, words", [
    (dict(shapes=[(16,)]), ["shape", "(16,)"]),                    # was an IndexError at shape[1]
    (dict(shapes=[(4, 0)]), ["shape", "(4, 0)"]),
    (dict(repeats=0), ["repeats", "0"]),                           # was rows of NaN
    (dict(threads=-1), ["threads", "-1"]),
    (dict(shapes=[8]), ["shapes", "8"]),                            # was a TypeError from tuple(8)
    (dict(shapes=[(1, 4)]), ["(1, 4)", "1 value per channel"]),     # was torch's error, after the timing began
    (dict(backends=["cuda"]), ["backends", "cuda"]),                # was checked only inside the timing loop
    (dict(copy_nbytes=0), ["copy_nbytes", "0"]),                    # was a ZeroDivisionError
])
def test_bench_refuses_bad_arguments_before_changing_thread_counts(kwargs, words, monkeypatch):
    """Checked first: no thread count is set (restoring them afterwards would hide that) and the 256 MiB copy
    that measures the bandwidth does not run."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("torch threads", n)))
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *a, **k: calls.append("copy_bandwidth") or 1e10)
    with pytest.raises(ValueError) as info:
        bench.bench_cpu(**{"shapes": [(8, 4)], "progress": False, **kwargs})
    assert all(w in str(info.value) for w in words), str(info.value)
    assert calls == []


def test_bench_takes_shapes_from_a_generator_and_as_array_rows(monkeypatch):
    """The checks read the shapes before the run: a generator must still give its shapes to the run (checking
    used it up once, and the benchmark timed nothing), and rows of a NumPy array are shapes too."""
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *a, **k: 1e10)
    for shapes in ((s for s in [(8, 4)]), np.array([[8, 4]])):
        rows = bench.bench_cpu(shapes=shapes, repeats=1, backends=["numpy"], progress=False)
        assert [r["shape"] for r in rows] == [[8, 4]] * 3 and all(type(n) is int for n in rows[0]["shape"])   # torch, autograd, numpy


def test_bench_refuses_a_backend_name_given_as_a_string_and_median_ms_zero_repeats(monkeypatch):
    monkeypatch.setattr(bench, "copy_bandwidth", lambda *a, **k: pytest.fail("timed before the check"))
    with pytest.raises(TypeError, match=r"backends must be a list .*\['numpy'\], got the string 'numpy'"):
        bench.bench_cpu(shapes=[(8, 4)], backends="numpy", progress=False)    # was read letter by letter: 'n'
    with pytest.raises(ValueError, match="repeats must be a positive integer, got 0"):
        bench.median_ms(lambda: None, repeats=0)                             # was NaN and a warning


def test_peak_extra_memory_runs_one_step_untraced_first(monkeypatch):
    """A first call of a numba path compiles, and its allocations (27 MB for a 32 KB tensor, in one review)
    were counted as the step's. Here a first forward that allocates 32 MiB and frees it at once stands for
    that compilation: it must not reach the measurement."""
    real, first = bench.F.batch_norm_forward, [True]

    def forward(*args):
        if first.pop() if first else False:
            np.ones(1 << 22)                                   # 32 MiB, freed at once
        return real(*args)

    monkeypatch.setattr(bench.F, "batch_norm_forward", forward)
    rng = np.random.default_rng(0)
    x, dy = (rng.normal(size=(16, 8, 4, 4)).astype(np.float32) for _ in range(2))
    extra, _ = bench.peak_extra_memory(x, dy, np.ones(8, np.float32), np.zeros(8, np.float32))
    assert not first and extra < 1 << 20, extra


def test_bench_gives_blas_the_same_thread_count(monkeypatch):
    """bench_cpu(threads=t) sets NumPy's BLAS, torch and numba to t threads while it times (the numpy
    backend's reductions run in BLAS), says so in each row, and gives all three their counts back afterwards."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import torch
    from bnlib import functional as F

    def blas_threads():
        return {info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"}

    before = blas_threads()
    if not before:
        pytest.skip("no BLAS library that threadpoolctl sees")
    threads = 2 if before == {1} else 1                 # a count BLAS does not already have
    torch_before = torch.get_num_threads()
    numba_before = cpu.numba.get_num_threads() if cpu.numba is not None else None
    seen, forward = [], F.batch_norm_forward

    def spy(*args, **kwargs):
        seen.append((blas_threads(), torch.get_num_threads(),
                     cpu.numba.get_num_threads() if cpu.numba is not None else None))
        return forward(*args, **kwargs)

    monkeypatch.setattr(F, "batch_norm_forward", spy)
    rows = bench.bench_cpu(shapes=[(16, 4)], repeats=1, threads=threads, backends=["numpy"], progress=False,
                           copy_nbytes=1 << 16)
    numba_expected = min(threads, cpu.numba.config.NUMBA_NUM_THREADS) if cpu.numba is not None else None
    assert seen and all(s == ({threads}, threads, numba_expected) for s in seen)
    assert {r["blas_threads"] for r in rows} == {threads} and {r["threads"] for r in rows} == {threads}
    assert blas_threads() == before and torch.get_num_threads() == torch_before
    if numba_before is not None:
        assert cpu.numba.get_num_threads() == numba_before


def test_bench_command_line_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CPU_SHAPES", [(16, 4, 2, 2)])
    out = tmp_path / "bench.json"
    monkeypatch.setattr(bench, "bench_cpu", lambda **kw: [
        {"shape": [16, 4, 2, 2], "impl": "torch", "threads": 1, "forward_ms": 1.0, "step_ms": 2.0,
         "forward_ratio": 1.0, "step_ratio": 1.0}])
    assert bench.main(["--cpu", "--repeats", "1", "--json", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert data["results"][0]["impl"] == "torch" and "numpy" in data["environment"]


def test_bench_command_line_modules_flag_reaches_bench_gpu(tmp_path, monkeypatch):
    """--gpu --modules asks bench_gpu for the like-for-like torch.nn vs bnlib.nn rows (modules=True);
    without --modules it does not. The GPU is faked: only the command line is tested here."""
    from bnlib import cuda
    monkeypatch.setattr(cuda, "available", lambda: True)
    calls, partial = [], []
    out = tmp_path / "gpu.json"

    def fake_bench_gpu(**kw):
        calls.append(kw)
        kw["on_rows"]([{"impl": "first case"}])          # after each case: the rows so far, on disk
        if out.exists():
            partial.append(json.loads(out.read_text()))
        return [{"impl": "torch.nn"}]
    monkeypatch.setattr(bench, "bench_gpu", fake_bench_gpu)
    monkeypatch.setattr(bench, "gpu_environment", lambda: {"gpu": "fake"})
    monkeypatch.setattr(bench, "format_gpu_table", lambda rows: "gpu table")
    assert bench.main(["--gpu", "--modules", "--repeats", "3", "--no-progress", "--json", str(out)]) == 0
    assert partial == [{"environment": {"gpu": "fake"}, "partial": True, "results": [{"impl": "first case"}]}]
    assert bench.main(["--gpu", "--repeats", "3", "--no-progress"]) == 0
    assert [kw["modules"] for kw in calls] == [True, False]
    assert [kw["launchers"] for kw in calls] == [(), ()]
    assert bench.main(["--gpu", "--launchers", "cupy", "driver", "--no-progress"]) == 0
    assert calls[-1]["launchers"] == ("cupy", "driver") and calls[-1]["compile_budget_s"] == 60.0
    assert bench.main(["--gpu", "--compile", "--compile-budget", "40", "--no-progress"]) == 0
    assert calls[-1]["compile"] is True and calls[-1]["compile_budget_s"] == 40.0
    assert calls[-1]["portable"] is False
    assert bench.main(["--gpu", "--portable", "--no-progress"]) == 0 and calls[-1]["portable"] is True
    assert calls[-1]["l2_chunks"] == ()
    assert bench.main(["--gpu", "--l2-chunks", "8", "16.5", "--no-progress"]) == 0
    assert calls[-1]["l2_chunks"] == (8.0, 16.5)
    assert calls[0]["repeats"] == 3 and calls[0]["progress"] is False and calls[0]["compile"] is False
    assert json.loads(out.read_text()) == {"environment": {"gpu": "fake"}, "partial": False,
                                           "results": [{"impl": "torch.nn"}]}


@pytest.mark.parametrize("argv, flag", [(["--modules"], "--modules"), (["--cpu", "--modules"], "--modules"),
                                        (["--launchers", "cupy"], "--launchers"), (["--portable"], "--portable"),
                                        (["--l2-chunks", "8"], "--l2-chunks")])
def test_bench_command_line_gpu_flags_without_gpu_fail_clearly(argv, flag, monkeypatch, capsys):
    monkeypatch.setattr(bench, "bench_cpu", lambda **kw: pytest.fail("the CPU benchmark must not run"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "needs --gpu" in err


@pytest.mark.parametrize("sizes", [["0"], ["8", "-1"], ["nan"], ["inf"]])
def test_bench_command_line_rejects_l2_chunk_sizes_that_are_not_positive(sizes, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--gpu", "--l2-chunks", *sizes])
    assert "--l2-chunks sizes must be > 0 MB, got " + " ".join(sizes) in capsys.readouterr().err


def test_bench_command_line_rejects_an_unknown_launcher(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--gpu", "--launchers", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_python_dash_m_bench_help():
    proc = subprocess.run([sys.executable, "-m", "bnlib.bench", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "--cpu" in proc.stdout


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_outlier_first_value_does_not_spoil_the_variance(dtype, cpu_backend):
    """The shifted-data variance starts from each channel's first value; a far outlier there must
    trigger the re-centring pass instead of cancelling digits away."""
    from bnlib import functional as F
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 8, 16, 16)).astype(dtype)
    x[0, :, 0, 0] += 300.0
    _, cache = F.batch_norm_forward(x)
    ref = x.astype(np.float64).var(axis=(0, 2, 3))
    np.testing.assert_allclose(cache.var, ref, rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("shape", [(64, 2, 32, 32), (65536, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_outlier_first_value_does_not_spoil_the_ordinary_outputs(dtype, shape, cpu_backend):
    """After a re-centring (the shift K a far outlier, 250 channel sds away), every output value, not only the
    largest, keeps round-off: the NumPy path once subtracted the new centre from the rounded x - K, which left
    the ordinary float32 values about 1e-5 off (64 units in the last place), hidden by an error measured against
    the outlier's own output of about 248. Both layouts (N, C, L) and (N, C); float64 is a regression guard only
    (the old code's error there, 2e-14, is under the bound)."""
    from bnlib import functional as F
    from reference import bn_forward_ref
    x = np.random.default_rng(5).normal(size=shape)
    x.reshape(shape[0], shape[1], -1)[0, :, 0] += 1000.0
    x = x.astype(dtype)
    gamma, beta = np.array([1.5, 0.5], dtype), np.array([0.25, -1.0], dtype)
    y, _ = F.batch_norm_forward(x, gamma, beta)
    want = bn_forward_ref(x, gamma, beta, 1e-5)[0]
    error = (np.abs(y - want) / np.maximum(1, np.abs(want))).max()
    assert error < (1e-6 if dtype == np.float32 else 1e-12), error


def test_bench_reports_bandwidth_against_the_copy_roofline(tmp_path, monkeypatch):
    """`python -m bnlib.bench --cpu` gives each row its achieved GB/s (unavoidable traffic: forward
    2 tensors, step 5) and the fraction of the measured copy bandwidth, in the table and the JSON."""
    monkeypatch.setattr(bench, "CPU_SHAPES", [(16, 8, 4, 4), (64, 32)])
    out = tmp_path / "bench.json"
    assert bench.main(["--cpu", "--repeats", "1", "--json", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {tuple(r["shape"]) for r in rows} == {(16, 8, 4, 4), (64, 32)}
    copy = {r["copy_gbs"] for r in rows}
    assert len(copy) == 1 and copy.pop() > 0.1, "one copy bandwidth, measured once, in GB/s"
    for r in rows:
        nbytes = 4 * int(np.prod(r["shape"]))
        assert r["tensor_mb"] == pytest.approx(nbytes / 1e6)
        assert r["forward_gbs"] == pytest.approx(2 * nbytes / (r["forward_ms"] / 1e3) / 1e9)
        assert r["step_gbs"] == pytest.approx(5 * nbytes / (r["step_ms"] / 1e3) / 1e9)
        assert r["step_of_copy"] == pytest.approx(r["step_gbs"] / r["copy_gbs"])
        assert r["forward_of_copy"] == pytest.approx(r["forward_gbs"] / r["copy_gbs"])
        assert r["copy_here_gbs"] > 0
    table = bench.format_table(rows)
    assert "step GB/s" in table and "of copy" in table and "copy bandwidth" in table


def test_copy_bandwidth_counts_bytes_read_and_written(monkeypatch):
    """2 * nbytes per median copy time: with a copy that takes 1 ms, 1 MB arrays give 2 GB/s."""
    monkeypatch.setattr(bench, "median_ms", lambda fn, repeats=7: (fn(), 1.0)[1])
    assert bench.copy_bandwidth(nbytes=1_000_000) == pytest.approx(2e9)


def _reference_step(x, gamma, beta, dy, eps):
    """Forward and backward of batch norm on the (already rounded) input, from the equations, in
    np.longdouble: far from zero, float64's own rounding of the mean (about 1e-12 at 1e4) divided by
    a small sigma is more than float64 batch norm's error, so a float64 reference is only good for float32."""
    wide = np.longdouble
    axes = tuple(i for i in range(x.ndim) if i != 1)
    shape = [1] * x.ndim
    shape[1] = x.shape[1]
    m = x.size // x.shape[1]
    x_, dy_ = x.astype(wide), dy.astype(wide)
    mu = x_.sum(axis=axes, keepdims=True) / m
    var = ((x_ - mu) ** 2).sum(axis=axes, keepdims=True) / m
    s = np.sqrt(var + wide(eps))
    x_hat = (x_ - mu) / s
    g = np.asarray(gamma).astype(wide).reshape(shape)
    y = g * x_hat + np.asarray(beta).astype(wide).reshape(shape)
    dgamma, dbeta = (dy_ * x_hat).sum(axis=axes, keepdims=True), dy_.sum(axis=axes, keepdims=True)
    dx = g / s * (dy_ - dbeta / m - x_hat * dgamma / m)
    return y, dx, dgamma.ravel(), dbeta.ravel(), x_hat


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_paths_accurate_far_from_zero(dtype, cpu_backend):
    """Channel means up to 1e4 with standard deviations down to 0.01 (up to 10^6 sigma from zero):
    every path stays within a few units in the last place of the float64 reference. A path that
    centres on the mean rounded to x's dtype (off by up to half a unit at 1e4, 4.9e-4 in float32)
    and does not add the difference back is off by that much divided by sigma."""
    from bnlib import functional as F
    rng = np.random.default_rng(11)
    eps_dtype = float(np.finfo(dtype).eps)
    for case in range(8):
        ndim = int(rng.integers(2, 5))
        shape = [int(rng.integers(2, 300)) if ndim == 2 else int(rng.integers(2, 12)), int(rng.integers(1, 6))]
        shape += [int(rng.integers(1, 9)) for _ in range(ndim - 2)]
        c = shape[1]
        offset = rng.choice([-1.0, 1.0], size=c) * 10.0 ** rng.uniform(2, 4, size=c)
        std = 10.0 ** rng.uniform(-2, 0, size=c)
        cs = [1] * ndim
        cs[1] = c
        x = (offset.reshape(cs) + std.reshape(cs) * rng.normal(size=shape)).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        gamma = rng.uniform(0.5, 2, size=c).astype(dtype)
        beta = rng.normal(size=c).astype(dtype)
        y, cache = F.batch_norm_forward(x, gamma, beta, 1e-5)
        dx, dgamma, dbeta = F.batch_norm_backward(dy, cache)
        y_ref, dx_ref, dg_ref, db_ref, x_hat = _reference_step(x, gamma, beta, dy, 1e-5)
        axes = tuple(i for i in range(ndim) if i != 1)
        what = f"case {case}: shape {tuple(shape)}, {np.dtype(dtype).name}, {cpu_backend}"
        sigma = np.sqrt(x.astype(np.longdouble).var(axis=axes) + 1e-5)
        # a float64 mean is itself rounded (to ~1e-16 of |mean|), which no path can avoid without
        # wider arithmetic; that error, divided by sigma, is the floor of what float64 input can reach
        floor = 16 * float(np.finfo(np.float64).eps) * np.abs(offset) / sigma            # (C,)
        assert np.abs(y - y_ref).max() <= 16 * eps_dtype * (1 + np.abs(y_ref).max()) + (np.abs(gamma) * floor).max(), what
        dx_scale = (np.abs(gamma) / sigma).max() * np.abs(dy).max()
        assert np.abs(dx - dx_ref).max() <= (64 * eps_dtype + floor.max()) * dx_scale, what
        sum_abs_dy = np.abs(dy.astype(np.longdouble)).sum(axis=axes)
        assert np.all(np.abs(dgamma - dg_ref) <= 32 * eps_dtype * np.abs(dy * x_hat).sum(axis=axes) + floor * sum_abs_dy), what
        assert np.all(np.abs(dbeta - db_ref) <= 32 * eps_dtype * sum_abs_dy), what


def test_far_mean_small_sigma_regression(cpu_backend):
    """The case that exposed the rounded mean: (4096, 3) float32, mean 1e4, sigma 0.1. Centring on the
    float32 mean without adding back its rounding put y off by ~3e-3 and dgamma by ~1e-1."""
    from bnlib import functional as F
    rng = np.random.default_rng(0)
    x = (1e4 + 0.1 * rng.standard_normal((4096, 3))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    y, cache = F.batch_norm_forward(x, gamma, beta)
    dx, dgamma, dbeta = F.batch_norm_backward(dy, cache)
    y_ref, dx_ref, dg_ref, db_ref, _ = _reference_step(x, gamma, beta, dy, 1e-5)
    assert np.abs(y - y_ref).max() < 1e-6
    assert np.abs(dx - dx_ref).max() < 2e-5 * np.abs(dx_ref).max()
    assert np.abs(dgamma - dg_ref).max() < 1e-3 and np.abs(dbeta - db_ref).max() < 1e-3


@pytest.mark.parametrize("argv, words", [
    (["--threads", "-1"], "--threads"), (["--threads", "0"], "--threads"), (["--gpu", "--threads", "2"], "--threads"),
    (["--compile"], "need --gpu"), (["--compile-budget", "5"], "need --gpu"),
    (["--gpu", "--compile", "--compile-budget", "0"], "--compile-budget"),
    (["--json", "/nonexistent_folder_of_bnlib/out.json"], "does not exist"),
    # a folder passed the check (its parent exists), and the JSON was lost after the whole run; "" wrote nothing
    (["--json", "/tmp"], "not a folder"), (["--json", "/tmp/bnlib_no_such_folder/"], "not a folder"),
    (["--json", ""], "not a folder")])
def test_bench_command_line_refuses_bad_arguments_before_running(argv, words, monkeypatch, capsys):
    monkeypatch.setattr(bench, "bench_cpu", lambda **kw: pytest.fail("the benchmark must not run"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.skipif("numba" not in cpu.available_backends(), reason="numba is not installed")
@pytest.mark.parametrize("rows", [2, 3, 4, 5, 6, 7, 9, 130, 131, 133, 2050])
def test_numba_row_kernels_leave_no_row_out(rows, monkeypatch):
    """The (N, C) kernels (statistics and backward sums) take four rows at a time and then the last 0 to 3 rows of
    each block: every count of rows left over, on the serial kernels (one block) and on the threaded ones (one block
    per thread, PARALLEL_MIN_SIZE lowered to 0), float32 and float64; the mean, variance, y, dx, dgamma and dbeta against
    the float64 reference. A row summed twice or skipped would move the statistics by about 1/rows of a value."""
    from bnlib import functional as F
    from reference import bn_forward_ref
    previous = cpu.set_backend("numba")
    try:
        for parallel in (False, True):
            monkeypatch.setattr(cpu, "PARALLEL_MIN_SIZE", 0 if parallel else 1 << 62)
            ran = []
            monkeypatch.setattr(cpu, "_row_blocks", lambda n, k, real=cpu._row_blocks: ran.append(k) or real(n, k))
            for dtype in (np.float32, np.float64):
                rng = np.random.default_rng(10 * rows + parallel)
                c = 37
                x = (rng.normal(size=(rows, c)) * rng.uniform(0.5, 3, c) + rng.uniform(-40, 40, c)).astype(dtype)
                dy = rng.normal(size=(rows, c)).astype(dtype)
                gamma, beta = rng.uniform(0.5, 2, c).astype(dtype), rng.normal(size=c).astype(dtype)
                y, cache = F.batch_norm_forward(x, gamma, beta)
                dx, dgamma, dbeta = F.batch_norm_backward(dy, cache)
                want_y, mu, var = bn_forward_ref(x, gamma, beta, 1e-5)
                x64, dy64, g64 = x.astype(np.float64), dy.astype(np.float64), gamma.astype(np.float64)
                x_hat = (x64 - mu) / np.sqrt(var + 1e-5)
                want_dbeta, want_dgamma = dy64.sum(0), (dy64 * x_hat).sum(0)
                want_dx = g64 / np.sqrt(var + 1e-5) * (dy64 - want_dbeta / rows - x_hat * want_dgamma / rows)
                tol = 3e-5 if dtype == np.float32 else 1e-10
                np.testing.assert_allclose(cache.mean, mu, rtol=tol / 30, atol=tol * np.sqrt(var).max())   # ~1e-6 of a mean of 40
                np.testing.assert_allclose(cache.var, var, rtol=tol)
                np.testing.assert_allclose(y, want_y, rtol=0, atol=tol * np.abs(want_y).max())
                np.testing.assert_allclose(dbeta, want_dbeta, rtol=0, atol=tol * np.abs(dy64).sum(0).max())
                np.testing.assert_allclose(dgamma, want_dgamma, rtol=0, atol=tol * np.abs(dy64 * x_hat).sum(0).max())
                # dx is a difference of terms of size gamma / s * |dy| (with 2 rows it is 0 up to eps's share)
                np.testing.assert_allclose(dx, want_dx, rtol=0, atol=tol * (g64 / np.sqrt(var + 1e-5) * np.abs(dy64)).max())
            kernels = cpu.PARALLEL_KERNELS if parallel else cpu.SERIAL_KERNELS
            assert ran and all(k is kernels for k in ran), (parallel, ran)          # the kernels meant ran
    finally:
        cpu.set_backend(previous)


def test_row_blocks_one_per_thread_one_when_serial():
    """The (N, C) kernels' blocks of rows: one for the serial kernels, one per thread for the threaded ones (numba
    hands each thread an equal share of them, so more would only add partial sums), never more than there are rows."""
    if "numba" not in cpu.available_backends():
        pytest.skip("numba is not installed")
    threads = cpu.numba.get_num_threads()
    assert cpu._row_blocks(1000, cpu.SERIAL_KERNELS) == 1
    assert cpu._row_blocks(1000, cpu.PARALLEL_KERNELS) == threads
    assert cpu._row_blocks(1, cpu.PARALLEL_KERNELS) == 1


def test_seconds_and_faults_counts_the_faults_of_the_timed_call():
    """A call that touches 256 fresh pages meets at least 200 faults (the settling calls before it are not counted:
    each maps its own pages); a call that touches no memory meets none, or nearly; no resource module: None."""
    import mmap

    def touch_fresh_pages(pages=256):
        m = mmap.mmap(-1, pages * mmap.PAGESIZE)              # anonymous: fresh pages, mapped on first touch
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            m.madvise(mmap.MADV_NOHUGEPAGE)                    # one fault per small page, not per huge page
        for i in range(0, pages * mmap.PAGESIZE, mmap.PAGESIZE):
            m[i] = 1
        m.close()

    seconds, faults = bench._seconds_and_faults(touch_fresh_pages)
    assert seconds > 0 and 200 <= faults < 1000
    _, idle_faults = bench._seconds_and_faults(lambda: None)
    assert idle_faults < 50
    assert bench._seconds(lambda: None) >= 0


def test_seconds_and_faults_without_a_fault_counter(monkeypatch):
    monkeypatch.setattr(bench, "resource", None)             # as on Windows
    seconds, faults = bench._seconds_and_faults(lambda: None)
    assert seconds >= 0 and faults is None


_LAYOUTS = {                      # the same values, stored five ways
    "C": np.ascontiguousarray,
    "Fortran": np.asfortranarray,
    "channels-last": numpy_channels_last,
    "channels-first": lambda a: np.ascontiguousarray(np.moveaxis(a, 1, 0)).transpose(1, 0, *range(2, a.ndim)),
    "strided": lambda a: np.repeat(a, 2, axis=0)[::2],
}


@pytest.mark.parametrize("shape", [(7, 3, 5, 4), (16, 5), (3, 1, 2, 2, 3), (2, 6, 1, 1), (9, 4, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_paths_take_any_dense_layout(shape, dtype, cpu_backend):
    """Training forward and backward agree with the float64 reference for x and dy in any of five layouts (each
    pair), and y and dx are laid out as x (one dense block) or C-contiguous (x strided)."""
    rng = np.random.default_rng(len(shape) * 10 + shape[1])
    x0 = rng.normal(2, 3, size=shape).astype(dtype)
    dy0 = rng.normal(size=shape).astype(dtype)
    g, b = rng.normal(size=shape[1]).astype(dtype), rng.normal(size=shape[1]).astype(dtype)
    y64, c64 = F.portable_batch_norm_forward(x0.astype(np.float64), g.astype(np.float64), b.astype(np.float64))
    want = (y64, *F.portable_batch_norm_backward(dy0.astype(np.float64), c64))
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for x_layout, to_x in _LAYOUTS.items():
        for dy_layout, to_dy in _LAYOUTS.items():
            x, dy = to_x(x0), to_dy(dy0)
            assert np.array_equal(x, x0) and np.array_equal(dy, dy0)
            y, cache = F.batch_norm_forward(x, g, b)
            dx, dg, db = F.batch_norm_backward(dy, cache)
            for name, got, ref in zip(("y", "dx", "dgamma", "dbeta"), (y, dx, dg, db), want):
                err = np.abs(got - ref).max() / max(1.0, np.abs(ref).max())
                assert err < tol, (x_layout, dy_layout, name, err)
            if cpu_backend != "portable":
                same = cpu.dense_order(x) if cpu.dense_order(x) is not None else tuple(range(x.ndim))
                for out in (y, dx):                  # laid out as x: its axes in x's memory order are C-contiguous
                    assert out.transpose(same).flags.c_contiguous, (x_layout, dy_layout, out.strides, x.strides)


def test_fast_paths_copy_nothing_for_any_dense_layout():
    """The peak extra memory of a training step, in tensors: none tensor-sized (under 0.2: arrays of partial sums)
    for x and dy both C-contiguous, Fortran-ordered, channels-last or channels-first; one (dy put into x's order)
    when dy is laid out otherwise; two (x and dy copied to C order in the backward pass) when both are strided."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((32, 16, 14, 14), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    g, b = np.ones(16, np.float32), np.zeros(16, np.float32)
    previous = cpu.get_backend()
    try:
        for backend in cpu.available_backends():
            if backend == "portable":
                continue
            cpu.set_backend(backend)
            for name in ("C", "Fortran", "channels-last", "channels-first"):
                tensors = bench.peak_extra_memory(_LAYOUTS[name](x), _LAYOUTS[name](dy), g, b)[1]
                assert tensors < 0.2, (backend, name, tensors)          # partial sums, not a tensor
            assert 0.95 < bench.peak_extra_memory(np.asfortranarray(x), dy, g, b)[1] < 1.2
            strided = _LAYOUTS["strided"]
            assert 1.95 < bench.peak_extra_memory(strided(x), strided(dy), g, b)[1] < 2.2
    finally:
        cpu.set_backend(previous)
