"""Data sets: file formats written byte by byte and read back, corrupt files refused with a clear
DataError, seeded determinism, and the known structure of the synthetic sets."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from scalesgd.data import datasets as D
from scalesgd.data.datasets import DATASET_NAMES, load_dataset, replicate_training_set
from scalesgd.errors import DataError

# --- helpers that write the exact on-disk formats ------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file: big-endian magic (0x0000, 0x08 = uint8, ndim), big-endian uint32 dims, C-order data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx_dir(root, *, n_train=7, n_test=5, gz=False, rows=28, cols=28, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, rows, cols), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, rows, cols), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["train-labels-idx1-ubyte"][0] = 9  # so num_outputs is 10 whatever the draw
    root.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        data = idx_bytes(a)
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return arrays


def idx_file(root, stem):
    return next(p for p in root.iterdir() if p.name.startswith(stem))


def write_cifar_dir(root, *, per_batch=3, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in D.CIFAR10_TRAIN_FILES + (D.CIFAR10_TEST_FILE,):
        n = n_test if name == D.CIFAR10_TEST_FILE else per_batch
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        records = np.concatenate([labels[:, None], pixels.reshape(n, -1)], axis=1)  # (n, 3073)
        (root / name).write_bytes(records.tobytes())
        written[name] = (pixels, labels)
    return written


def raises_data_error(*words):
    """A pytest.raises for DataError whose message contains every one of ``words`` (case-insensitive)."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(DataError)
            self._info = self._ctx.__enter__()
            return self._info

        def __exit__(self, *exc):
            handled = self._ctx.__exit__(*exc)
            message = str(self._info.value).lower()
            for word in words:
                assert word.lower() in message, f"{word!r} not in DataError message: {message}"
            return handled

    return _Check()


# --- IDX -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_idx_dir(tmp_path / "mnist", gz=gz)
    ds = load_dataset(f"idx:{tmp_path / 'mnist'}")
    assert ds.x_train.shape == (7, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_outputs == 10 and ds.task == "classification"
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    np.testing.assert_allclose(ds.x_train[:, 0].numpy() * 255, arrays["train-images-idx3-ubyte"], atol=1e-3)
    np.testing.assert_allclose(ds.x_test[:, 0].numpy() * 255, arrays["t10k-images-idx3-ubyte"], atol=1e-3)
    assert ds.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_idx_subset_is_seeded(tmp_path):
    write_idx_dir(tmp_path, n_train=12)
    a = load_dataset(f"idx:{tmp_path}", n_train=5, seed=1)
    b = load_dataset(f"idx:{tmp_path}", n_train=5, seed=1)
    assert a.n_train == 5 and a.n_test == 5
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    with raises_data_error("only 12", "--n-train"):
        load_dataset(f"idx:{tmp_path}", n_train=13)


def test_idx_missing_directory_and_file(tmp_path):
    with raises_data_error("does not exist", "train-images-idx3-ubyte"):
        load_dataset(f"idx:{tmp_path / 'nowhere'}")
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with raises_data_error("missing file", "t10k-labels-idx1-ubyte"):
        load_dataset(f"idx:{tmp_path}")
    with raises_data_error("needs a directory"):
        load_dataset("idx:")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    write_idx_dir(tmp_path, gz=gz)
    path = idx_file(tmp_path, "train-images-idx3-ubyte")
    data = idx_bytes(np.zeros((7, 28, 28), np.uint8))[:-100]
    path.write_bytes(gzip.compress(data) if gz else data)
    with raises_data_error("truncated", path.name):
        load_dataset(f"idx:{tmp_path}")


def test_idx_truncated_header(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00")
    with raises_data_error("truncated", "t10k-labels-idx1-ubyte"):
        load_dataset(f"idx:{tmp_path}")


def test_idx_wrong_magic(tmp_path):
    arrays = write_idx_dir(tmp_path)
    # A label file where the image file should be: magic 0x801, not 0x803.
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(arrays["train-labels-idx1-ubyte"]))
    with raises_data_error("wrong magic", "0x00000801", "0x00000803"):
        load_dataset(f"idx:{tmp_path}")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        idx_bytes(arrays["train-images-idx3-ubyte"], magic=0x00000D03))  # float data, not uint8
    with raises_data_error("wrong magic"):
        load_dataset(f"idx:{tmp_path}")


def test_idx_count_mismatch(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(6, dtype=np.uint8)))
    with raises_data_error("count mismatch", "7 images", "6 labels"):
        load_dataset(f"idx:{tmp_path}")


