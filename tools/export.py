#!/usr/bin/env python3
"""Export the tested code of the chapter notebooks into the `bnlib` package.

The directives follow nbdev's syntax, so the notebooks stay familiar:

* ``#| default_exp stats`` (once per chapter) names the module the chapter writes to;
* ``#| export`` on the first lines of a code cell sends that cell to the default module;
* ``#| export functional`` sends it to another module (a chapter may add to an earlier one).

Cells without a directive (teaching versions, tests, plots) stay in the notebook.
Chapters are read in file-name order, and cells in notebook order, so a module that
several chapters add to grows in the order the course teaches it.

    python tools/export.py          # write bnlib/<module>.py
    python tools/export.py --check  # exit 1 if bnlib/ differs from what the notebooks export

``bnlib/__init__.py`` is kept by hand and never touched here.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
PACKAGE = ROOT / "bnlib"
MARK = "# GENERATED FILE: do not edit."
DIRECTIVE = re.compile(r"^#\|\s*(default_exp|export)\b\s*(\S*)\s*$")


def _cells(notebook: Path) -> list[str]:
    """Return the source of every code cell of a notebook, in order."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _directives(source: str) -> tuple[list[tuple[str, str]], str]:
    """Split the leading ``#|`` directive lines of a cell from its body."""
    lines = source.splitlines()
    found = []
    while lines and lines[0].startswith("#|"):
        m = DIRECTIVE.match(lines[0])
        if m:
            found.append((m.group(1), m.group(2)))
        lines.pop(0)
    return found, "\n".join(lines).strip("\n")


def collect(chapters: Path = CHAPTERS) -> dict[str, list[tuple[str, str]]]:
    """Map module name -> [(chapter file name, exported cell body), ...]."""
    modules: dict[str, list[tuple[str, str]]] = {}
    for notebook in sorted(chapters.glob("*.ipynb")):
        default = None
        for source in _cells(notebook):
            directives, body = _directives(source)
            for kind, arg in directives:
                if kind == "default_exp":
                    if not arg:
                        raise SystemExit(f"{notebook.name}: '#| default_exp' needs a module name")
                    default = arg
                elif kind == "export":
                    module = arg or default
                    if module is None:
                        raise SystemExit(f"{notebook.name}: '#| export' before any '#| default_exp'")
                    modules.setdefault(module, []).append((notebook.name, body))
    return modules


def _public_names(code: str) -> list[str]:
    """Top-level functions, classes and assignments that do not start with '_'."""
    names = []
    for node in ast.parse(code).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return [n for n in dict.fromkeys(names) if not n.startswith("_") and n != "__all__"]


def render(module: str, parts: list[tuple[str, str]]) -> str:
    """The text of bnlib/<module>.py for the exported cells ``parts``."""
    sources = ", ".join(dict.fromkeys(f"chapters/{name}" for name, _ in parts))
    body = "\n\n\n".join(code for _, code in parts if code)
    header = (
        f"{MARK}\n"
        f"# bnlib.{module} is generated from {sources} by tools/export.py.\n"
        "# Edit the notebook, then run `python tools/export.py`.\n"
    )
    names = ", ".join(repr(n) for n in _public_names(body))
    return f"{header}\n__all__ = [{names}]\n\n{body}\n"


def expected(chapters: Path = CHAPTERS) -> dict[Path, str]:
    return {PACKAGE / f"{m}.py": render(m, parts) for m, parts in collect(chapters).items()}


def generated_on_disk() -> set[Path]:
    return {p for p in PACKAGE.glob("*.py") if p.read_text(encoding="utf-8").startswith(MARK)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if bnlib/ differs from what the notebooks export")
    args = parser.parse_args(argv)
    want = expected()
    stale = generated_on_disk() - set(want)
    if args.check:
        drift = [p for p, text in want.items()
                 if not p.exists() or p.read_text(encoding="utf-8") != text]
        for p in sorted(drift) + sorted(stale):
            print(f"drift: {p.relative_to(ROOT)} is not what the notebooks export", file=sys.stderr)
        if drift or stale:
            print("run `python tools/export.py` and commit the result", file=sys.stderr)
            return 1
        print(f"bnlib/ matches the notebooks ({len(want)} generated modules)")
        return 0
    PACKAGE.mkdir(exist_ok=True)
    for p in stale:
        p.unlink()
        print(f"removed {p.relative_to(ROOT)} (no chapter exports it any more)")
    for p, text in sorted(want.items()):
        p.write_text(text, encoding="utf-8")
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
