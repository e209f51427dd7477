"""Publishing: the GitHub Pages workflow cannot run here, so check that it parses, deploys
_build/html on a push to main, and builds the book with the README's command."""
import re

import yaml

from conftest import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"


def readme_build_command() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"jupyter-book build [^\n`&|;]*", readme)
    assert commands, "the README names no `jupyter-book build` command"
    assert len(set(c.strip() for c in commands)) == 1, f"the README names several build commands: {commands}"
    return commands[0].strip()


def test_workflow_deploys_the_book_built_with_the_readme_command():
    workflow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    triggers = workflow.get("on", workflow.get(True))          # YAML 1.1 reads a bare `on` as True
    assert "main" in triggers["push"]["branches"]
    (job,) = workflow["jobs"].values()
    assert job["permissions"]["pages"] == "write" and job["permissions"]["id-token"] == "write"
    steps = job["steps"]
    runs = [s["run"].strip() for s in steps if "run" in s]
    builds = [r for r in runs if "jupyter-book build" in r]
    assert builds == [readme_build_command()], f"workflow builds with {builds}, README says {readme_build_command()!r}"
    def index(pred):
        return next(i for i, s in enumerate(steps) if pred(s))
    install = index(lambda s: "requirements.txt" in s.get("run", ""))
    build = index(lambda s: "jupyter-book build" in s.get("run", ""))
    upload = index(lambda s: s.get("uses", "").startswith("actions/upload-pages-artifact@"))
    deploy = index(lambda s: s.get("uses", "").startswith("actions/deploy-pages@"))
    assert install < build < upload < deploy, "steps out of order"
    assert steps[upload]["with"]["path"].rstrip("/") in ("_build/html", "./_build/html")
