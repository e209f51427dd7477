"""Sphinx extension behind the book's library page (library.md): autodoc of this checkout's bnlib.

- The checkout goes first on sys.path, so the page documents the bnlib being built, never an installed copy.
- bnlib's docstrings are plain text written for help() (indented argument lists, `(N, C, *spatial)`,
  formulas with `*`), not reStructuredText: each is shown as help() shows it, in a plain-text block,
  except that a line the author broke because it was long is joined to the next (reflow(): the rules are
  there), so that the block wraps at the page's width (_static/library.css) instead of twice.
- Every documented name says which chapter's cells define it (tools/export.py's reading of the notebooks),
  with a link; a name that a later chapter redefines names both chapters.
- ``.. bnlib-module:: functional`` documents bnlib.functional: automodule, then the constants of its
  ``__all__``, which automodule leaves out (it documents module data only with a doc-comment). A constant
  is shown with the comments that explain it in the source and its assignment as written (an environment
  variable it reads shows as such, not as the build machine's value), or, for a long one, its type and size
  (chapter 05's kernel sources are strings of several hundred lines).
- In a class, only methods and properties with a docstring of their own are listed (not a namedtuple's or a
  dataclass's fields, nor undocumented methods); an autograd Function shows no class signature.
"""
import ast
import functools
import importlib
import importlib.util
import inspect
import io
import re
import sys
import tokenize
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"


@functools.lru_cache(maxsize=None)
def _definitions():
    """{(module, name): [chapter stems that define it, in the order the book teaches them]}. A name bound to
    another one (``portable_batch_norm_forward = batch_norm_forward``) gets the chapters that had defined
    that one at that point: its code is theirs."""
    spec = importlib.util.spec_from_file_location("bnlib_export", ROOT / "tools" / "export.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    found = {}
    for module, parts in export.collect(CHAPTERS).items():
        for chapter, code in parts:
            stem = Path(chapter).stem
            aliases = {node.targets[0].id: node.value.id for node in ast.parse(code).body
                       if isinstance(node, ast.Assign) and len(node.targets) == 1
                       and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Name)}
            for name in export._public_names(code):
                if name in aliases:
                    found[(module, name)] = list(found.get((module, aliases[name]), [stem]))
                    continue
                stems = found.setdefault((module, name), [])
                if stem not in stems:
                    stems.append(stem)
    return found


def _where(stems):
    link = lambda stem: f"chapter {int(stem[:2])}, :doc:`/chapters/{stem}`"
    if len(stems) == 1:
        return f"Defined in {link(stems[0])}."
    earlier = ", ".join(link(s) for s in stems[:-1])
    return f"Defined in {link(stems[-1])} (the definition in force); earlier versions in {earlier}."


SOURCE_CHARS = 600       # an assignment whose source is longer is described, not shown (the kernel sources)


@functools.lru_cache(maxsize=None)
def _assignments(module_name):
    """{name: (source of its last top-level assignment, the comments that explain it)} for a bnlib module.
    The comments are the comment lines just above the assignment and the comment that ends its first line,
    with the indented comment lines that continue it."""
    source = Path(sys.modules[module_name].__file__).read_text(encoding="utf-8")
    lines = source.splitlines()
    trailing_comments = {token.start[0]: token.string     # line number -> the comment that ends a line of code
                         for token in tokenize.generate_tokens(io.StringIO(source).readline)
                         if token.type == tokenize.COMMENT and lines[token.start[0] - 1].lstrip()[:1] != "#"}
    found = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, (ast.Assign, ast.AnnAssign))):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        above = []
        row = node.lineno - 2
        while row >= 0 and lines[row].startswith("#"):
            above.insert(0, lines[row])
            row -= 1
        trailing = []
        comment = trailing_comments.get(node.lineno)
        if comment is not None:
            trailing.append(comment)
            row = node.end_lineno
            while row < len(lines) and lines[row].lstrip().startswith("#") and lines[row].startswith(" "):
                trailing.append(lines[row].strip())
                row += 1
        text = [line.lstrip("#").strip() for line in above + trailing]
        segment = ast.get_source_segment(source, node)
        for target in targets:
            if isinstance(target, ast.Name):
                found[target.id] = (segment, text)
    return found


def _constant(module_name, name, value):
    """The lines that document a module constant: its comments, then its assignment as written (or, when
    that is long, the value's type and size)."""
    segment, comments = _assignments(module_name).get(name, (None, []))
    out = []
    if comments:
        out += _text_block(comments)
    if segment is not None and len(segment) <= SOURCE_CHARS:
        out += [".. code-block:: python", ""] + [f"   {line}" for line in segment.splitlines()] + [""]
    elif isinstance(value, str):
        out += [f"A string of {len(value.splitlines())} lines ({len(value):,} characters).", ""]
    else:
        size = f" of {len(value)} items" if hasattr(value, "__len__") else ""
        out += [f"A {type(value).__name__}{size}.", ""]
    return out


FULL = 80                # a docstring line at least this long was broken because it was long
NAME = r"[A-Za-z_][\w.*\[\]|=\"-]*"
ITEM = re.compile(rf"^\s*({NAME}(?:(?:, ?| / ){NAME})*:\s|[-*] |>>> )")   # "eps: ", "x_*: ", "steps, lr: ", "- "


def reflow(lines):
    """Join each line that continues a long line, so that the text wraps once, at the page's width. A line is
    joined to the one before it when that line (as written) is at least FULL characters long and does not end
    with ':' (it introduces a list), and this line is not blank, is not indented less, does not start an item
    ("name: ...", "a, b: ...", "- ...", ">>> ...") and, if indented at all, is indented more than the line
    before or continues a line that was itself a continuation (in an indented block, lines of the same
    indentation are list items, rows or formulas, and stay as written). Every other line break stays.
    """
    out, before, continued = [], "", False
    for line in lines:
        indent = len(line) - len(line.lstrip())
        indent_before = len(before) - len(before.lstrip())
        continued = bool(out and line.strip() and before.strip() and len(before) >= FULL
                         and not before.rstrip().endswith(":") and indent >= indent_before
                         and not ITEM.match(line) and not (indent == indent_before > 0 and not continued))
        if continued:
            out[-1] = out[-1].rstrip() + " " + line.strip()
        else:
            out.append(line)
        before = line
    return out


def _text_block(lines):
    """reST for plain-text lines shown as written but reflowed, in a block that wraps (_static/library.css)."""
    return ([".. code-block:: text", "   :class: bnlib-docstring", ""]
            + [f"   {line}" if line else "" for line in reflow(lines)] + [""])


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
    if what == "data" and not text and len(parts) == 3:
        new += _constant(".".join(parts[:2]), parts[2], obj)
    if text:
        new += _text_block(text)
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
    """In a class, only methods and properties with a docstring of their own: a namedtuple's fields ("Alias for
    field number 0"), a dataclass's fields and undocumented methods are described by the class's docstring."""
    if what != "class":
        return None
    if not (inspect.isroutine(obj) or isinstance(obj, property)) or not getattr(obj, "__doc__", None):
        return True
    return None


def _signature(app, what, name, obj, options, signature, return_annotation):
    """An autograd Function's class signature is torch's (*args, **kwargs): it is called through .apply(),
    whose arguments its forward() documents; show none."""
    if what == "class" and name.startswith("bnlib.") and signature == "(*args, **kwargs)":
        return "", return_annotation
    return None


def setup(app):
    if str(ROOT) in sys.path:
        sys.path.remove(str(ROOT))
    sys.path.insert(0, str(ROOT))
    app.add_directive("bnlib-module", BnlibModule)
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("autodoc-process-signature", _signature)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
