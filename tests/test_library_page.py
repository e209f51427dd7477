"""The book's library page (library.md) and the README's programs: every bnlib module has its reference
section, and every Python program they show runs as it stands, with the checkout's bnlib, in an empty folder.
What the built page holds is checked in tests/test_book.py (it needs the book built)."""
import importlib
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


def test_the_page_is_in_the_book_before_the_references():
    toc = (ROOT / "_toc.yml").read_text(encoding="utf-8")
    assert "- file: library\n      - file: references" in toc


RUNNER = """
import sys
for i, source in enumerate(sys.argv[1:]):
    try:
        exec(compile(source, f"<program {i + 1}>", "exec"), {"__name__": "__main__"})
    except BaseException:
        print(f"program {i + 1} failed:", file=sys.stderr)
        raise
"""


@pytest.mark.parametrize("path", [PAGE, README], ids=["library.md", "README.md"])
def test_every_python_program_runs(path, tmp_path):
    """Each program in its own namespace, all in one fresh process (torch loads once) in an empty folder,
    bnlib from the checkout."""
    programs = _programs(path)
    assert len(programs) >= 2, f"{path.name}: no Python programs found"
    env = {k: v for k, v in os.environ.items() if k != "BNLIB_SMOKE"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", RUNNER, *programs], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{path.name}:\n{proc.stderr[-3000:]}"
    assert "bnlib" not in {p.name for p in tmp_path.iterdir()}


def test_a_failing_program_fails_the_runner(tmp_path):
    proc = subprocess.run([sys.executable, "-c", RUNNER, "x = 1", "assert x == 2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
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
    # '(...): ' inside a sentence does not start an item
    assert bnlib_api.reflow([long, "pass): change x"]) == [long + " pass): change x"]


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
    # a long value is described, a short one shown
    assert bnlib_api._describe(functional.SUPPORTED_DTYPES) == ["Value: ``('float16', 'float32', 'float64')``"]
    assert bnlib_api._describe(cuda.KERNEL_SOURCE)[0].startswith("A string of ")
