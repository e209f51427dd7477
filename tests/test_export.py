"""tools/export.py: bnlib/ is exactly what the notebooks export, and drift is caught."""
import json
import shutil
import subprocess
import sys

from conftest import ROOT


def run_export(root, *args):
    return subprocess.run([sys.executable, str(root / "tools" / "export.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_bnlib_matches_the_notebooks():
    proc = run_export(ROOT, "--check")
    assert proc.returncode == 0, proc.stderr


def test_check_catches_drift_and_export_repairs_it(tmp_path):
    for part in ("tools", "chapters", "bnlib"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", "data"))
    functional = tmp_path / "bnlib" / "functional.py"
    functional.write_text(functional.read_text() + "\n# a hand edit\n")
    proc = run_export(tmp_path, "--check")
    assert proc.returncode == 1 and "bnlib/functional.py" in proc.stderr
    assert run_export(tmp_path).returncode == 0
    assert run_export(tmp_path, "--check").returncode == 0


def test_generated_modules_say_where_to_edit_and_declare_all():
    import bnlib.functional
    text = (ROOT / "bnlib" / "functional.py").read_text()
    assert text.startswith("# GENERATED FILE") and "chapters/02_forward.ipynb" in text
    assert {"batch_norm_forward", "batch_norm_inference", "update_running_stats"} <= set(bnlib.functional.__all__)
    assert "reference_forward" not in text            # teaching and test code stays in the notebook


def test_export_directives(tmp_path):
    """default_exp names the module, a bare export goes there, `export other` goes elsewhere."""
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "export.py", tmp_path / "tools")
    (tmp_path / "chapters").mkdir()
    (tmp_path / "bnlib").mkdir()
    cells = [
        {"cell_type": "code", "source": "#| default_exp alpha\nimport math", "metadata": {}, "outputs": [], "execution_count": None},
        {"cell_type": "code", "source": "#| export\ndef f():\n    return 1", "metadata": {}, "outputs": [], "execution_count": None},
        {"cell_type": "code", "source": "def scratch():\n    pass", "metadata": {}, "outputs": [], "execution_count": None},
        {"cell_type": "code", "source": "#| export beta\n_private = 2\nG = 3", "metadata": {}, "outputs": [], "execution_count": None},
    ]
    nb = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "chapters" / "01_x.ipynb").write_text(json.dumps(nb))
    assert run_export(tmp_path).returncode == 0
    alpha = (tmp_path / "bnlib" / "alpha.py").read_text()
    beta = (tmp_path / "bnlib" / "beta.py").read_text()
    assert "__all__ = ['f']" in alpha and "def f()" in alpha and "scratch" not in alpha and "import math" not in alpha
    assert "__all__ = ['G']" in beta and "_private = 2" in beta
