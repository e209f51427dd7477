"""The maintainers' scripts in tools/: each answers --help with its usage and refuses an unknown option, without
running anything (record_ptxas.py, say, would overwrite package data, and the GPU scripts start CUDA work)."""
import pathlib
import subprocess
import sys

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
