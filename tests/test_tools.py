"""The maintainers' scripts in tools/: each answers --help with its usage and refuses an unknown option, without
running anything (record_ptxas.py, say, would overwrite package data, and the GPU scripts start CUDA work); and
tools/gpu_check.sh's control flow, run with stubs in place of python3, nvidia-smi and compute-sanitizer."""
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
SCRIPTS = sorted(p.name for p in TOOLS.glob("*.py") if "__main__" in p.read_text() or p.name == "gpu_fair_step.py")


def test_every_script_is_listed():
    """gpu_record.py is a module the sweeps import, not a script; every other .py is one."""
    assert set(p.name for p in TOOLS.glob("*.py")) - set(SCRIPTS) == {"gpu_record.py"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_an_unknown_option_is_refused(script):
    help_ = subprocess.run([sys.executable, str(TOOLS / script), "--help"], capture_output=True, text=True,
                           timeout=120, cwd=TOOLS.parent)
    assert help_.returncode == 0 and help_.stdout.startswith("usage:"), help_.stdout[-500:] + help_.stderr[-2000:]
    bad = subprocess.run([sys.executable, str(TOOLS / script), "--no-such-option"], capture_output=True, text=True,
                         timeout=120, cwd=TOOLS.parent)
    assert bad.returncode == 2 and "error:" in bad.stderr, bad.stdout[-500:] + bad.stderr[-2000:]   # argparse's


# tools/gpu_check.sh's control flow, on this machine: python3, nvidia-smi and compute-sanitizer replaced by stubs
# that log their calls (and write each --json file), in a copy of the script in an empty folder (the script copies
# recordings into bnlib/data/ of its own checkout). A GPU session gets one run of it: a shell error there would
# cost the steps after it.
STUB_PYTHON = r"""#!/usr/bin/env bash
printf 'python3 %s\n' "$*" >> "$CALLS"
case "$*" in
    *"SMOKE WRONG"*) echo "preflight stub through $BNLIB_CUDA_LAUNCH"
                     rc_name="STUB_PREFLIGHT_RC_$BNLIB_CUDA_LAUNCH"; exit "${!rc_name:-0}" ;;
    *"print(torch.cuda.get_device_name())"*) echo "NVIDIA H200"; exit 0 ;;
    *"print(cuda.KERNEL_DESIGN)"*) echo 3; exit 0 ;;
    *"import nbval, ipykernel"*) exit 0 ;;
esac
if [ -n "${STUB_FAIL:-}" ] && [[ "$*" == *"$STUB_FAIL"* ]]; then echo "stub failure"; exit 1; fi
printf 'launcher %s\n' "${BNLIB_CUDA_LAUNCH:-default}" >> "$CALLS"
args=("$@")
for i in "${!args[@]}"; do
    if [ "${args[$i]}" = "--json" ]; then echo '{"stub": true}' > "${args[$((i + 1))]}"; fi
done
echo "stub ok"
"""
STUB_SANITIZER = r"""#!/usr/bin/env bash
printf 'sanitizer %s\n' "$*" >> "$CALLS"
if [ -n "${STUB_SANITIZER_FAIL:-}" ] && [[ "$*" == *"$STUB_SANITIZER_FAIL"* ]]; then echo "stub hazard"; exit 9; fi
echo '========= ERROR SUMMARY: 0 errors'
"""
STUB_SMI = "#!/usr/bin/env bash\necho name\necho NVIDIA H200\n"
GPU_CHECK_ORDER = ["SMOKE WRONG", "tests/test_cuda.py", "tests/test_nn.py", "--tool racecheck", "--tool memcheck",
                   "chapters/05_cupy.ipynb", "-m bnlib.bench", "tools/gpu_profile.py", "--tool initcheck",
                   "--tool synccheck", "tools/gpu_grid_sweep.py", "tools/gpu_ncu.py", "chapters/06_pytorch.ipynb",
                   "chapters/08_variants.ipynb", "chapters/09_faq.ipynb", "tools/gpu_l2_chunks.py"]
RECORDINGS = [f"gpu_{kind}_NVIDIA_H200_design3.json" for kind in ("bench", "profile", "grid", "ncu", "l2chunks")]


def _run_gpu_check(tmp_path, sanitizer=True, **env):
    repo, stubs, out = tmp_path / "repo", tmp_path / "stubs", tmp_path / "out"
    (repo / "tools").mkdir(parents=True)
    shutil.copy(TOOLS / "gpu_check.sh", repo / "tools")
    stubs.mkdir()
    for name, text in (("python3", STUB_PYTHON), ("nvidia-smi", STUB_SMI)) + ((("compute-sanitizer", STUB_SANITIZER),)
                                                                               if sanitizer else ()):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    path = ":".join([str(stubs)] + [p for p in os.environ["PATH"].split(":")        # no real compute-sanitizer
                                     if not (pathlib.Path(p) / "compute-sanitizer").exists()])
    calls = tmp_path / "calls"
    proc = subprocess.run(["bash", str(repo / "tools" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": path, "OUT": str(out), "CALLS": str(calls), **env})
    logs = sorted(m.name for m in tarfile.open(out / "logs.tgz").getmembers()) if (out / "logs.tgz").exists() else []
    return proc, calls.read_text().splitlines(), repo, out, logs


def _positions(calls, steps):
    return [next((i for i, call in enumerate(calls) if step in call), None) for step in steps]


def test_gpu_check_runs_every_step_in_order_and_keeps_the_recordings(tmp_path):
    proc, calls, repo, out, logs = _run_gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    where = _positions(calls, GPU_CHECK_ORDER)
    assert None not in where and where == sorted(where), dict(zip(GPU_CHECK_ORDER, where))
    assert sum("-m bnlib.bench" in c for c in calls) == 1                      # the benchmark runs once
    for name in RECORDINGS:                                                    # in $OUT, and copied into the package
        assert (out / name).read_text() == (repo / "bnlib" / "data" / name).read_text() == '{"stub": true}\n'
    assert not list(out.glob("*.log")) and "./sanitize_initcheck.log" in logs and "./bench_gpu.log" in logs


def test_gpu_check_goes_on_after_a_failed_step_and_never_overwrites_a_recording(tmp_path):
    (tmp_path / "repo" / "bnlib" / "data").mkdir(parents=True)
    kept = tmp_path / "repo" / "bnlib" / "data" / RECORDINGS[1]
    kept.write_text("the earlier run")
    proc, calls, repo, out, logs = _run_gpu_check(tmp_path, sanitizer=False, STUB_FAIL="-m bnlib.bench")
    assert proc.returncode == 1                                                 # a failed step fails the run ...
    steps = [s for s in GPU_CHECK_ORDER if "--tool" not in s]
    assert None not in _positions(calls, steps)                                # ... and every later step still ran
    assert not any(c.startswith("sanitizer") for c in calls)
    assert "no race or memory check" in proc.stdout and "no initcheck or synccheck" in proc.stdout
    assert not (out / RECORDINGS[0]).exists() and not (repo / "bnlib" / "data" / RECORDINGS[0]).exists()
    assert kept.read_text() == "the earlier run" and (out / RECORDINGS[1]).exists()
    assert f"bnlib/data/{RECORDINGS[1]} exists" in proc.stdout


def test_gpu_check_fails_when_the_last_sanitizer_tool_finds_an_error(tmp_path):
    proc, calls, repo, out, logs = _run_gpu_check(tmp_path, STUB_SANITIZER_FAIL="--tool synccheck")
    assert proc.returncode == 1 and "stub hazard" in proc.stdout               # step 5b's status reaches the exit
    assert None not in _positions(calls, GPU_CHECK_ORDER)


@pytest.mark.parametrize("driver_rc, cupy_rc, outcome", [
    (1, 0, "cupy"),          # the driver launch path fails: CuPy's kernel call for the rest of the run, marked failed
    (3, 0, "default"),       # wrong values through the driver path: the run goes on (to diagnose), marked failed
    (1, 1, "stopped"),       # both launch paths fail: nothing else runs
    (124, 0, "stopped"),     # the compile or the first launch hangs: the later steps would hang the same way
])
def test_gpu_check_preflight_retries_through_cupy_or_stops(tmp_path, driver_rc, cupy_rc, outcome):
    proc, calls, repo, out, logs = _run_gpu_check(tmp_path, STUB_PREFLIGHT_RC_driver=str(driver_rc),
                                                  STUB_PREFLIGHT_RC_cupy=str(cupy_rc))
    assert proc.returncode == 1, proc.stdout[-2000:]
    preflights = [c for c in calls if "SMOKE WRONG" in c]
    assert len(preflights) == (2 if driver_rc == 1 else 1)
    launchers = {c.split()[1] for c in calls if c.startswith("launcher ")}
    if outcome == "stopped":
        assert not launchers and not any("tests/test_cuda.py" in c for c in calls)
    else:
        assert launchers == {outcome} and None not in _positions(calls, GPU_CHECK_ORDER)


def test_gpu_check_killed_mid_run_keeps_its_logs_in_out(tmp_path):
    """The device tool kills a run at its time limit (SIGKILL: no exit trap runs) and brings back at most 8 files of
    $OUT: the logs written so far must already be in $OUT/logs.tgz, and $OUT must hold no loose log. Here step 3
    (chapter 05 under nbval) hangs, and the whole process group is killed once the earlier steps' logs are in."""
    import signal
    import time
    repo, stubs, out = tmp_path / "repo", tmp_path / "stubs", tmp_path / "out"
    (repo / "tools").mkdir(parents=True)
    shutil.copy(TOOLS / "gpu_check.sh", repo / "tools")
    stubs.mkdir()
    hang = STUB_PYTHON.replace('args=("$@")', 'if [[ "$*" == *"05_cupy"* ]]; then sleep 60; fi\nargs=("$@")')
    for name, text in (("python3", hang), ("nvidia-smi", STUB_SMI), ("compute-sanitizer", STUB_SANITIZER)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    path = ":".join([str(stubs)] + [p for p in os.environ["PATH"].split(":")
                                     if not (pathlib.Path(p) / "compute-sanitizer").exists()])
    proc = subprocess.Popen(["bash", str(repo / "tools" / "gpu_check.sh")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PATH": path, "OUT": str(out), "CALLS": str(tmp_path / "calls"),
                                 "GPU_CHECK_SNAPSHOT_S": "0.2", "GPU_CHECK_LOGS": str(tmp_path / "logs")})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (tmp_path / "calls").exists() and "05_cupy" in (tmp_path / "calls").read_text():
                time.sleep(1.0)                      # a few snapshot periods after the hanging step began
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the stubbed run never reached step 3")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    names = sorted(m.name for m in tarfile.open(out / "logs.tgz").getmembers())
    assert {"./gpu.txt", "./preflight.log", "./test_cuda.log", "./sanitize_memcheck.log"} <= set(names), names
    assert sorted(p.name for p in out.iterdir()) == ["logs.tgz"]


def test_gpu_check_runs_only_the_steps_asked_for(tmp_path):
    """GPU_CHECK_STEPS="6 7 8 9": the preflight, then only the grid sweep, Nsight Compute, the three chapters under
    nbval's lax mode and the L2-chunk sweep, in order, each recording kept; an unknown step is refused before any
    GPU work."""
    proc, calls, repo, out, logs = _run_gpu_check(tmp_path, GPU_CHECK_STEPS="6 7 8 9")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    later = GPU_CHECK_ORDER[GPU_CHECK_ORDER.index("tools/gpu_grid_sweep.py"):]
    where = _positions(calls, ["SMOKE WRONG"] + later)
    assert None not in where and where == sorted(where)
    assert _positions(calls, ["tests/test_cuda.py", "tests/test_nn.py", "05_cupy", "-m bnlib.bench",
                              "tools/gpu_profile.py"]) == [None] * 5 and not any(c.startswith("sanitizer") for c in calls)
    assert sorted(p.name for p in out.iterdir()) == sorted(["logs.tgz"] + [RECORDINGS[i] for i in (2, 3, 4)])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "calls").write_text("")                    # the refusal comes before any stubbed call
    proc, calls, *_ = _run_gpu_check(tmp_path / "bad", GPU_CHECK_STEPS="6 10")
    assert proc.returncode == 2 and "no step '10'" in proc.stdout and not any("SMOKE WRONG" in c for c in calls)
