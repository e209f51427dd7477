"""The book as a reader gets it: it builds without warnings, and in a real browser its math is
typeset from the local MathJax, its figures load and each chapter links to its notebook on Colab."""
import decimal
import functools
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from conftest import CHAPTERS, ROOT, code_cells

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
REPO_URL = CONFIG["repository"]["url"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def test_book_builds_without_warnings(built_book):
    html, log = built_book
    assert "WARNING" not in log, log
    for page in ["intro.html", "library.html", *(f"chapters/{nb.stem}.html" for nb in CHAPTERS)]:
        assert (html / page).is_file(), f"{page} was not built"
    # MathJax is served from the build itself, not from a CDN
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for nb in CHAPTERS:
        text = (html / "chapters" / f"{nb.stem}.html").read_text(encoding="utf-8")
        assert "cdn.jsdelivr.net/npm/mathjax" not in text


def test_library_page_documents_every_public_name(built_book):
    """library.md's reference (autodoc through _ext/bnlib_api.py): every name of every module's __all__ has its
    entry, with the chapter that defines it, and no docstring was parsed as markup (docutils would have left
    a system message, and the build a warning)."""
    import importlib

    import bnlib
    html, _ = built_book
    text = (html / "library.html").read_text(encoding="utf-8")
    names = [f"bnlib.{m}.{n}" for m in bnlib._SUBMODULES for n in importlib.import_module(f"bnlib.{m}").__all__]
    missing = [name for name in names if f'id="{name}"' not in text]
    assert not missing, f"library.html has no entry for {missing}"
    assert text.count("Defined in chapter") == len(names)
    assert "system-message" not in text
    assert text.count("bnlib-docstring") > len(names) // 2


def test_every_chapter_is_in_the_toc():
    toc = (ROOT / "_toc.yml").read_text(encoding="utf-8")
    for nb in CHAPTERS:
        assert f"chapters/{nb.stem}" in toc, f"{nb.name} is missing from _toc.yml"


# The first code cell of every chapter, verbatim (chapters to come included). In a checkout it puts
# the repository root on sys.path; alone (Colab, or nbval's kernel: conftest.AloneKernel) it uses an installed bnlib
# and pip-installs from the repository of _config.yml only when there is none.
FIRST_CELL = f'''# Setup: make `bnlib` importable. In a checkout of the course the
# repository root goes on sys.path; elsewhere (Colab) an installed bnlib
# is used, and only when there is none is it installed from the course
# repository, whose URL is kept in _config.yml.
import pathlib, subprocess, sys
REPO_URL = "{REPO_URL}"
here = pathlib.Path.cwd().resolve()
root = next((p for p in [here, *here.parents]
             if (p / "bnlib" / "__init__.py").is_file()), None)
if root is not None:
    sys.path.insert(0, str(root))
else:
    try:
        import bnlib
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                        f"git+{{REPO_URL}}"], check=True)
import bnlib'''


def test_first_cell_makes_bnlib_importable_with_the_configured_url():
    """Every chapter starts with the canonical setup cell, which names the repository of _config.yml."""
    for nb in CHAPTERS:
        source = "".join(code_cells(nb)[0]["source"])
        assert source == FIRST_CELL, f"{nb.name}: the first code cell is not tests/test_book.py's FIRST_CELL"


def test_every_chapter_opens_with_its_title_and_a_hidden_setup_cell():
    for nb in CHAPTERS:
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).startswith("# "), \
            f"{nb.name}: the first cell is not the chapter's title"
        assert "hide-input" in code_cells(nb)[0].get("metadata", {}).get("tags", []), \
            f"{nb.name}: the setup cell is not tagged hide-input"


def test_cells_the_book_collapses_are_collapsed_in_jupyter_too():
    """The book collapses cells by tag (hide-input: the code; hide-output: the output; hide-cell: both); Jupyter and
    JupyterLab read cell.metadata.jupyter instead (source_hidden, outputs_hidden), so each tagged cell carries both,
    and a solution collapsed in the book is collapsed in a notebook too."""
    wanted = {"hide-input": {"source_hidden"}, "hide-output": {"outputs_hidden"},
              "hide-cell": {"source_hidden", "outputs_hidden"}}
    problems = []
    for nb in CHAPTERS:
        for i, cell in enumerate(json.loads(nb.read_text(encoding="utf-8"))["cells"]):
            meta = cell.get("metadata", {})
            want = set().union(*(wanted.get(tag, set()) for tag in meta.get("tags", [])))
            have = {key for key, value in meta.get("jupyter", {}).items() if value is True}
            if want != have:
                problems.append(f"{nb.name}, cell {i}: tags {meta.get('tags', [])} want jupyter {sorted(want)}, "
                                f"has {sorted(have)}")
    assert not problems, "\n".join(problems)


