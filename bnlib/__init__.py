"""bnlib: batch normalization from first principles, built chapter by chapter in the course.

Kept by hand; every other module of the package is generated from the chapter notebooks by
``tools/export.py``.

    import bnlib
    from bnlib import functional as F
    y, cache = F.batch_norm_forward(x, gamma, beta, eps=1e-5)

Submodules load on first use (``bnlib.functional``), so optional dependencies such as torch or
CuPy are imported only by the modules that need them.
"""
import importlib

__version__ = "0.1.0"

# Only modules that exist: `from bnlib import *` imports each of them (tests/test_package.py).
# One per line, so that a chapter adding a module adds one line.
_SUBMODULES = (
    "stats",
    "functional",
    "gradcheck",
    "layers",
    "cpu",
    "bench",
    "cuda",
    "nn",
    "data",
    "train",
    "variants",
)
__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'bnlib' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
