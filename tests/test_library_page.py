"""The book's library page (library.md) and the README's programs: every bnlib module has its reference
section, and every Python program they show runs as it stands, with the checkout's bnlib, in an empty folder.
What the built page holds is checked in tests/test_book.py (it needs the book built)."""
import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest

import bnlib
from conftest import ROOT

PAGE = ROOT / "library.md"
README = ROOT / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
DIRECTIVE = re.compile(r"^\.\. bnlib-module:: (\w+)$", re.M)

sys.path.insert(0, str(ROOT / "_ext"))
import bnlib_api  # noqa: E402  (the page's Sphinx extension)


def _programs(path):
    return PYTHON_BLOCK.findall(path.read_text(encoding="utf-8"))


def test_every_module_has_one_reference_section_in_the_order_of_the_package():
    assert DIRECTIVE.findall(PAGE.read_text(encoding="utf-8")) == list(bnlib._SUBMODULES)


def test_the_page_installs_from_the_configured_repository():
    import yaml
    url = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))["repository"]["url"]
    assert f'pip install "git+{url}"' in PAGE.read_text(encoding="utf-8")


def test_the_page_is_in_the_book_before_the_references():
    toc = (ROOT / "_toc.yml").read_text(encoding="utf-8")
    assert "- file: library\n      - file: references" in toc


RUNNER = """
import sys
from pathlib import Path
import bnlib
assert Path(bnlib.__file__).resolve().parent == Path(sys.argv[1]).resolve() / "bnlib", bnlib.__file__
for i, source in enumerate(sys.argv[2:]):
    try:
        exec(compile(source, f"<program {i + 1}>", "exec"), {"__name__": "__main__"})
    except BaseException:
        print(f"program {i + 1} failed:", file=sys.stderr)
        raise
"""


@pytest.mark.parametrize("path, count", [(PAGE, 7), (README, 2)], ids=["library.md", "README.md"])
def test_every_python_program_runs(path, count, tmp_path):
    """Each program in its own namespace, all in one fresh process (torch loads once) in an empty folder,
    bnlib from the checkout (the runner checks it)."""
    programs = _programs(path)
    assert len(programs) == count, f"{path.name}: {len(programs)} Python programs, expected {count}"
    env = {k: v for k, v in os.environ.items() if k != "BNLIB_SMOKE"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(ROOT), *programs], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{path.name}:\n{proc.stderr[-3000:]}"


def test_the_programs_fit_the_page_s_code_boxes():
    """76 characters: what a code box of the built page shows without scrolling in a window 1280 pixels wide
    (tests/test_book.py's browser test checks the boxes)."""
    long = [line for program in _programs(PAGE) for line in program.splitlines() if len(line) > 76]
    assert not long, long