SMOKE_LINE = 'SMOKE = os.environ.get("BNLIB_SMOKE") == "1"'


def test_every_chapter_reads_bnlib_smoke_the_same_way():
    """README: BNLIB_SMOKE=1 shrinks a chapter's heavy experiments. Every chapter that reads the variable reads
    it with the same line, so that one value means the same in all of them ("1" on, anything else off)."""
    readers = []
    for nb in CHAPTERS:
        source = "\n".join("".join(c["source"]) for c in code_cells(nb))
        if "BNLIB_SMOKE" in source.replace("# BNLIB_SMOKE", ""):
            readers.append(nb.name)
            lines = [line.split("#")[0].strip() for line in source.splitlines() if "os.environ" in line and "SMOKE" in line]
            assert lines == [SMOKE_LINE], f"{nb.name}: reads BNLIB_SMOKE with {lines}, not {SMOKE_LINE!r}"
    assert len(readers) >= 7, readers


def test_notebooks_are_stored_after_one_clean_run():
    for nb in CHAPTERS:
        counts = [c["execution_count"] for c in code_cells(nb)]
        assert counts == list(range(1, len(counts) + 1)), f"{nb.name}: execution counts {counts}"
        for cell in code_cells(nb):
            for out in cell["outputs"]:
                assert out["output_type"] != "error", f"{nb.name}: a stored error output"
                text = "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
                assert not re.search(r"(/root/|/tmp/|/home/\w+/|/work/)", text), f"{nb.name}: a local path in an output"


def test_notebooks_are_valid_nbformat():
    """Readers open the notebooks in Jupyter and on Colab: each must validate against its own nbformat
    version (a cell id in a 4.4 notebook, for instance, is not allowed)."""
    import nbformat
    for nb in CHAPTERS:
        nbformat.validate(nbformat.read(nb, as_version=4))


# A solution is folded with HTML, which the book, Jupyter and Colab all render (a MyST dropdown is raw text
# in Jupyter and Colab, the solution in plain view). The blank lines after <summary> and before </details>
# end the HTML blocks, so that the solution between them is read as markdown (math, code) everywhere.
SOLUTION_OPEN = '<details class="solution">\n<summary>Solution</summary>\n\n'


def test_every_chapter_ends_with_exercises_and_solutions():
    for nb in CHAPTERS:
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        tail = markdown[markdown.rfind("## Exercises"):]
        assert "## Exercises" in markdown, f"{nb.name} has no Exercises section"
        assert 2 <= tail.count("**") // 2 <= 5, f"{nb.name}: expected 2-5 exercises"    # 5: chapter 05, the longest
        assert tail.count(SOLUTION_OPEN) == tail.count("**") // 2, f"{nb.name}: an exercise lacks a solution"


# Code after a chapter's Exercises heading that holds an answer (the book's solution or replay under a name of its own,
# a checker's self-test run on the answer) is collapsed, as the written solutions are; the checkers stay in view.
ANSWER_CODE = re.compile(r"^(def|class) (book_|solution|Solution)|^def \w*self_test|"
                         r"#\s*(the|book's|exercise \d's) (answer|solution)\b", re.M | re.I)


def test_exercise_answers_in_code_are_collapsed():
    shown = []
    for nb in CHAPTERS:
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        start = next(i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and "## Exercises" in "".join(c["source"]))
        for i, cell in enumerate(cells[start:], start):
            tags = cell.get("metadata", {}).get("tags", [])
            found = cell["cell_type"] == "code" and ANSWER_CODE.search("".join(cell["source"]))
            if found and not {"hide-input", "hide-cell"} & set(tags):
                shown.append(f"{nb.name} cell {i}: {found.group(0)!r} in view")
    assert not shown, "\n".join(shown)


