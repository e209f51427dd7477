# GENERATED FILE: do not edit.
# bnlib.gradcheck is generated from chapters/03_backward.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['numerical_gradient', 'relative_error']

import math
import numbers

import numpy as np


def _as_float64_array(a, name: str):
    if not isinstance(a, np.ndarray):                  # a torch tensor too: its float64 is not NumPy's
        raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
    if a.dtype != np.float64:
        raise TypeError(f"{name} must be float64 for a meaningful finite-difference check, got {a.dtype}")
    return a


def numerical_gradient(f, x, dy, h: float = 1e-5):
    """Central-difference gradient of L(x) = sum(f(x) * dy) with respect to x, in float64.

    f:  a function of one array, returning a float64 array of dy's shape (a lower precision would
        limit the check's accuracy silently, so it is refused)
    x:  float64 array (not modified: f sees a perturbed copy);  dy: float64 array, the upstream gradient
    h:  the step, > 0. Costs 2 * x.size calls of f: meant for small checks.
    Returns an array of x's shape.
    """
    if not callable(f):
        raise TypeError(f"f must be a function of one array (the forward pass to differentiate), got {type(f).__name__}")
    _as_float64_array(x, "x")
    _as_float64_array(dy, "dy")
    if isinstance(h, bool) or not isinstance(h, numbers.Real) or not (h > 0 and math.isfinite(h)):
        raise ValueError(f"h must be a finite number > 0, got {h!r}")
    # f sees this copy (the caller's x never changes); C order, so that reshape(-1) below is a view
    # of it and each step reaches f (a Fortran-ordered copy would be copied again by the reshape)
    x = np.array(x, dtype=np.float64, order="C", copy=True)
    flat = x.reshape(-1)
    grad = np.empty(flat.size)
    def loss():
        out = f(x)
        if np.shape(out) != dy.shape:            # f(x) * dy would broadcast: a wrong gradient, silently
            raise ValueError(f"f(x) has shape {np.shape(out)}, but dy has shape {dy.shape}: they must match")
        dtype = np.asarray(out).dtype
        if dtype != np.float64:                  # float32: about 2 correct digits at h = 1e-5 (chapter 03)
            raise TypeError(f"f(x) returned {dtype} values: a finite-difference check needs float64 (compute f in float64)")
        return float(np.sum(out * dy))

    for k in range(flat.size):
        original = flat[k]
        flat[k] = original + h
        plus, up = loss(), flat[k]               # up: original + h as float64 rounded it
        flat[k] = original - h
        minus, down = loss(), flat[k]
        flat[k] = original
        step = up - down                         # the step f saw: exact for |x[k]| >= 3h (Sterbenz), else at most one rounding
        if step == 0.0:
            raise ValueError(f"h = {h!r} is below the spacing of float64 numbers at x.flat[{k}] = {float(original)!r}: "
                             f"x + h rounds to x; use a larger h")
        grad[k] = (plus - minus) / step
    return grad.reshape(x.shape)


def relative_error(a, b) -> float:
    """max |a - b| / max(max |a|, max |b|): 0 for equal arrays, about 1 for unrelated ones."""
    for name, v in (("a", a), ("b", b)):
        if np.iscomplexobj(v):                # float64 would drop the imaginary part: 1j and 2j would be 'equal'
            raise TypeError(f"relative_error compares real arrays, got complex {name} ({np.asarray(v).dtype})")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare arrays of shapes {a.shape} and {b.shape}")
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0))
    return 0.0 if scale == 0.0 else float(np.abs(a - b).max() / scale)