def test_a_failing_program_fails_the_runner(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(ROOT), "x = 1", "assert x == 2"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "program 2 failed" in proc.stderr


# ----------------------------------------------------------------------------- the extension's rules

def test_reflow_joins_lines_broken_because_they_were_long():
    long = "x" * (bnlib_api.FULL - 13) + " continues on"          # FULL characters, broken there
    assert len(long) == bnlib_api.FULL
    assert bnlib_api.reflow([long, "the next line."]) == [long + " the next line."]
    # a hanging indent continues the item above it
    assert bnlib_api.reflow(["    eps: " + long, "        more of eps"]) == ["    eps: " + long + " more of eps"]


def test_reflow_keeps_every_other_line_break():
    long = "y" * bnlib_api.FULL
    short = "a short line"
    cases = [
        [short, "next"],                                  # the line before is short: the author ended it there
        [long, ""],                                       # a blank line
        [long + ":", "    an item"],                      # a line ending with ':' introduces a list
        ["    " + long, "less indented"],                 # the next item of an outer list
        [long, "Returns: y"],                             # an item "name: ..."
        [long, "x_*: (N, inputs)"],
        [long, "- a bullet"],
        [long, ">>> an example"],
    ]
    for lines in cases:
        assert bnlib_api.reflow(lines) == lines, lines
    # in an indented block, a line of the same indentation is the next item, row or formula...
    assert bnlib_api.reflow(["    " + long, "    the next item"]) == ["    " + long, "    the next item"]
    # ...unless it continues a continuation line
    assert bnlib_api.reflow(["    item: " + long, "        " + long, "        the end"]) == [
        "    item: " + long + " " + long + " the end"]
    # '(...): ' inside a sentence does not start an item
    assert bnlib_api.reflow([long, "pass): change x"]) == [long + " pass): change x"]


def test_reflow_keeps_the_rows_and_formulas_of_real_docstrings():
    from bnlib import train, variants
    rows = bnlib_api.reflow(inspect.getdoc(train.init_weights).splitlines())
    assert [line.split()[0] for line in rows if line.lstrip().startswith('"')] == ['"glorot"', '"he"']
    renorm = bnlib_api.reflow(inspect.getdoc(variants.BatchRenorm).splitlines())
    assert any(line.strip().startswith("y = weight * (") for line in renorm)      # the second formula's own line
    assert any(line.strip().startswith("r_max >= 1, d_max >= 0:") for line in renorm)


def test_every_public_name_is_attributed_to_the_chapters_that_define_it():
    definitions = bnlib_api._definitions()
    for name in bnlib._SUBMODULES:
        module = importlib.import_module(f"bnlib.{name}")
        for public in module.__all__:
            stems = definitions.get((name, public))
            assert stems, f"bnlib.{name}.{public}: no chapter defines it"
            assert all((ROOT / "chapters" / f"{stem}.ipynb").is_file() for stem in stems)
    # a function that a later chapter redefines names both chapters, the one in force last
    assert definitions[("functional", "batch_norm_forward")][0] == "02_forward"
    assert len(definitions[("functional", "batch_norm_forward")]) > 1


def test_constants_are_the_public_names_that_are_neither_routines_nor_classes():
    from bnlib import cuda, functional, gradcheck
    assert bnlib_api.constants(functional) == ["SUPPORTED_DTYPES"]
    assert "KERNEL_SOURCE" in bnlib_api.constants(cuda) and "plan" not in bnlib_api.constants(cuda)
    assert bnlib_api.constants(gradcheck) == []


def test_a_constant_shows_its_comments_and_its_assignment_as_written():
    from bnlib import cpu, cuda
    # a comment at the end of the line, and the assignment
    assert bnlib_api._constant("bnlib.cpu", "ROW_BLOCK", cpu.ROW_BLOCK) == [
        ".. code-block:: text", "   :class: bnlib-docstring", "",
        "   rows per float32 partial sum of an (N, C) reduction", "",
        ".. code-block:: python", "", "   ROW_BLOCK = 64", ""]
    # comment lines above it; a value read from the environment shows as the expression, not this machine's value
    launcher = "\n".join(bnlib_api._constant("bnlib.cuda", "LAUNCHER", cuda.LAUNCHER))
    assert "How kernels are launched." in launcher
    assert 'LAUNCHER = os.environ.get("BNLIB_CUDA_LAUNCH", "driver")' in launcher
    # an assignment too long to show: its type and size
    kernel = bnlib_api._constant("bnlib.cuda", "KERNEL_COMMON", cuda.KERNEL_COMMON)
    assert kernel[-2].startswith("A string of ") and "code-block:: python" not in kernel


def test_an_alias_is_attributed_to_the_chapters_of_the_code_it_names():
    definitions = bnlib_api._definitions()
    # chapter 04 binds portable_batch_norm_forward = batch_norm_forward, chapter 02's function, before redefining
    # batch_norm_forward; the backward is chapter 03's
    assert definitions[("functional", "portable_batch_norm_forward")] == ["02_forward"]
    assert definitions[("functional", "portable_batch_norm_backward")] == ["03_backward"]