def test_solutions_are_folded_html_blocks_with_markdown_inside():
    for nb in CHAPTERS:
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] != "markdown":
                continue
            text = "".join(cell["source"])
            assert ":::{dropdown}" not in text, f"{nb.name} cell {i}: a MyST dropdown (raw text in Jupyter and Colab)"
            opened = [m.start() for m in re.finditer("<details", text)]
            assert len(opened) == text.count("</details>"), f"{nb.name} cell {i}: unclosed <details>"
            for start in opened:
                assert text.startswith(SOLUTION_OPEN, start), f"{nb.name} cell {i}: a <details> not in the solution form"
                end = text.index("</details>", start)
                assert text[end - 2:end] == "\n\n" and "<details" not in text[start + 1:end], \
                    f"{nb.name} cell {i}: </details> needs a blank line before it (and no nested <details>)"
                after = text[end + len("</details>"):]
                assert after == "" or after.startswith("\n\n") or after == "\n", \
                    f"{nb.name} cell {i}: </details> needs a blank line after it (else what follows is raw HTML)"



# Numbers in the prose that no cell prints, each with its reason: references, constants, a paper's
# table, hand arithmetic in a solution. Everything else a chapter's prose quotes must be printed
# (or written) by one of its code cells, so that re-executing a chapter and forgetting to update a
# sentence fails here. An entry no longer in the prose fails too: the list stays exact.
PROSE_NUMBERS_NOT_PRINTED = {
    "02_forward": {"55545": "a tensorflow issue number"},
    "06_pytorch": {"74944": "a pytorch pull-request number"},
    "07_experiments": {"50,000": "the paper's MNIST step count", "20,000": "a step count the prose proposes",
                       "110": "the depth of a cited network",
                       # the BN paper's ImageNet table (Ioffe & Szegedy, 2015, Figure 3), quoted
                       "72.2": "the paper's table", "0.0015": "the paper's table", "31.0": "the paper's table",
                       "13.3": "the paper's table", "72.7": "the paper's table", "0.0075": "the paper's table",
                       "2.1": "the paper's table", "73.0": "the paper's table", "74.8": "the paper's table",
                       "69.8": "the paper's table", "4.9": "the paper's ensemble result",
                       "4.2": "a section of the paper (4.2.1)"},
    "08_variants": {"50,000": "the size of the CIFAR training sets, the smallest of the paper's large-batch data"},
    "09_faq": {"65,504": "float16's largest finite value", "74944": "a pytorch pull-request number"},
}
_NOT_PROSE = re.compile(r"\$\$.*?\$\$|\$[^$\n]*\$|```.*?```|`[^`\n]*`|\]\([^)]*\)|https?://\S+", re.S)
# a number: thousands-grouped, or digits with an optional fraction and exponent, taken whole (atomic, so
# that 114.8x is never read as 114); a trailing "x" (a ratio) is allowed, any other letter is not
_NUMBER = r"(?>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:e[+-]?\d+)?)"
_PROSE_NUMBER = re.compile(r"(?<![\w.,])" + _NUMBER + r"(?=x\b|[^\w]|$)")
_PRINTED_NUMBER = re.compile(_NUMBER)
_YEAR = re.compile(r"19[5-9]\d|20[0-3]\d")


def _key(text_or_decimal):
    """A number as (value, exponent): 0.94 and 0.940 differ (a sentence quoting 31.0 needs a printed
    31.0, not a 31), 2.7e+05 rounded to units is 270,000."""
    d = text_or_decimal if isinstance(text_or_decimal, decimal.Decimal) else decimal.Decimal(
        text_or_decimal.replace(",", ""))
    return d, d.as_tuple().exponent


def _checked(number):
    """Prose numbers the test checks: decimals, thousands, exponents, and integers of 3 digits or more."""
    return any(c in number for c in ".,e") or len(number) >= 3


def _printed_values(cells):
    """Every number in the code cells and their text outputs, with each rounding of it a sentence may
    quote (0.9400 also as 0.940, 0.94, 0.9, 1; 4.93e-06 as 4.9e-06; 2.7e+05 as 270,000; half up, half
    even, and as Python rounds the float), as _key pairs."""
    values = set()
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        text = ["".join(cell["source"])]
        for out in cell.get("outputs", []):
            text.append("".join(out.get("text", "")))
            text += ["".join(out.get("data", {}).get(kind, "")) for kind in ("text/plain", "text/markdown")]
        for m in _PRINTED_NUMBER.finditer("\n".join(text)):
            value, exponent = _key(m.group(0))
            values.add((value, exponent))
            if value.adjusted() > 40:                          # nothing a sentence quotes digit by digit
                continue
            for digits in range(min(exponent, 0), 1):         # the roundings to 10**digits
                step = decimal.Decimal(1).scaleb(digits)
                with decimal.localcontext(prec=100):
                    values.update(_key(value.quantize(step, rounding=mode))
                                  for mode in (decimal.ROUND_HALF_UP, decimal.ROUND_HALF_EVEN))
                values.add(_key(f"{float(value):.{-digits}f}"))  # as Python rounds the float it printed
    return values