def test_idx_trailing_bytes(tmp_path):
    write_idx_dir(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00" * 10)
    with raises_data_error("10 bytes beyond"):
        load_dataset(f"idx:{tmp_path}")


def test_idx_corrupt_gzip(tmp_path):
    write_idx_dir(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[12:20] = b"\xff" * 8  # damage the deflate stream
    path.write_bytes(bytes(data))
    with raises_data_error("corrupt gzip", path.name):
        load_dataset(f"idx:{tmp_path}")
    path.write_bytes(b"not gzip at all")
    with raises_data_error("corrupt gzip"):
        load_dataset(f"idx:{tmp_path}")


def test_idx_gzip_without_suffix_is_read(tmp_path):
    arrays = write_idx_dir(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(gzip.compress(path.read_bytes()))  # sniffed by its magic bytes, not its name
    assert load_dataset(f"idx:{tmp_path}").y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_idx_images_feed_the_image_models(tmp_path):
    from scalesgd import models

    write_idx_dir(tmp_path)
    ds = load_dataset(f"idx:{tmp_path}")
    for build in (models.mlp, models.cnn):
        out = build(input_shape=ds.input_shape, num_outputs=ds.num_outputs)(ds.x_train[:3])
        assert out.shape == (3, 10)


# --- CIFAR-10 binary -----------------------------------------------------------------------------------


def test_cifar10_round_trip(tmp_path):
    written = write_cifar_dir(tmp_path / "cifar-10-batches-bin")
    for root in (tmp_path / "cifar-10-batches-bin", tmp_path):  # the extracted folder or its parent
        ds = load_dataset(f"cifar10:{root}")
        assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
        assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64 and ds.num_outputs == 10
    train_pixels = np.concatenate([written[f][0] for f in D.CIFAR10_TRAIN_FILES])  # (15, 3, 32, 32)
    train_labels = np.concatenate([written[f][1] for f in D.CIFAR10_TRAIN_FILES])
    assert ds.y_train.tolist() == train_labels.tolist()
    assert ds.y_test.tolist() == written[D.CIFAR10_TEST_FILE][1].tolist()
    # Per-channel normalisation from the training set: mean 0, std 1 there, and pixel order preserved.
    per_channel = ds.x_train.transpose(0, 1).reshape(3, -1).double()
    np.testing.assert_allclose(per_channel.mean(1).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(per_channel.std(1, unbiased=False).numpy(), 1.0, atol=1e-4)
    mean = train_pixels.transpose(1, 0, 2, 3).reshape(3, -1).mean(1) / 255
    std = train_pixels.transpose(1, 0, 2, 3).reshape(3, -1).std(1) / 255
    expected_test = (written[D.CIFAR10_TEST_FILE][0] / 255 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(ds.x_test.numpy(), expected_test, atol=1e-4)


def test_cifar10_wrong_size(tmp_path):
    write_cifar_dir(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with raises_data_error("data_batch_3.bin", "multiple", "3073"):
        load_dataset(f"cifar10:{tmp_path}")


def test_cifar10_bad_label(tmp_path):
    write_cifar_dir(tmp_path)
    path = tmp_path / "test_batch.bin"
    data = bytearray(path.read_bytes())
    data[D.CIFAR10_RECORD_BYTES] = 10  # record 1's label byte
    path.write_bytes(bytes(data))
    with raises_data_error("record 1", "label", "0..9"):
        load_dataset(f"cifar10:{tmp_path}")


def test_cifar10_missing_file(tmp_path):
    write_cifar_dir(tmp_path)
    (tmp_path / "data_batch_5.bin").unlink()
    with raises_data_error("missing file", "data_batch_5.bin"):
        load_dataset(f"cifar10:{tmp_path}")
    (tmp_path / "test_batch.bin").unlink()
    (tmp_path / "data_batch_5.bin").write_bytes(bytes(D.CIFAR10_RECORD_BYTES))
    with raises_data_error("missing file", "test_batch.bin"):
        load_dataset(f"cifar10:{tmp_path}")


@pytest.mark.parametrize("layout", ["python-release", "pkl"])
def test_cifar10_pickles_are_refused_never_loaded(tmp_path, layout):
    class Boom:
        def __reduce__(self):  # unpickling this would raise; the loader must never get that far
            return (RuntimeError, ("the loader unpickled a file",))

    if layout == "python-release":
        root = tmp_path / "cifar-10-batches-py"
        root.mkdir()
        for name in ("data_batch_1", "data_batch_2", "test_batch", "batches.meta"):
            (root / name).write_bytes(pickle.dumps(Boom()))
        spec_dir = tmp_path  # the parent, as a user would pass it after extracting the python archive
    else:
        root = spec_dir = tmp_path
        (root / "cifar10_train.pkl").write_bytes(pickle.dumps(Boom()))
    with raises_data_error("pickle", "binary release", "data_batch_1.bin"):
        load_dataset(f"cifar10:{spec_dir}")


def test_cifar10_unextracted_archive(tmp_path):
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"")
    with raises_data_error("extract", "cifar-10-binary.tar.gz"):
        load_dataset(f"cifar10:{tmp_path}")


# --- digits ---------------------------------------------------------------------------------------------


def test_digits_shapes_and_split():
    ds = load_dataset("digits")
    assert ds.n_train + ds.n_test == 1797 and ds.n_test == 359
    assert ds.input_shape == (64,) and ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_outputs == 10 and ds.task == "classification"
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    # Stratified: every class is 20% test to within one example's rounding.
    train_counts = torch.bincount(ds.y_train, minlength=10)
    test_counts = torch.bincount(ds.y_test, minlength=10)
    assert torch.all((test_counts.double() - 0.2 * (train_counts + test_counts)).abs() <= 0.5)
    # The split is a partition of the 1797 images (as sorted multisets of rows).
    from sklearn.datasets import load_digits

    everything = torch.as_tensor(load_digits().data, dtype=torch.float32) / 16
    both = torch.cat([ds.x_train, ds.x_test])
    assert torch.equal(torch.sort(both.sum(1)).values, torch.sort(everything.sum(1)).values)


def test_digits_split_is_deterministic_in_the_data_seed():
    a, b, c = load_dataset("digits"), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    small = load_dataset("digits", n_train=100, n_test=50)
    assert small.n_train == 100 and small.n_test == 50


# --- synthetic ------------------------------------------------------------------------------------------


def test_synthetic_linreg_shapes_and_determinism():
    ds = load_dataset("synthetic-linreg")
    assert ds.task == "regression" and ds.num_outputs == 1
    assert ds.x_train.shape == (2000, 20) and ds.y_train.shape == (2000, 1) and ds.x_test.shape == (1000, 20)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.float32
    again, other = load_dataset("synthetic-linreg"), load_dataset("synthetic-linreg", seed=1)
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)
    assert not torch.equal(ds.x_train, other.x_train)
    small = load_dataset("synthetic-linreg", n_train=50, n_test=10, dim=5, noise=0.3)
    assert small.x_train.shape == (50, 5) and small.y_test.shape == (10, 1)
    # More data extends the training set; a different n_test leaves it alone.
    bigger = load_dataset("synthetic-linreg", n_train=100, n_test=20, dim=5, noise=0.3)
    assert torch.equal(bigger.x_train[:50], small.x_train) and torch.equal(bigger.y_train[:50], small.y_train)


def test_synthetic_linreg_structure():
    dim, noise = 8, 0.5
    ds = load_dataset("synthetic-linreg", n_train=20000, dim=dim, noise=noise, seed=3)
    x, y = ds.x_train.double().numpy(), ds.y_train.double().numpy()[:, 0]
    w_star = D.linreg_w_star(dim=dim, seed=3)
    np.testing.assert_allclose(np.linalg.lstsq(x, y, rcond=None)[0], w_star, atol=0.02)
    np.testing.assert_allclose((y - x @ w_star).std(), noise, rtol=0.03)


def test_synthetic_linreg_batch_size_bound_is_d_plus_2_without_noise():
    """n·Δ(w) = M2/‖∇F‖² equals d + 2 at every w for noiseless isotropic least squares (docstring)."""
    dim = 20
    ds = load_dataset("synthetic-linreg", n_train=20000, dim=dim)
    x, y = ds.x_train.double().numpy(), ds.y_train.double().numpy()[:, 0]
    rng = np.random.default_rng(0)
    for _ in range(3):
        w = rng.standard_normal(dim)
        grads = x * (x @ w - y)[:, None]  # (n, dim) per-example gradients of ½(x·w − y)²
        n_delta = (grads**2).sum(1).mean() / (grads.mean(0) ** 2).sum()
        assert n_delta == pytest.approx(dim + 2, rel=0.05)


def test_synthetic_logreg():
    ds = load_dataset("synthetic-logreg")
    assert ds.task == "classification" and ds.num_outputs == 2
    assert ds.x_train.shape == (2000, 20) and ds.y_train.shape == (2000,) and ds.y_train.dtype == torch.int64
    again = load_dataset("synthetic-logreg")
    assert torch.equal(ds.y_train, again.y_train) and torch.equal(ds.x_test, again.x_test)
    assert not torch.equal(ds.y_train, load_dataset("synthetic-logreg", seed=1).y_train)
    multi = load_dataset("synthetic-logreg", num_classes=4, dim=6, n_train=3000)
    assert multi.num_outputs == 4 and set(multi.y_train.tolist()) == {0, 1, 2, 3}
    # Noiseless labels are the argmax of the true logits; higher temperature agrees with it less often.
    w_star = D.logreg_w_star(dim=6, num_classes=4)
    bayes = lambda d: (d.x_train.numpy() @ w_star).argmax(1)  # noqa: E731
    agreement = {}
    for noise in (0.0, 1.0, 5.0):
        d = load_dataset("synthetic-logreg", num_classes=4, dim=6, n_train=3000, noise=noise)
        agreement[noise] = float((d.y_train.numpy() == bayes(d)).mean())
    assert agreement[0.0] == 1.0 and agreement[0.0] > agreement[1.0] > agreement[5.0] > 0.25


# --- replication ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 1.5, 2, 4, 8])
def test_replication_keeps_n_with_n_over_r_distinct_rows(r):
    ds = load_dataset("synthetic-logreg", n_train=400)
    rep = replicate_training_set(ds, r, seed=0)
    assert rep.n_train == ds.n_train and torch.equal(rep.x_test, ds.x_test)
    distinct, counts = torch.unique(rep.x_train, dim=0, return_counts=True)
    assert len(distinct) == round(400 / r)
    assert counts.min() >= int(r) and counts.max() <= int(np.ceil(r))
    # Every row is an original example with its own label.
    original = {tuple(row.tolist()): int(label) for row, label in zip(ds.x_train, ds.y_train)}
    assert all(original[tuple(row.tolist())] == int(label) for row, label in zip(rep.x_train, rep.y_train))
    if r == 1:
        assert rep is ds
    assert torch.equal(rep.x_train, replicate_training_set(ds, r, seed=0).x_train)


def test_replicate_option_of_load_dataset():
    ds = load_dataset("digits", replicate=4)
    assert ds.n_train == 1438 and ds.name == "digits-replicate4"
    assert torch.equal(ds.x_train, load_dataset("digits", replicate=4).x_train)
    with raises_data_error("replicate", ">= 1"):
        load_dataset("digits", replicate=0.5)
    with raises_data_error("exceeds"):
        load_dataset("synthetic-linreg", n_train=10, replicate=11)


# --- mnist1d --------------------------------------------------------------------------------------------


def test_mnist1d_small_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALESGD_CACHE", str(tmp_path))
    first = load_dataset("mnist1d", n_train=60, n_test=20)
    assert first.n_train == 60 and first.n_test == 20 and first.input_shape == (40,) and first.num_outputs == 10
    assert first.x_train.dtype == torch.float32 and first.y_train.dtype == torch.int64
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1

    import mnist1d.data

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached data set was generated again")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    second = load_dataset("mnist1d", n_train=60, n_test=20)
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_test, second.y_test)


# --- spec and option errors -----------------------------------------------------------------------------


def test_unknown_spec_lists_the_valid_ones():
    with raises_data_error("unknown data set", *DATASET_NAMES):
        load_dataset("cifar100")
    with raises_data_error("only idx and cifar10 take a :PATH"):
        load_dataset("digits:/tmp")


@pytest.mark.parametrize("options, words", [
    ({"dim": 5}, ("--dim", "does not apply", "digits")),
    ({"noise": 0.1}, ("--noise", "does not apply")),
    ({"n_train": 0}, ("--n-train", "positive")),
    ({"n_test": -1}, ("--n-test", "positive")),
])
def test_bad_options(options, words):
    with raises_data_error(*words):
        load_dataset("digits", **options)


def test_bad_synthetic_options():
    with raises_data_error("--noise", ">= 0"):
        load_dataset("synthetic-linreg", noise=-1.0)
    with raises_data_error("num_classes", "does not apply"):
        load_dataset("synthetic-linreg", num_classes=3)
    with raises_data_error("num_classes", ">= 2"):
        load_dataset("synthetic-logreg", num_classes=1)
    with raises_data_error("seed", ">= 0"):
        load_dataset("synthetic-logreg", seed=-1)
