"""Sphinx extension behind the book's library page (library.md): autodoc of this checkout's bnlib.

- The checkout goes first on sys.path, so the page documents the bnlib being built, never an installed copy.
- bnlib's docstrings are plain text written for help() (indented argument lists, `(N, C, *spatial)`,
  formulas with `*`), not reStructuredText: each is shown as help() shows it, in a plain-text block,
  except that a line the author broke because it was long is joined to the next (reflow(): the rules are
  there), so that the block wraps at the page's width (_static/library.css) instead of twice.
- Every documented name says which chapter's cells define it (tools/export.py's reading of the notebooks),
  with a link; a name that a later chapter redefines names both chapters.
- ``.. bnlib-module:: functional`` documents bnlib.functional: automodule, then the constants of its
  ``__all__``, which automodule leaves out (it documents module data only with a doc-comment); a constant
  is shown with its value when that is short, else with its type and size (chapter 05's kernel sources are
  strings of several hundred lines).
- A class's methods without a docstring are left out (the layer's forward(), torch's hooks); the class's
  own docstring describes them.
"""
import functools
import importlib
import inspect
import re
import sys
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
VALUE_CHARS = 100        # constants whose repr is longer are described, not printed


@functools.lru_cache(maxsize=None)
def _definitions():
    """{(module, name): [chapter stems that define it, in the order the book teaches them]}."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        export = importlib.import_module("export")
    finally:
        sys.path.remove(str(ROOT / "tools"))
    found = {}
    for module, parts in export.collect(CHAPTERS).items():
        for chapter, code in parts:
            for name in export._public_names(code):
                stems = found.setdefault((module, name), [])
                stem = Path(chapter).stem
                if stem not in stems:
                    stems.append(stem)
    return found


def _where(stems):
    link = lambda stem: f"chapter {int(stem[:2])}, :doc:`/chapters/{stem}`"
    if len(stems) == 1:
        return f"Defined in {link(stems[0])}."
    earlier = ", ".join(link(s) for s in stems[:-1])
    return f"Defined in {link(stems[-1])} (the definition in force); first written in {earlier}."


def _describe(value):
    text = repr(value)
    if len(text) <= VALUE_CHARS:
        return [f"Value: ``{text}``"]
    if isinstance(value, str):
        return [f"A string of {len(value.splitlines())} lines ({len(value):,} characters)."]
    size = f" of {len(value)} items" if hasattr(value, "__len__") else ""
    return [f"A {type(value).__name__}{size}; ``{text[:VALUE_CHARS - 20]} ...``"]


FULL = 80                # a docstring line at least this long was broken because it was long
ITEM = re.compile(r"^\s*([A-Za-z_][\w.*,/ \[\]|=\"-]{0,39}:\s|[-*] |>>> )")   # "eps: ", "x_*: ", "- ", ">>> "


def reflow(lines):
    """Join each line that continues a long line: the line before it (as written) is at least FULL characters
    long and does not end with ':' (it introduces a list), and this line is not blank, not indented less than
    that line and does not start an item ("name: ...", "- ...", ">>> ..."). Every other line break stays.
    """
    out, before = [], ""
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if (out and line.strip() and before.strip() and len(before) >= FULL and not before.rstrip().endswith(":")
                and indent >= len(before) - len(before.lstrip()) and not ITEM.match(line)):
            out[-1] = out[-1].rstrip() + " " + line.strip()
        else:
            out.append(line)
        before = line
    return out


def _words(lines):
    return " ".join(" ".join(lines).split())


def _process_docstring(app, what, name, obj, options, lines):
    if not name.startswith("bnlib."):
        return
    parts = name.split(".")
    where = _definitions().get((parts[1], parts[2])) if len(parts) >= 3 else None
    text = [line.rstrip() for line in lines]
    while text and not text[-1]:
        text.pop()
    type_doc = type(obj).__dict__.get("__doc__")
    if what == "data" and isinstance(type_doc, str) and _words(text) == _words(type_doc.splitlines()):
        text = []                          # a constant without a doc-comment: autodoc offers its type's docstring
    new = []
    if where and len(parts) == 3:          # a module-level name; a method inherits its class's chapter
        new += [_where(where), ""]
    if what == "data" and not text:
        new += _describe(obj) + [""]
    if text:
        new += [".. code-block:: text", "   :class: bnlib-docstring", ""]
        new += [f"   {line}" if line else "" for line in reflow(text)] + [""]
    lines[:] = new


def constants(module):
    """The names of module.__all__ that are neither routines nor classes, nor documented by a doc-comment."""
    commented = {name for (namespace, name) in ModuleAnalyzer.for_module(module.__name__).find_attr_docs()
                 if namespace == ""}
    return [name for name in module.__all__
            if not (inspect.isroutine(getattr(module, name)) or inspect.isclass(getattr(module, name)))
            and name not in commented]


class BnlibModule(SphinxDirective):
    """``.. bnlib-module:: name``: the reference of bnlib.<name>, its constants included."""
    required_arguments = 1

    def run(self):
        module = importlib.import_module(f"bnlib.{self.arguments[0]}")
        if Path(module.__file__).resolve().parent != ROOT / "bnlib":      # an installed copy, imported earlier
            raise self.error(f"{module.__name__} was imported from {module.__file__}, not from {ROOT / 'bnlib'}")
        text = [f".. automodule:: {module.__name__}", ""]
        names = constants(module)
        if names:
            text += [".. rubric:: Constants", ""]
            for name in names:
                text += [f".. autodata:: {module.__name__}.{name}", ""]
        node = StringList(text, source=f"<bnlib-module {module.__name__}>")
        section = nodes.container()
        nested_parse_with_titles(self.state, node, section)
        return section.children


def _skip_member(app, what, name, obj, skip, options):
    if what == "class" and not getattr(obj, "__doc__", None):
        return True
    return None


def setup(app):
    if str(ROOT) in sys.path:
        sys.path.remove(str(ROOT))
    sys.path.insert(0, str(ROOT))
    app.add_directive("bnlib-module", BnlibModule)
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("autodoc-skip-member", _skip_member)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