def _percent_printed(number, printed):
    """A percentage in the prose (52%) counts as printed when 52 or 0.52 was, possibly rounded
    (f"{x:.0%}" prints the first, a fraction the second)."""
    return _key(number) in printed or _key(str(decimal.Decimal(number.replace(",", "")).scaleb(-2))) in printed


def test_every_number_in_the_prose_is_printed_by_a_cell():
    """Decimals, thousands, exponents, numbers of three or more digits and percentages in the markdown
    (math, code spans and links aside; years 1950-2039 aside; a ratio's trailing x allowed) occur,
    possibly rounded (a percentage also as a fraction), in a code cell or a stored text output of the
    same chapter, or are listed with their reason in PROSE_NUMBERS_NOT_PRINTED."""
    problems = []
    for nb in CHAPTERS:
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        printed, allowed, seen = _printed_values(cells), PROSE_NUMBERS_NOT_PRINTED.get(nb.stem, {}), set()
        for i, cell in enumerate(cells):
            if cell["cell_type"] != "markdown":
                continue
            prose = _NOT_PROSE.sub(" ", "".join(cell["source"]))
            for m in _PROSE_NUMBER.finditer(prose):
                number = m.group(0)
                if prose[m.end():m.end() + 1] == "%":
                    if _percent_printed(number, printed):
                        continue
                elif not _checked(number) or _YEAR.fullmatch(number) or _key(number) in printed:
                    continue
                if number in allowed:
                    seen.add(number)
                    continue
                context = prose[max(0, m.start() - 60):m.end() + 20].replace("\n", " ")
                problems.append(f"{nb.stem}, cell {i}: {number} is printed by no cell: ...{context}...")
        problems += [f"{nb.stem}: {number!r} is listed as not printed but is no longer in the prose"
                     for number in set(allowed) - seen]
    assert not problems, "\n".join(problems)


def test_the_prose_number_check_reads_numbers_as_a_reader_does():
    """The parsing behind the test above: ratios, exponents and thousands are found whole, roundings of
    a printed number count as printed, a number inside a word or an identifier does not count."""
    found = [m.group(0) for m in _PROSE_NUMBER.finditer("0.33x to 114.8x; 4.9e-06, 270,000 and 1145 faults; "
                                                        "float16 sm_90 v2.5 (0.94).")]
    assert found == ["0.33", "114.8", "4.9e-06", "270,000", "1145", "0.94"]
    printed = _printed_values([{"cell_type": "code", "source": [], "outputs": [
        {"text": "0.9400 2.675 1234.5 2.7e+05 4.93e-06 114.8"}]}])
    for number in ["0.94", "0.9", "2.68", "2.67", "1235", "1234", "270,000", "4.9e-06", "114.8", "115"]:
        assert _key(number) in printed, number
    for number in ["0.95", "2.69", "2.6", "1236", "114.9", "114.80"]:
        assert _key(number) not in printed, number
    percents = _printed_values([{"cell_type": "code", "source": [], "outputs": [{"text": "35% 0.9412 0.25"}]}])
    assert all(_percent_printed(n, percents) for n in ["35", "94", "94.1", "25"])
    assert not any(_percent_printed(n, percents) for n in ["36", "95", "94.2", "2.5"])

# ----------------------------------------------------------------------------- the browser test

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        message = "Chromium and chromedriver are needed for the browser test (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,2000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(built_book):
    """Serve the built HTML on localhost, as a reader's browser would get it."""
    html, _ = built_book
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(html))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _open_typeset(browser, url):
    browser.get(url)
    # wait until MathJax has finished typesetting (its startup promise resolves)
    state = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const started = Date.now();
        (function wait() {   // the MathJax script loads asynchronously: wait for it (at most 30 s)
            if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
                MathJax.startup.promise.then(() => done("ok"), (e) => done("error: " + e));
            } else if (Date.now() - started > 30000) {
                done("no MathJax after 30 s");
            } else {
                setTimeout(wait, 50);
            }
        })();
    """)
    return state


PAGES = ["intro.html"] + [f"chapters/{nb.stem}.html" for nb in CHAPTERS]


@pytest.mark.browser
def test_library_page_in_browser(browser, server, built_book):
    """The docstrings of the library page wrap at the page's width (_static/library.css) instead of scrolling."""
    browser.get(f"{server}/library.html")
    blocks = browser.execute_script("""
        return Array.from(document.querySelectorAll('div.bnlib-docstring pre')).map(p => [
            getComputedStyle(p).whiteSpace, p.scrollWidth - p.clientWidth]);""")
    assert len(blocks) > 100, f"{len(blocks)} docstring blocks"
    scrolling = [overflow for space, overflow in blocks if space != "pre-wrap" or overflow > 1]
    assert not scrolling, f"{len(scrolling)} docstring blocks scroll sideways"
    # the programs of "Using it" fit their code boxes (tests/test_library_page.py keeps their lines short)
    programs = browser.execute_script("""
        return Array.from(document.querySelectorAll('section#using-it div.highlight-python pre')).map(
            p => p.scrollWidth - p.clientWidth);""")
    assert len(programs) == 7 and max(programs) <= 1, f"programs' overflow in pixels: {programs}"


