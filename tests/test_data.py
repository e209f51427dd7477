"""bnlib.data: the digits split, and MNIST's IDX parsing, checksums and cache, offline on tiny files."""
import gzip
import hashlib

import numpy as np
import pytest

from bnlib import data


def idx_bytes(array, magic=None):
    """An unsigned-byte IDX file for ``array`` (what MNIST's files are), optionally with a wrong magic."""
    array = np.asarray(array, dtype=np.uint8)
    magic = magic if magic is not None else 0x0800 + array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_mnist_fixture(folder, n_train=20, n_test=10, seed=0):
    """Four tiny gzipped IDX files with MNIST's names; returns {name: (sha256, size)} and the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(n_test) % 10,
    }
    table = {}
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        blob = gzip.compress(idx_bytes(a))
        (folder / name).write_bytes(blob)
        table[name] = (hashlib.sha256(blob).hexdigest(), len(blob))
    return table, arrays


def test_digits_split_is_fixed_stratified_and_disjoint():
    a, b = data.load_digits(), data.load_digits()
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    x_train, y_train, x_test, y_test = a
    assert x_train.dtype == np.float32 and x_train.shape[1] == 64 and y_train.dtype == np.int64
    assert x_train.shape[0] + x_test.shape[0] == 1797
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    train_share = np.bincount(y_train) / y_train.size
    test_share = np.bincount(y_test) / y_test.size
    assert np.abs(train_share - test_share).max() < 0.01               # stratified
    # no test image also appears in the training split (digits has no duplicate rows)
    rows = {r.tobytes() for r in x_train}
    assert not any(r.tobytes() in rows for r in x_test)


def test_stratified_split_checks_arguments():
    with pytest.raises(ValueError, match="test_fraction"):
        data.stratified_split(np.arange(10), test_fraction=1.5)
    with pytest.raises(TypeError, match="integer"):
        data.stratified_split(np.linspace(0, 1, 10))
    for seed in (1.5, -1, None, True):                  # NumPy's own errors did not name the argument
        with pytest.raises(ValueError, match="seed must be an integer >= 0"):
            data.stratified_split(np.arange(10) % 2, seed=seed)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        data.load_digits(seed=-1)


def test_read_idx_valid_plain_and_gzip(tmp_path):
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    (tmp_path / "x.idx").write_bytes(idx_bytes(a))
    (tmp_path / "x.idx.gz").write_bytes(gzip.compress(idx_bytes(a)))
    for name in ("x.idx", "x.idx.gz"):
        got = data.read_idx(tmp_path / name, ndim=3)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, a)


def test_read_idx_rejects_wrong_magic(tmp_path):
    (tmp_path / "bad.idx").write_bytes(idx_bytes(np.zeros((2, 3, 4)), magic=0x0803 + 0x100))
    with pytest.raises(ValueError, match="magic number"):
        data.read_idx(tmp_path / "bad.idx", ndim=3)
    (tmp_path / "labels.idx").write_bytes(idx_bytes(np.zeros(5)))        # a label file read as images
    with pytest.raises(ValueError, match="magic number"):
        data.read_idx(tmp_path / "labels.idx", ndim=3)
    with pytest.raises(ValueError, match="ndim must be 1 .* got True"):     # True == 1 passed for labels before
        data.read_idx(tmp_path / "labels.idx", ndim=True)


def test_read_idx_rejects_truncated_files(tmp_path):
    blob = idx_bytes(np.ones((3, 28, 28)))
    (tmp_path / "short.idx").write_bytes(blob[:-7])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "short.idx", ndim=3)
    gz = gzip.compress(blob)
    (tmp_path / "short.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(ValueError, match="gzip"):
        data.read_idx(tmp_path / "short.gz", ndim=3)
    corrupted = bytearray(gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8).reshape(1, 10, 10))))
    corrupted[12] ^= 0xFF                        # inside the deflate stream: zlib.error, not OSError
    (tmp_path / "corrupted.gz").write_bytes(bytes(corrupted))
    with pytest.raises(ValueError, match="corrupted.gz: not a complete gzip file"):
        data.read_idx(tmp_path / "corrupted.gz", ndim=3)


def test_load_mnist_from_a_verified_cache(tmp_path, monkeypatch):
    table, arrays = write_mnist_fixture(tmp_path / "cache")
    monkeypatch.setattr(data, "MNIST_FILES", table)
    x_train, y_train, x_test, y_test = data.load_mnist(root=tmp_path / "cache", download=False)
    assert x_train.shape == (20, 784) and x_test.shape == (10, 784) and x_train.dtype == np.float32
    np.testing.assert_allclose(x_train * 255, arrays["train-images-idx3-ubyte.gz"].reshape(20, -1), atol=1e-3)
    np.testing.assert_array_equal(y_test, arrays["t10k-labels-idx1-ubyte.gz"])


def test_download_through_a_mirror_and_wrong_checksum_never_stays(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    table, _ = write_mnist_fixture(mirror)
    cache = tmp_path / "cache"
    monkeypatch.setattr(data, "MNIST_MIRRORS", (mirror.as_uri() + "/",))
    # a mirror serving the wrong bytes: reported, and nothing left in the cache folder
    wrong = {name: ("0" * 64, size) for name, (_, size) in table.items()}
    monkeypatch.setattr(data, "MNIST_FILES", wrong)
    with pytest.raises(OSError, match="SHA-256") as err:
        data.load_mnist(root=cache)
    assert str(cache) in str(err.value) and "load_digits" in str(err.value)
    assert list(cache.iterdir()) == []
    # the right checksums: downloaded (copied from the file:// mirror), verified, loaded
    monkeypatch.setattr(data, "MNIST_FILES", table)
    x_train, *_ = data.load_mnist(root=cache)
    assert x_train.shape == (20, 784)
    assert sorted(p.name for p in cache.iterdir()) == sorted(table)


def test_corrupt_cached_file_is_never_used_kept_offline_and_replaced_by_a_verified_download(tmp_path, monkeypatch):
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    table, _ = write_mnist_fixture(mirror)
    write_mnist_fixture(cache)
    name = "t10k-images-idx3-ubyte.gz"
    truncated = (cache / name).read_bytes()[:100]
    (cache / name).write_bytes(truncated)                                # truncated in the cache
    monkeypatch.setattr(data, "MNIST_FILES", table)
    with pytest.raises(ValueError, match=f"expected {table[name][0]}.*left in place"):
        data.load_mnist(root=cache, download=False)
    assert (cache / name).read_bytes() == truncated                       # offline: not deleted
    monkeypatch.setattr(data, "MNIST_MIRRORS", ((tmp_path / "nowhere").as_uri() + "/",))
    with pytest.raises(OSError, match="could not download"):
        data.load_mnist(root=cache)
    assert (cache / name).read_bytes() == truncated                       # no verified copy: kept as it was
    monkeypatch.setattr(data, "MNIST_MIRRORS", (mirror.as_uri() + "/",))
    data.load_mnist(root=cache)
    assert data.sha256_of(cache / name) == table[name][0]                # replaced by the verified download
    assert sorted(p.name for p in cache.iterdir()) == sorted(table)      # no temporary file left


def test_offline_without_cache_names_the_folder_and_load_digits(tmp_path, monkeypatch):
    cache = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as err:
        data.load_mnist(root=cache, download=False)
    assert str(cache) in str(err.value) and "load_digits" in str(err.value)
    # "no network": mirrors that cannot be reached
    monkeypatch.setattr(data, "MNIST_MIRRORS", ((tmp_path / "nowhere").as_uri() + "/",))
    with pytest.raises(OSError) as err:
        data.load_mnist(root=cache)
    assert str(cache) in str(err.value) and "load_digits" in str(err.value)
    assert list(cache.iterdir()) == []


def test_default_cache_dir_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLIB_DATA", str(tmp_path))
    assert data.default_cache_dir() == tmp_path


def test_load_digits_reads_scikit_learns_file_as_scikit_learn_does_without_importing_it(monkeypatch):
    """The pixels and labels are scikit-learn's own load_digits() values, read from the file it ships without
    importing it (a fresh process has no sklearn module afterwards); where the file is not found, scikit-learn's
    loader gives the same split."""
    import subprocess
    import sys
    from sklearn.datasets import load_digits as sklearn_digits
    pixels, labels = data._bundled_digits()
    bunch = sklearn_digits()
    assert pixels.dtype == bunch.data.dtype and np.array_equal(pixels, bunch.data)
    assert np.array_equal(labels, bunch.target)
    code = "import sys, bnlib.data; bnlib.data.load_digits(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    direct = data.load_digits(seed=3)
    monkeypatch.setattr(data, "_DIGITS_FILE", ("datasets", "data", "no-such-file.csv.gz"))
    for u, v in zip(direct, data.load_digits(seed=3)):
        np.testing.assert_array_equal(u, v)


def test_load_digits_without_scikit_learn_says_how_to_install_it(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        data.load_digits()


def test_home_folder_tilde_is_expanded(tmp_path, monkeypatch):
    home, cwd, mirror = tmp_path / "home", tmp_path / "cwd", tmp_path / "mirror"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    table, _ = write_mnist_fixture(mirror)
    name = "t10k-labels-idx1-ubyte.gz"
    got = data.fetch(name, "~/cache", table[name][0], mirrors=[mirror.as_uri() + "/"])
    assert got == home / "cache" / name and got.is_file()
    monkeypatch.setattr(data, "MNIST_FILES", table)
    monkeypatch.setattr(data, "MNIST_MIRRORS", (mirror.as_uri() + "/",))
    assert data.load_mnist(root="~/mnist")[0].shape == (20, 784) and (home / "mnist" / name).is_file()
    monkeypatch.setenv("BNLIB_DATA", "~/data")
    assert data.default_cache_dir() == home / "data"
    assert list(cwd.iterdir()) == []                                  # no literal "~" folder


def test_split_and_fetch_arguments_are_checked():
    with pytest.raises(ValueError, match="test_fraction must be a number"):
        data.load_digits(test_fraction="0.3")
    for fraction, split in [(1e-4, "test"), (0.9999, "training")]:
        with pytest.raises(ValueError, match=f"leaves the {split} split empty"):
            data.load_digits(test_fraction=fraction)
    with pytest.raises(ValueError, match="empty"):
        data.stratified_split(np.array([], dtype=int))
    with pytest.raises(TypeError, match="mirrors must be a sequence"):
        data.fetch("x.gz", "/nonexistent-bnlib-cache", "0" * 64, mirrors="file:///nonexistent/")


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(root=5), TypeError, ["root", "int"]),                       # was a TypeError from Path() naming no argument
    (dict(download="no"), TypeError, ["download", "'no'"]),           # was read as true: a download was attempted
    (dict(download=1), TypeError, ["download", "1"]),
])
def test_load_mnist_refuses_a_bad_root_or_download_flag_before_any_file_work(kwargs, error, words, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "fetch", lambda *a, **k: pytest.fail("fetch must not run"))
    with pytest.raises(error) as info:
        data.load_mnist(**{"root": tmp_path, **kwargs})
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("kwargs, words", [(dict(root=5), ["root", "int"]), (dict(download="no"), ["download", "'no'"])])
def test_fetch_refuses_a_bad_root_or_download_flag(kwargs, words, tmp_path):
    with pytest.raises(TypeError) as info:
        data.fetch("x.gz", **{"root": tmp_path, "sha256": "0" * 64, "mirrors": ["http://127.0.0.1:9/"], **kwargs})
    assert all(w in str(info.value) for w in words), str(info.value)
