# GENERATED FILE: do not edit.
# bnlib.stats is generated from chapters/02_forward.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['reduction_axes', 'channel_shape', 'accumulation_dtype', 'Moments', 'moments', 'merge_moments', 'welford']

import numbers

import numpy as np


def _is_int(value):
    """An integer argument: Python's or NumPy's, not a bool (True would pass for 1). Later modules use it too."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def reduction_axes(ndim: int) -> tuple[int, ...]:
    """Axes batch norm reduces over for an input of `ndim` dimensions: all but the channel axis 1.

    (N, C) -> (0,);  (N, C, L) -> (0, 2);  (N, C, H, W) -> (0, 2, 3);  (N, C, D, H, W) -> (0, 2, 3, 4)
    """
    _check_ndim(ndim)
    return (0,) + tuple(range(2, ndim))


def _check_ndim(ndim):
    """The rank of a batch-norm input: an integer >= 2 (a bool is refused: True would read as 1)."""
    if not _is_int(ndim):
        raise TypeError(f"ndim must be an integer (the input's number of dimensions), got {ndim!r}")
    if ndim < 2:
        raise ValueError(f"batch norm needs an input of shape (N, C) or (N, C, *spatial), got {ndim} dimension(s)")


def channel_shape(ndim: int, num_channels: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector (C,) against an (N, C, *spatial) input."""
    _check_ndim(ndim)                         # (num_channels may be -1, as in a reshape)
    return (1, num_channels) + (1,) * (ndim - 2)


def accumulation_dtype(dtype) -> np.dtype:
    """The working dtype of the computation: float32 for float16 data, the data's own dtype otherwise (the
    per-channel sums of batch_norm_forward are carried in float64 whatever the dtype)."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


from typing import NamedTuple


class Moments(NamedTuple):
    """Per-channel moments of a set of values: how many, their mean, and M2 = sum of squared deviations.

    count: int (values per channel);  mean, m2: arrays of shape (C,)
    """
    count: int
    mean: np.ndarray
    m2: np.ndarray

    @property
    def var(self):
        """Biased variance M2 / count: what batch norm normalizes with."""
        if self.count < 1:
            raise ValueError("the variance needs at least 1 value per channel, got 0")
        return self.m2 / self.count

    @property
    def unbiased_var(self):
        """Unbiased variance M2 / (count - 1): what the running variance is updated with."""
        if self.count < 2:
            raise ValueError(f"the unbiased variance needs at least 2 values per channel, got {self.count}")
        return self.m2 / (self.count - 1)


def moments(x) -> Moments:
    """Two-pass per-channel moments of x, shape (N, C, *spatial), summed in the data's precision
    (float32 for float16/float32 data): the experiments below measure exactly that.
    batch_norm_forward goes one step further and sums its mean in float64."""
    if not (hasattr(x, "dtype") and hasattr(x, "ndim")) or getattr(x.dtype, "kind", None) != "f":
        raise TypeError(f"moments needs a floating-point array, got {getattr(x, 'dtype', type(x).__name__)} "
                        "(an integer mean would be truncated: convert with .astype(np.float64))")
    axes = reduction_axes(x.ndim)
    if x.shape[1] == 0:
        raise ValueError(f"moments needs at least one channel, got shape {tuple(x.shape)}")
    acc = accumulation_dtype(x.dtype)
    if x.size == 0:                    # no values: count 0 and zeros (what merge_moments skips), no NaN warning
        return Moments(0, np.zeros(x.shape[1], acc), np.zeros(x.shape[1], acc))
    mean = x.mean(axis=axes, dtype=acc)
    centered = x - mean.reshape(channel_shape(x.ndim, x.shape[1]))
    m2 = (centered * centered).sum(axis=axes, dtype=acc)
    return Moments(x.size // x.shape[1], mean, m2)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan, Golub & LeVeque's merge of the moments of two disjoint sets of values."""
    for m, name in ((a, "a"), (b, "b")):
        if not isinstance(m, Moments):
            raise TypeError(f"merge_moments takes two Moments (from moments() or merge_moments()), got {name} of "
                            f"type {type(m).__name__}")
    if a.mean is not None and b.mean is not None and np.shape(a.mean) != np.shape(b.mean):
        # broadcasting would merge 1 channel into 4 without a word (None: a start with no channels yet, as precise_bn's)
        raise ValueError(f"merge_moments needs the moments of the same channels, got means of shapes "
                         f"{np.shape(a.mean)} and {np.shape(b.mean)}")
    for m, name in ((a, "a"), (b, "b")):      # a count of values: a negative one would 'unmerge' silently
        if not (_is_int(m.count) and m.count >= 0):
            raise ValueError(f"merge_moments needs counts that are integers >= 0, got {name}.count = {m.count!r}")
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / n)
    return Moments(n, mean, m2)


def _check_positive_int(value, name: str) -> int:
    """A count (chunk_size here; num_features, num_groups, repeats, ... in later chapters) as an int: an
    integer >= 1, NumPy's integers included, and not a bool, which Python counts as one (True == 1)."""
    if not (_is_int(value) and value >= 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def welford(x, chunk_size: int = 1) -> Moments:
    """Stream x through Welford's update, `chunk_size` examples (rows of axis 0) at a time.

    With chunk_size=1 and an (N, C) input this is Welford's one-value-at-a-time algorithm;
    larger chunks merge two-pass partial moments with Chan's formula. Slow (a Python loop):
    for teaching and for checking the fast paths.
    """
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    if not (hasattr(x, "dtype") and hasattr(x, "ndim")):
        raise TypeError(f"welford needs an array of shape (N, C, *spatial), got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"welford needs an array of shape (N, C, *spatial), got shape {x.shape}")
    total = moments(x[:0])                  # count 0 and zeros, as moments of no values (and its dtype check)
    for start in range(0, x.shape[0], chunk_size):
        total = merge_moments(total, moments(x[start:start + chunk_size]))
    return total
