# GENERATED FILE: do not edit.
# bnlib.data is generated from chapters/07_experiments.ipynb by tools/export.py.
# Edit the notebook, then run `python tools/export.py`.

__all__ = ['Dataset', 'stratified_split', 'load_digits', 'MNIST_MIRRORS', 'MNIST_FILES', 'default_cache_dir', 'sha256_of', 'read_idx', 'fetch', 'load_mnist']

import gzip
import hashlib
import numbers
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bnlib.stats import _is_int          # an integer, not a bool (bnlib.train takes it from here too)


class Dataset(NamedTuple):
    """A fixed train/test split; unpacks as ``x_train, y_train, x_test, y_test``.

    x_*: float32 (N, D) features in [0, 1];  y_*: int64 (N,) class labels 0..9.
    """
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _check_seed(seed, name="seed"):
    """A seed argument: an integer >= 0 (NumPy's generators are seeded with it, alone or with a model's index;
    bnlib.train checks its seeds with this too)."""
    if not (_is_int(seed) and seed >= 0):
        raise ValueError(f"{name} must be an integer >= 0, got {seed!r}")


def stratified_split(y, test_fraction: float = 0.3, seed: int = 0):
    """Indices (train, test) with each class split in the same proportion, fixed by ``seed``.

    y: (N,) integer labels. Every class keeps round(test_fraction * count) examples for the test
    split. Returns two sorted int64 index arrays that partition range(N).
    """
    y = np.asarray(y)
    if y.ndim == 1 and y.size == 0:
        raise ValueError("y is empty: there are no examples to split")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise TypeError(f"y must be a 1-D integer array of labels, got dtype {y.dtype} and shape {y.shape}")
    if not (isinstance(test_fraction, numbers.Real) and not isinstance(test_fraction, bool)
            and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    _check_seed(seed)
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        test.append(rng.permutation(members)[: int(round(test_fraction * members.size))])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(y.size), test)
    for split, indices in (("test", test), ("training", train)):
        if indices.size == 0:
            counts = np.unique(y, return_counts=True)[1]
            raise ValueError(f"test_fraction={test_fraction!r} leaves the {split} split empty: each class sends "
                             f"round(test_fraction * count) of its examples to the test split, and the classes "
                             f"have {counts.min()} to {counts.max()} examples")
    return train, test


_DIGITS_FILE = ("datasets", "data", "digits.csv.gz")     # where scikit-learn keeps them, inside its package


def _bundled_digits():
    """The digits scikit-learn ships: pixels (1797, 64) float64 and labels (1797,), read from its digits.csv.gz as
    its load_digits reads them (one row per image, the label last), without importing scikit-learn, whose import
    takes about 2 s (with SciPy); through its load_digits where the file is not where scikit-learn keeps it."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ImportError("bnlib.data.load_digits() reads the digits bundled with scikit-learn, which is not "
                          "installed: pip install scikit-learn")
    for folder in spec.submodule_search_locations or ():
        path = Path(folder).joinpath(*_DIGITS_FILE)
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")                      # np.loadtxt reads .gz files itself
            return table[:, :-1], table[:, -1].astype(int)
    from sklearn.datasets import load_digits as _sklearn_digits
    bunch = _sklearn_digits()
    return bunch.data, bunch.target


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): works offline.

    Pixels (0..16) are scaled to [0, 1]; x is float32 (N, 64). The split is stratified and fixed
    by ``seed``: with the defaults, 1,258 training and 539 held-out test examples.
    """
    pixels, labels = _bundled_digits()
    x = (pixels / 16.0).astype(np.float32)
    y = labels.astype(np.int64)
    train, test = stratified_split(y, test_fraction, seed)
    return Dataset(x[train], y[train], x[test], y[test])


MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",          # the mirror torchvision uses
    "https://storage.googleapis.com/cvdf-datasets/mnist/",     # the mirror TensorFlow uses
)
MNIST_FILES = {   # file name -> (SHA-256 of the .gz file, size in bytes)
    "train-images-idx3-ubyte.gz": ("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422),
    "train-labels-idx1-ubyte.gz": ("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881),
    "t10k-images-idx3-ubyte.gz": ("8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877),
    "t10k-labels-idx1-ubyte.gz": ("f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542),
}
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}      # unsigned-byte IDX files: labels (1-D), images (3-D)


def default_cache_dir() -> Path:
    """Where downloads are kept: $BNLIB_DATA if set, else ~/.cache/bnlib (``~`` expanded in both)."""
    return Path(os.environ.get("BNLIB_DATA") or Path.home() / ".cache" / "bnlib").expanduser()


def sha256_of(path) -> str:
    """The SHA-256 of a file as a hex string, read 1 MiB at a time (fetch() checks every download with it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_idx(path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (gzip-compressed or not) into a uint8 array of ``ndim`` axes.

    Raises ValueError naming the file when the magic number, the dimension count or the length
    does not match what the header promises (a truncated or foreign file).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:    # truncated; bad header or CRC; corrupted data
            raise ValueError(f"{path}: not a complete gzip file ({exc})") from None
    if isinstance(ndim, bool) or ndim not in _IDX_MAGIC:          # True == 1 would otherwise pass
        raise ValueError(f"ndim must be 1 (labels) or 3 (images), got {ndim!r}")
    expected_magic = _IDX_MAGIC[ndim]
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != expected_magic:
        seen = "no magic number (file shorter than 4 bytes)" if magic is None else f"IDX magic number {magic:#010x}"
        raise ValueError(f"{path}: {seen}, expected {expected_magic:#010x} (unsigned bytes, {ndim} dimensions)")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: {len(raw)} bytes is shorter than an IDX header with {ndim} dimensions (truncated)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{path}: header promises shape {shape} = {int(np.prod(shape))} bytes of data, "
                         f"file holds {len(body)} (truncated or corrupt)")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _check_root_and_download(root, download):
    """fetch's and load_mnist's two arguments that would otherwise fail late or be misread: root a folder path,
    download a bool ("no" would be true: a download the caller meant to forbid)."""
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a folder path (str or path-like), got {type(root).__name__}")
    if not isinstance(download, (bool, np.bool_)):
        raise TypeError(f"download must be True or False, got {download!r}")


def fetch(name: str, root, sha256: str, mirrors=None, download: bool = True) -> Path:
    """Return root/name, verified against ``sha256``; download it from ``mirrors`` if needed.

    A download goes to a temporary file in ``root`` and is renamed into place only after its
    checksum matches, so an interrupted download never leaves a partial file. A file already there
    whose checksum is wrong is never used: with ``download`` it is replaced by a verified download
    (and left as it was if no mirror delivers one); without, it is left alone and a ValueError says so
    (it may be the user's own copy, re-compressed, which deleting would lose).

    root: a folder (``~`` is expanded, as torchvision does); mirrors: a sequence of URL prefixes ending
    in "/" (default MNIST_MIRRORS), tried in order; a single string is refused (TypeError).
    """
    if isinstance(mirrors, (str, bytes)):
        raise TypeError(f"mirrors must be a sequence of URL prefixes, e.g. [{mirrors!r}], got a single "
                        f"{type(mirrors).__name__}")
    _check_root_and_download(root, download)
    root, mirrors = Path(root).expanduser(), MNIST_MIRRORS if mirrors is None else tuple(mirrors)
    target = root / name
    if target.exists():
        got = sha256_of(target)
        if got == sha256:
            return target
        if not download:
            raise ValueError(f"{target} has SHA-256 {got}, expected {sha256} (corrupt, truncated or another "
                             f"file); it was left in place: delete it, or call again with download=True to "
                             f"replace it with a verified download")
    if not download:
        raise FileNotFoundError(f"{name} is not in the cache folder {root} and download=False; "
                                f"put the MNIST files there, or use bnlib.data.load_digits(), "
                                f"which needs no download")
    root.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in mirrors:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=root)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(mirror + name, timeout=60) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    out.write(block)
            got = sha256_of(tmp)
            if got != sha256:
                errors.append(f"{mirror}{name}: SHA-256 {got}, expected {sha256} (corrupt or truncated)")
                continue
            os.replace(tmp, target)                  # atomic: the cache holds a whole, verified file
            return target
        except (urllib.error.URLError, OSError, ValueError) as exc:
            errors.append(f"{mirror}{name}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError(f"could not download {name} into the cache folder {root}:\n  " + "\n  ".join(errors) +
                  f"\nOffline? Copy the four MNIST .gz files into {root}, or use bnlib.data.load_digits(), "
                  f"which needs no download.")


def load_mnist(root=None, download: bool = True) -> Dataset:
    """MNIST from the standard IDX files: 60,000 training and 10,000 test images of 28x28 pixels.

    root: the cache folder (``~`` expanded; default ``default_cache_dir() / "mnist"``). Files are downloaded once
    from ``MNIST_MIRRORS`` and verified with SHA-256 (``MNIST_FILES``). The split is MNIST's own,
    fixed test set (the one the paper reports on), not re-drawn. x is float32 (N, 784) in [0, 1]; y is int64 (N,).
    """
    root = default_cache_dir() / "mnist" if root is None else root
    _check_root_and_download(root, download)                     # before any file work
    root = Path(root).expanduser()
    arrays = {}
    for name, (digest, _size) in MNIST_FILES.items():
        path = fetch(name, root, digest, download=download)
        ndim = 3 if "images" in name else 1
        arrays[name] = read_idx(path, ndim)
    def images(name):
        a = arrays[name]
        return (a.reshape(a.shape[0], -1) / np.float32(255)).astype(np.float32)
    return Dataset(images("train-images-idx3-ubyte.gz"), arrays["train-labels-idx1-ubyte.gz"].astype(np.int64),
                   images("t10k-images-idx3-ubyte.gz"), arrays["t10k-labels-idx1-ubyte.gz"].astype(np.int64))
