"""tools/check_portability.py: its non-fatal asserts record every failing assert, in loops too, and let the
notebook run on; its report judges each configuration against the first (the tool itself, across BLAS
kernels, is a maintainer's run of minutes, not part of pytest)."""
import importlib.util
import os
import pathlib

import nbformat

TOOL = pathlib.Path(__file__).resolve().parents[1] / "tools" / "check_portability.py"


def _tool():
    spec = importlib.util.spec_from_file_location("check_portability", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_chapter_records_failed_asserts_and_runs_on(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# a chapter"),
                nbformat.v4.new_code_cell("x = 1\nassert x == 1\nprint('one')"),
                nbformat.v4.new_code_cell("assert x == 2, 'not two'\ny = 3"),
                nbformat.v4.new_code_cell("for i in range(3):\n    assert i < 1\nprint('after', y)"),
                nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="one\n")]
    nb.cells[3].outputs = [nbformat.v4.new_output("stream", name="stdout", text="before 3\n")]   # stored: differs
    path = tmp_path / "chapter.ipynb"
    nbformat.write(nb, path)
    result = _tool().run_chapter(str(path), str(tmp_path))
    assert result["fails"] == [(1, 1, "x == 2"), (2, 2, "i < 1"), (2, 2, "i < 1")]
    assert result["errors"] == [(3, "ValueError", "boom")]
    assert result["differing"] == 2                 # code cells 2 ('after 3') and 3 (the error); 0 matches
    assert result["runtime"].startswith("OpenBLAS ") and "torch " in result["runtime"]


def test_check_judges_each_configuration_against_the_first(monkeypatch, tmp_path):
    tool = _tool()
    monkeypatch.setenv("BNLIB_SMOKE", "1")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    seen = []

    def runner(fails_by_config):
        def run(path, folder, keep):
            k = len(seen)
            seen.append((os.environ.get("OPENBLAS_CORETYPE"), os.environ.get("BNLIB_SMOKE"),
                         os.environ["PYTHONPATH"].split(os.pathsep)[0]))
            return {"fails": fails_by_config[k], "errors": [(5, "RuntimeError", "checker")], "runtime": "fake",
                    "differing": k}
        return run

    configs = {"own": {"OPENBLAS_CORETYPE": None}, "other": {"OPENBLAS_CORETYPE": "Prescott"}}
    known = (7, 2, "checker self-test")
    assert tool.check(["ch"], configs, runner([[known], [known]]), str(tmp_path)) == 0
    assert seen == [(None, None, tool.REPO), ("Prescott", None, tool.REPO)]
    assert os.environ["OPENBLAS_CORETYPE"] == "Haswell" and os.environ["BNLIB_SMOKE"] == "1"   # restored
    seen.clear()
    assert tool.check(["ch"], configs, runner([[known], [known, (3, 1, "acc > 0.9")]]), str(tmp_path)) == 1
    seen.clear()
    assert tool.check(["ch"], configs, runner([[known], None]), str(tmp_path)) == 1      # did not finish


def test_the_pins_are_one_set_in_conftest_the_tool_and_the_readme():
    """conftest.PINNED is what pytest sets; the tool's baseline and the README's export line must be the same set,
    or a maintainer who re-executes a chapter as the README says stores outputs that nbval then rejects."""
    from conftest import PINNED, ROOT

    assert list(_tool().CONFIGS.values())[0] == PINNED
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("export OPENBLAS_CORETYPE=")
    line = readme[start:readme.index("```", start)].replace("\\\n", " ")
    assigned = dict(token.split("=", 1) for token in line.split()[1:])
    assert assigned == PINNED


def test_the_longest_first_order_names_files_of_the_suite():
    """conftest.LONGEST_FIRST orders the files xdist hands out; a name that is no file (renamed, removed) would
    silently fall back to collection order."""
    from conftest import LONGEST_FIRST, ROOT

    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    assert [p for p in LONGEST_FIRST if not (ROOT / p).is_file()] == []