@pytest.mark.browser
@pytest.mark.parametrize("page", PAGES)
def test_page_in_browser(browser, server, page, built_book):
    state = _open_typeset(browser, f"{server}/{page}")
    assert state == "ok", f"{page}: MathJax did not load or failed ({state})"
    typeset = browser.execute_script("return document.querySelectorAll('mjx-container').length")
    errors = browser.execute_script("return document.querySelectorAll('mjx-merror').length")
    assert typeset > 0, f"{page}: no typeset math"
    assert errors == 0, f"{page}: {errors} MathJax errors"
    if page.startswith("chapters/"):
        # every exercise's solution is folded, styled by _static/solutions.css, and holds more than its title
        notebook = ROOT / (page[:-5] + ".ipynb")
        expected = sum("".join(c["source"]).count(SOLUTION_OPEN)
                       for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "markdown")
        folded = browser.execute_script("""
            return Array.from(document.querySelectorAll('details.solution')).map(d => [
                d.open, parseFloat(getComputedStyle(d).borderLeftWidth), d.children.length]);""")
        assert len(folded) == expected > 0, f"{page}: {len(folded)} folded solutions, the notebook has {expected}"
        for is_open, border, children in folded:
            assert not is_open and border > 0 and children > 1, f"{page}: a solution is open, unstyled or empty"
        browser.execute_script("document.querySelectorAll('details').forEach(d => { d.open = true; })")
    # no raw TeX delimiters left in the prose, the opened solutions included (code cells may contain anything)
    prose = browser.execute_script("""
        const main = document.querySelector('main') || document.body;
        const copy = main.cloneNode(true);
        copy.querySelectorAll('pre, code, script, style, mjx-container').forEach(e => e.remove());
        return copy.innerText;
    """)
    for raw in ["$$", "\\(", "\\[", "\\begin{", "\\frac", "\\sigma"]:
        assert raw not in prose, f"{page}: raw TeX {raw!r} left in the page"
    # every image loaded (lazy ones are made eager, then awaited, so the check does not race the page)
    images = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const imgs = Array.from(document.images);
        imgs.forEach(i => { i.loading = 'eager'; });
        Promise.all(imgs.map(i => i.complete ? Promise.resolve() : new Promise(r => { i.onload = r; i.onerror = r; })))
            .then(() => done(imgs.map(i => [i.currentSrc || i.src, i.complete && i.naturalWidth > 0])));
    """)
    broken = [src for src, ok in images if not ok]
    assert not broken, f"{page}: images that did not load: {broken}"
    if page.startswith("chapters/"):
        assert any("_images/" in src for src, _ in images), f"{page}: no figure"
        owner_repo = REPO_URL.removeprefix("https://github.com/")
        colab = f"https://colab.research.google.com/github/{owner_repo}/blob/main/{page[:-5]}.ipynb"
        links = browser.execute_script("return Array.from(document.links).map(a => a.href)")
        assert colab in links, f"{page}: no Colab link to {colab}"
        # cell outputs at 3/4 of the prose's font size (_static/outputs.css; the theme's own is 7/8), so that more of their lines fit
        sizes = browser.execute_script("""
            const px = e => e ? parseFloat(getComputedStyle(e).fontSize) : null;
            return [px(document.querySelector('div.cell_output pre')), px(document.querySelector('main p'))];""")
        assert None not in sizes and sizes[0] <= 0.8 * sizes[1], f"{page}: output and prose font sizes {sizes}"
    shots = os.environ.get("BNBOOK_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(shots) / (page.replace("/", "_") + ".png")))
