"""The package as a user imports it: `from bnlib import *` works and names only real modules."""
import importlib
import subprocess
import sys
from pathlib import Path

import bnlib
from conftest import ROOT


def test_star_import_works_in_a_fresh_interpreter():
    code = "from bnlib import *; import bnlib; print(sorted(n for n in bnlib.__all__ if n in globals()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(sorted(bnlib.__all__))


def test_every_name_in_all_is_a_module_of_the_package():
    package_dir = Path(bnlib.__file__).parent
    assert bnlib.__all__, "bnlib.__all__ is empty"
    for name in bnlib.__all__:
        assert (package_dir / f"{name}.py").is_file(), f"bnlib.__all__ names {name!r}, but bnlib/{name}.py does not exist"
        module = importlib.import_module(f"bnlib.{name}")
        assert getattr(bnlib, name) is module
    generated = {p.stem for p in package_dir.glob("*.py") if p.stem != "__init__"}
    assert generated == set(bnlib.__all__), f"modules missing from bnlib.__all__: {sorted(generated - set(bnlib.__all__))}"
