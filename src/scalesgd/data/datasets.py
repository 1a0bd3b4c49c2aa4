"""Data sets, by name: each loader returns a :class:`Dataset` of in-memory tensors.

Built-in sets are generated or shipped by a package (``mnist1d``'s generator, scikit-learn's digits,
synthetic problems); real data sets (``idx:PATH``, ``cifar10:PATH``) are read from local files. Nothing
is downloaded.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scalesgd.errors import DataError

if TYPE_CHECKING:
    from scalesgd.config import RunConfig


@dataclass(frozen=True)
class Dataset:
    """Train and test data plus what a model and a loss need to know about them.

    ``task`` is ``"classification"`` (targets are int64 class indices, ``num_outputs`` classes) or
    ``"regression"`` (targets are float32 of shape (n, num_outputs)).

    Either in memory (``x_train`` … ``y_test`` tensors: the built-in sets, and a user's tuples of tensors) or
    read by index (``train_set`` / ``test_set``: a user's map-style ``torch.utils.data.Dataset``, read one
    example at a time per batch, see :mod:`scalesgd.data.user`). :meth:`train_batch` / :meth:`test_batch` serve
    both; ``input_shape`` is None when examples are not single tensors (dicts), ``num_outputs`` None when
    the data set does not say (a map-style set without a ``num_outputs`` or ``classes`` attribute).
    """

    name: str
    x_train: torch.Tensor | None  # (n_train, *input_shape) float32; None when read by index
    y_train: torch.Tensor | None  # (n_train,) int64 or (n_train, num_outputs) float32
    x_test: torch.Tensor | None  # (n_test, *input_shape)
    y_test: torch.Tensor | None
    num_outputs: int | None
    task: str = "classification"
    train_set: Any = None  # map-style torch Dataset of (input, target) pairs or dicts, when read by index
    test_set: Any = None
    example_shape: tuple[int, ...] | None = None  # input shape of an indexed set's examples (None: not tensors)

    @property
    def in_memory(self) -> bool:
        return self.train_set is None

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return tuple(self.x_train.shape[1:]) if self.in_memory else self.example_shape

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0]) if self.in_memory else len(self.train_set)

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0]) if self.in_memory else len(self.test_set)

    def train_batch(self, indices: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """(inputs, targets) of the training examples ``indices`` (B,): tensor indexing in memory, else each
        example read and collated (:func:`scalesgd.data.user.read_batch`)."""
        if self.in_memory:
            return self.x_train[indices], self.y_train[indices]
        from scalesgd.data.user import read_batch

        return read_batch(self.train_set, indices)

    def test_batch(self, indices: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """(inputs, targets) of the test examples ``indices`` (B,)."""
        if self.in_memory:
            return self.x_test[indices], self.y_test[indices]
        from scalesgd.data.user import read_batch

        return read_batch(self.test_set, indices)


def cache_dir() -> Path:
    """Where generated data sets are cached (``$SCALESGD_CACHE`` or ``~/.cache/scalesgd``)."""
    return Path(os.environ.get("SCALESGD_CACHE", Path.home() / ".cache" / "scalesgd"))


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_mnist1d(*, n_train: int = 20000, n_test: int = 4000, seed: int = 42) -> Dataset:
    """MNIST-1D (Greydanus & Kobak 2020), generated offline with the ``mnist1d`` package's generator.

    The package's default (4000 train / 1000 test) is too small for 94% with a CNN trained for seconds;
    we generate ``n_train + n_test`` examples with the package's own transform and defaults otherwise.
    The result is cached under :func:`cache_dir`, keyed by (n_train, n_test, seed).
    """
    if n_train < 10 or n_test < 10:
        raise DataError(f"mnist1d needs at least 10 train and 10 test examples, got n_train={n_train}, "
                        f"n_test={n_test}; pass --n-train 20000, say")
    key = hashlib.sha1(f"mnist1d-v1-{n_train}-{n_test}-{seed}".encode()).hexdigest()[:12]
    path = cache_dir() / f"mnist1d-{n_train}-{n_test}-{seed}-{key}.npz"
    arrays = None
    if path.exists():
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            arrays = None  # a corrupt cache entry is regenerated, not trusted
        if arrays is not None:
            for key, split in (("x", "training"), ("x_test", "test")):
                # A readable file whose numbers are damaged: say so before training blames the learning rate.
                check_finite(arrays[key], what=f"mnist1d cache {path}, {split} set",
                             fix=f"delete {path} and it is generated again")
    if arrays is None:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        total = n_train + n_test
        # make_dataset draws num_samples // 10 per class; round up so both splits are full.
        args.num_samples = int(np.ceil(total / 10) * 10)
        args.train_split = n_train / args.num_samples
        args.seed = seed
        state = np.random.get_state()
        try:
            data = make_dataset(args)
        finally:
            np.random.set_state(state)  # the generator seeds numpy's global state; leave it as we found it
        arrays = {"x": data["x"][:n_train], "y": data["y"][:n_train],
                  "x_test": data["x_test"][:n_test], "y_test": data["y_test"][:n_test]}
        _atomic_savez(path, **arrays)
    return Dataset(
        name="mnist1d",
        x_train=torch.as_tensor(arrays["x"], dtype=torch.float32),
        y_train=torch.as_tensor(arrays["y"], dtype=torch.int64),
        x_test=torch.as_tensor(arrays["x_test"], dtype=torch.float32),
        y_test=torch.as_tensor(arrays["y_test"], dtype=torch.int64),
        num_outputs=10,
    )


def check_finite(x: np.ndarray | torch.Tensor, *, what: str, fix: str) -> None:
    """Refuse inputs holding NaN or ±inf, naming the first such example.

    Args:
        x: (n, ...) inputs, one example per row.
        what: where the rows come from, e.g. "mnist1d cache /path, training set".
        fix: what to do about it.
    Raises:
        DataError: "``what``: example i holds NaN ... ; ``fix``".
    """
    t = torch.as_tensor(x)
    if not t.is_floating_point() or t.numel() == 0:
        return
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)  # (n,)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        values = t[i][~torch.isfinite(t[i])]
        raise DataError(f"{what}: example {i} holds {values[0].item()} ({int(bad.sum())} of {t.shape[0]} examples "
                        f"hold non-finite values), which would end training as if it had diverged; {fix}")


# --- randomness --------------------------------------------------------------------------------------
# Every random choice a loader makes comes from its own numpy stream, keyed by (data seed, purpose), so
# that changing one option (say n_test) never reshuffles another part (the training set), and nothing
# depends on numpy's or torch's global state or on the *training* seed.
_STREAM_SPLIT, _STREAM_SUB_TRAIN, _STREAM_SUB_TEST, _STREAM_REPLICATE = 1, 2, 3, 4
_STREAM_W_STAR, _STREAM_X_TRAIN, _STREAM_X_TEST, _STREAM_E_TRAIN, _STREAM_E_TEST = 5, 6, 7, 8, 9


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream])


def _subsample(x: np.ndarray, y: np.ndarray, n: int | None, rng: np.random.Generator, *, what: str,
               option: str) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of ``n`` rows (all rows, in file order, when ``n`` is None or everything)."""
    available = int(x.shape[0])
    if n is None or n == available:
        return x, y
    if n > available:
        raise DataError(f"{what} has only {available} examples, {option}={n} asks for more; "
                        f"pass {option} {available} or less (or leave it unset for all of them)")
    keep = rng.permutation(available)[:n]  # (n,)
    return x[keep], y[keep]


# --- scikit-learn digits -------------------------------------------------------------------------------
DIGITS_TEST_FRACTION = 0.2


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (pixel counts (1797, 64) float32, labels (1797,) int64), cached under
    :func:`cache_dir`: importing scikit-learn (scipy.stats and all) takes longer than a short run's training,
    and every run and every worker would pay it. The cache holds the arrays as converted here, so a cached
    load is bit-identical to a fresh one."""
    path = cache_dir() / "digits-v1.npz"
    if path.exists():
        try:
            with np.load(path) as f:
                return f["x"], f["y"]
        except (OSError, ValueError, KeyError):
            pass  # a corrupt cache entry is rebuilt, not trusted
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = np.asarray(bunch.data, dtype=np.float32)  # (1797, 64) pixel counts 0..16
    y = np.asarray(bunch.target, dtype=np.int64)  # (1797,)
    try:
        _atomic_savez(path, x=x, y=y)
    except OSError:  # an unwritable cache only costs the next run the import again
        pass
    return x, y


def load_digits(*, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Dataset:
    """scikit-learn's handwritten digits (UCI optdigits test part): 1797 images of 8x8 pixels, 10 classes.

    Inputs are the 64 pixel counts (0..16) divided by 16, shape (64,). The split is stratified, 80/20 in
    every class (1438 train / 359 test), drawn from ``seed`` only: the data seed, not the training seed,
    so runs with different training seeds see the same split. ``n_train`` / ``n_test`` take seeded random
    subsets of the two parts.
    """
    pixels, y = _digits_arrays()
    x = pixels / 16.0  # (1797, 64) in [0, 1]
    rng = _rng(seed, _STREAM_SPLIT)
    test_mask = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        n_label_test = int(round(DIGITS_TEST_FRACTION * len(members)))
        test_mask[rng.permutation(members)[:n_label_test]] = True
    x_tr, y_tr = _subsample(x[~test_mask], y[~test_mask], n_train, _rng(seed, _STREAM_SUB_TRAIN),
                            what="digits' training split", option="--n-train")
    x_te, y_te = _subsample(x[test_mask], y[test_mask], n_test, _rng(seed, _STREAM_SUB_TEST),
                            what="digits' test split", option="--n-test")
    return Dataset(name="digits", x_train=torch.from_numpy(np.ascontiguousarray(x_tr)),
                   y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
                   x_test=torch.from_numpy(np.ascontiguousarray(x_te)),
                   y_test=torch.from_numpy(np.ascontiguousarray(y_te)), num_outputs=10)


# --- MNIST / Fashion-MNIST IDX files -------------------------------------------------------------------
IDX_IMAGES_MAGIC = 0x00000803  # two zero bytes, type 0x08 (unsigned byte), 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
IDX_NUM_CLASSES = 10  # MNIST's digits and Fashion-MNIST's clothing classes: labels 0..9
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip (by its name or by its first two bytes)."""
    raw = path.read_bytes()
    if not (path.suffix == ".gz" or raw[:2] == _GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip file ({e}); download it again, or gunzip it yourself and "
                        f"keep the uncompressed file next to the others") from e


def idx_file_names(stem: str) -> list[str]:
    """The names one IDX file goes by: the official ``train-images-idx3-ubyte``, the mirrors' dotted
    ``train-images.idx3-ubyte`` (and ``.idx3.ubyte`` / ``-idx3.ubyte``), each also gzipped (``.gz``)."""
    head, kind, tail = stem.rsplit("-", 2)  # "train-images", "idx3", "ubyte"
    names = [f"{head}{a}{kind}{b}{tail}" for a in "-." for b in "-."]
    return [n + gz for n in names for gz in ("", ".gz")]


def _find_idx_file(root: Path, stem: str) -> Path:
    for name in idx_file_names(stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"missing file {stem} (or {stem.replace('-idx', '.idx')}, either one .gz) in {root}; an idx: "
                    f"directory holds the four MNIST / Fashion-MNIST files {', '.join(IDX_FILES.values())}, each "
                    "optionally gzipped")


def read_idx(path: Path, *, expected_magic: int) -> np.ndarray:
    """Parse one IDX file (LeCun's MNIST format) into a uint8 array, checking its header against its size.

    Layout: a big-endian uint32 magic (0x0000, type byte 0x08 = unsigned byte, number of dimensions), one
    big-endian uint32 per dimension, then the data in C order.
    """
    data = _read_maybe_gzip(path)
    kind = "image" if expected_magic == IDX_IMAGES_MAGIC else "label"
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, not even a header); download it again")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                        f"(an IDX {kind} file of unsigned bytes); check that the file is the {kind} file it is "
                        f"named after and not swapped or corrupt")
    ndim = magic & 0xFF
    header_bytes = 4 + 4 * ndim
    if len(data) < header_bytes:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, header needs {header_bytes}); "
                        f"download it again")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    # Python integers: a damaged header's dimensions (each up to 2^32 - 1) can multiply past int64
    expected = header_bytes + math.prod(shape)
    if len(data) < expected:
        raise DataError(f"{path}: truncated IDX file: header says shape {shape} ({expected} bytes) but the "
                        f"{'uncompressed ' if path.suffix == '.gz' else ''}file has {len(data)}; the header or the "
                        "file is damaged, download it again")
    if len(data) > expected:
        raise DataError(f"{path}: {len(data) - expected} bytes beyond what the header's shape {shape} accounts "
                        f"for; the file is corrupt or not an IDX file, download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(shape)


def _read_idx_pair(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_idx_file(root, IDX_FILES[f"{split}_images"])
    labels_path = _find_idx_file(root, IDX_FILES[f"{split}_labels"])
    images = read_idx(images_path, expected_magic=IDX_IMAGES_MAGIC)  # (n, rows, cols) uint8
    labels = read_idx(labels_path, expected_magic=IDX_LABELS_MAGIC)  # (n,) uint8
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"count mismatch: {images_path.name} holds {images.shape[0]} images but "
                        f"{labels_path.name} holds {labels.shape[0]} labels; the two files come from different "
                        f"releases or one is damaged, download both again")
    if images.shape[0] == 0:
        raise DataError(f"{images_path}: holds no images; download it again")
    if 0 in images.shape[1:]:
        raise DataError(f"{images_path}: its header says the images are {images.shape[1]}x{images.shape[2]} pixels, "
                        "an image with no pixels; the header is damaged, download the file again")
    bad = np.flatnonzero(labels >= IDX_NUM_CLASSES)
    if bad.size:
        i = int(bad[0])
        more = f", nor are {bad.size - 1} more labels" if bad.size > 1 else ""
        raise DataError(f"{labels_path}: label {int(labels[i])} at index {i} is not a class of MNIST or "
                        f"Fashion-MNIST (0..{IDX_NUM_CLASSES - 1}){more}; "
                        "the file is damaged or not an MNIST label file, download it again")
    return images, labels


def load_idx(path: str | os.PathLike, *, n_train: int | None = None, n_test: int | None = None,
             seed: int = 0) -> Dataset:
    """MNIST or Fashion-MNIST from the four IDX files in directory ``path`` (each optionally gzipped).

    Inputs are (1, rows, cols) float32 in [0, 1] (pixel / 255); one channel so that image models (``cnn``)
    take them as they are and ``mlp`` flattens them. ``num_outputs`` is the largest label + 1 (10 for
    MNIST and Fashion-MNIST). ``n_train`` / ``n_test`` take seeded random subsets.

    Raises:
        DataError: one line naming the file, when a file is missing, truncated, of the wrong kind, its header's
            dimensions disagree with its size (or multiply past it) or give images of zero pixels, or a label
            is outside 0..9 (naming the value and its index: a damaged label file would otherwise build a
            model with that many classes).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"idx: directory {root} does not exist; pass idx:DIR with DIR holding "
                        f"{', '.join(IDX_FILES.values())} (each optionally .gz)")
    x_tr, y_tr = _read_idx_pair(root, "train")
    x_te, y_te = _read_idx_pair(root, "test")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{root}: training images are {x_tr.shape[1]}x{x_tr.shape[2]} but test images are "
                        f"{x_te.shape[1]}x{x_te.shape[2]}; the files come from different data sets")
    num_outputs = int(max(y_tr.max(), y_te.max())) + 1
    x_tr, y_tr = _subsample(x_tr, y_tr, n_train, _rng(seed, _STREAM_SUB_TRAIN), what=f"{root}'s training set",
                            option="--n-train")
    x_te, y_te = _subsample(x_te, y_te, n_test, _rng(seed, _STREAM_SUB_TEST), what=f"{root}'s test set",
                            option="--n-test")

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32)).div_(255.0).unsqueeze(1)  # (n, 1, H, W)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))  # (n,)

    return Dataset(name=f"idx:{root.resolve().name}", x_train=images(x_tr), y_train=labels(y_tr),
                   x_test=images(x_te), y_test=labels(y_te), num_outputs=num_outputs)


# --- CIFAR-10, binary release -------------------------------------------------------------------------
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32  # one label byte, then 1024 red, 1024 green, 1024 blue bytes
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
_CIFAR10_BINARY_HINT = ("use the CIFAR-10 binary release (cifar-10-binary.tar.gz from "
                        "https://www.cs.toronto.edu/~kriz/cifar.html), extracted: cifar-10-batches-bin/ with "
                        "data_batch_1.bin ... data_batch_5.bin and test_batch.bin")


def _cifar10_dir(root: Path) -> Path:
    """The directory with the .bin files: ``root`` itself or the archive's ``cifar-10-batches-bin``."""
    if not root.is_dir():
        raise DataError(f"cifar10: directory {root} does not exist; {_CIFAR10_BINARY_HINT}")
    for candidate in (root, root / "cifar-10-batches-bin"):
        if (candidate / CIFAR10_TRAIN_FILES[0]).is_file():
            return candidate
    # The python release holds pickles; unpickling a downloaded file runs arbitrary code, so refuse it.
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file() or any(candidate.glob("*.pkl")) or any(candidate.glob("*.pickle")):
            raise DataError(f"cifar10: {candidate} holds the pickled python release of CIFAR-10, which scalesgd "
                            f"never unpickles (unpickling runs code from the file); {_CIFAR10_BINARY_HINT}")
    archives = sorted(p.name for p in root.glob("cifar-10-*.tar.gz"))
    if archives:
        raise DataError(f"cifar10: {root} holds the archive {archives[0]} but not its contents; extract it "
                        f"(tar xzf {archives[0]} -C {root}) and pass the directory again")
    raise DataError(f"cifar10: missing file {CIFAR10_TRAIN_FILES[0]} in {root}; {_CIFAR10_BINARY_HINT}")


def _read_cifar10_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"cifar10: missing file {path.name} in {path.parent}; {_CIFAR10_BINARY_HINT}")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD_BYTES:
        extra = (" (a multiple of 3074: CIFAR-100's binary release, with two label bytes, is not supported)"
                 if raw.size and raw.size % 3074 == 0 else "")
        raise DataError(f"cifar10: {path} has {raw.size} bytes, not a positive multiple of the "
                        f"{CIFAR10_RECORD_BYTES}-byte record{extra}; the file is truncated or not from the "
                        f"binary release; {_CIFAR10_BINARY_HINT}")
    records = raw.reshape(-1, CIFAR10_RECORD_BYTES)  # (n, 3073)
    labels = records[:, 0]
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise DataError(f"cifar10: {path}: record {int(bad[0])} has label byte {int(labels[bad[0]])}, outside "
                        f"0..9; the file is corrupt or not from the binary release; {_CIFAR10_BINARY_HINT}")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(path: str | os.PathLike, *, n_train: int | None = None, n_test: int | None = None,
                 seed: int = 0) -> Dataset:
    """CIFAR-10 from its binary release in directory ``path`` (never the pickled python release).

    Inputs are (3, 32, 32) float32, normalised per channel with the mean and standard deviation of the
    *whole* training set (all five batches, before any ``n_train`` subset), so the statistics do not leak
    the test set and do not change with ``n_train``.
    """
    root = _cifar10_dir(Path(path).expanduser())
    parts = [_read_cifar10_bin(root / name) for name in CIFAR10_TRAIN_FILES]
    x_tr = np.concatenate([p[0] for p in parts])  # (n_train, 3, 32, 32) uint8
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar10_bin(root / CIFAR10_TEST_FILE)
    # Per-channel statistics from a 256-bin histogram of each channel: exact, and no float copy of the set.
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, std = np.empty(3), np.empty(3)
    for c in range(3):
        p = np.bincount(x_tr[:, c].ravel(), minlength=256) / (x_tr.shape[0] * 32 * 32)  # (256,)
        mean[c] = p @ levels
        std[c] = np.sqrt(max(p @ (levels - mean[c]) ** 2, 0.0))
    std = np.where(std > 0, std, 1.0)  # a constant channel (only in toy files) is centred, not divided by 0
    x_tr, y_tr = _subsample(x_tr, y_tr, n_train, _rng(seed, _STREAM_SUB_TRAIN), what="CIFAR-10's training set",
                            option="--n-train")
    x_te, y_te = _subsample(x_te, y_te, n_test, _rng(seed, _STREAM_SUB_TEST), what="CIFAR-10's test set",
                            option="--n-test")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def images(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32)  # (n, 3, 32, 32)
        return x.div_(255.0).sub_(mean_t).div_(std_t)

    return Dataset(name="cifar10", x_train=images(x_tr), y_train=torch.from_numpy(y_tr),
                   x_test=images(x_te), y_test=torch.from_numpy(np.ascontiguousarray(y_te)), num_outputs=10)


# --- synthetic problems with known structure ----------------------------------------------------------
def linreg_w_star(*, dim: int, seed: int = 0) -> np.ndarray:
    """The true weights of ``synthetic-linreg`` for (dim, seed): w* ~ N(0, I_d / d), so ‖w*‖ ≈ 1."""
    return _rng(seed, _STREAM_W_STAR).standard_normal(dim) / np.sqrt(dim)  # (dim,)


def make_synthetic_linreg(*, n_train: int = 2000, n_test: int = 1000, dim: int = 20, noise: float = 0.0,
                          seed: int = 0) -> Dataset:
    """Isotropic least squares: x ~ N(0, I_d), y = x·w* + noise·ε, ε ~ N(0, 1), w* from :func:`linreg_w_star`.

    Why it is here: its gradient diversity is known in closed form. With per-example loss
    fᵢ(w) = ½(xᵢ·w − yᵢ)² and v = w − w*, population M2 = E‖∇fᵢ‖² = (d + 2)‖v‖² + noise²·d and
    ∇F = v, so the batch-size bound is B_S(w) = M2/‖∇F‖² = d + 2 + noise²·d/‖v‖²; at ``noise=0`` it is
    d + 2 at every w, the "B_S = d" worked example of Yin et al. 2018.
    Targets are float32 of shape (n, 1). Every array has its own stream from ``seed``, so a larger
    ``n_train`` extends the training set (same first rows) and ``n_test`` never changes it.
    """
    w_star = linreg_w_star(dim=dim, seed=seed)

    def draw(n: int, x_stream: int, e_stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = _rng(seed, x_stream).standard_normal((n, dim))  # (n, dim)
        y = x @ w_star + noise * _rng(seed, e_stream).standard_normal(n)  # (n,)
        return (torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32)).unsqueeze(1))

    x_tr, y_tr = draw(n_train, _STREAM_X_TRAIN, _STREAM_E_TRAIN)
    x_te, y_te = draw(n_test, _STREAM_X_TEST, _STREAM_E_TEST)
    return Dataset(name="synthetic-linreg", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                   num_outputs=1, task="regression")


LOGREG_SIGNAL = 3.0  # standard deviation of each true logit: labels mostly, not perfectly, predictable


def logreg_w_star(*, dim: int, num_classes: int = 2, seed: int = 0) -> np.ndarray:
    """The true weights of ``synthetic-logreg``: entries N(0, (3/√d)²), so each logit x·W*[:, k] ~ N(0, 9)."""
    return _rng(seed, _STREAM_W_STAR).standard_normal((dim, num_classes)) * (LOGREG_SIGNAL / np.sqrt(dim))


def make_synthetic_logreg(*, n_train: int = 2000, n_test: int = 1000, dim: int = 20, num_classes: int = 2,
                          noise: float = 1.0, seed: int = 0) -> Dataset:
    """Multinomial logistic data: x ~ N(0, I_d), label ~ softmax(x W* / noise), W* = :func:`logreg_w_star`.

    ``noise`` is the softmax temperature: 1 samples from the true logistic model, larger values flatten it
    towards uniform labels, and 0 gives noiseless labels argmax(x W*) (a separable problem, so the
    minimiser is at infinity). Labels are int64 class indices; streams as in :func:`make_synthetic_linreg`.
    """
    w_star = logreg_w_star(dim=dim, num_classes=num_classes, seed=seed)  # (dim, K)

    def draw(n: int, x_stream: int, u_stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = _rng(seed, x_stream).standard_normal((n, dim))  # (n, dim)
        logits = x @ w_star  # (n, K)
        if noise == 0:
            y = logits.argmax(axis=1)
        else:
            z = logits / noise
            p = np.exp(z - z.max(axis=1, keepdims=True))
            cdf = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)  # (n, K)
            u = _rng(seed, u_stream).random(n)[:, None]  # (n, 1); inverse-CDF sampling, one uniform per row
            y = np.minimum((u > cdf).sum(axis=1), num_classes - 1)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    x_tr, y_tr = draw(n_train, _STREAM_X_TRAIN, _STREAM_E_TRAIN)
    x_te, y_te = draw(n_test, _STREAM_X_TEST, _STREAM_E_TEST)
    return Dataset(name="synthetic-logreg", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                   num_outputs=num_classes)


# --- replication (lowers gradient diversity on purpose) ------------------------------------------------
def replicate_training_set(ds: Dataset, r: float, seed: int = 0) -> Dataset:
    """Keep round(n / r) distinct training examples (a seeded choice) and repeat them back up to n.

    This is how the diversity experiments of Yin et al. 2018 lower Δ without changing n:
    every kept example appears ⌊r⌋ or ⌈r⌉ times, in a seeded random order. ``r = 1`` returns ``ds``
    unchanged; ``r`` may be fractional (1.5). The test set is untouched.
    """
    n = ds.n_train
    if not ds.in_memory and r != 1:
        raise DataError("--replicate works on data sets held as tensors; this one is read by index (a map-style "
                        "Dataset): leave --replicate out, or return tensors (x, y) from the data function")
    if not r >= 1:
        raise DataError(f"replicate must be >= 1 (1 keeps the training set as it is), got {r}; "
                        f"pass --replicate 2, say")
    if r > n:
        raise DataError(f"replicate={r:g} exceeds the {n} training examples; pass --replicate {n} or less")
    if r == 1:
        return ds
    n_distinct = max(1, int(round(n / r)))
    rng = _rng(seed, _STREAM_REPLICATE)
    kept = rng.choice(n, size=n_distinct, replace=False)  # (n_distinct,)
    order = rng.permutation(n)  # (n,) interleave the copies rather than laying them out block by block
    index = torch.from_numpy(kept[np.arange(n) % n_distinct][order])  # (n,)
    return dataclasses.replace(ds, name=f"{ds.name}-replicate{r:g}", x_train=ds.x_train[index],
                               y_train=ds.y_train[index])


# --- by spec --------------------------------------------------------------------------------------------
DATASET_NAMES = ("mnist1d", "digits", "idx:PATH", "cifar10:PATH", "synthetic-linreg", "synthetic-logreg")
_SYNTHETIC = ("synthetic-linreg", "synthetic-logreg")


def _check_positive(option: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
        raise DataError(f"{option} must be a positive integer, got {value!r}; pass {option} 1000, say")


def load_dataset(spec: str, *, n_train: int | None = None, seed: int | None = None, n_test: int | None = None,
                 dim: int | None = None, noise: float | None = None, num_classes: int | None = None,
                 replicate: float = 1.0) -> Dataset:
    """Load a data set from its command-line spec.

    Args:
        spec: one of :data:`DATASET_NAMES`: ``mnist1d``, ``digits``, ``idx:DIR`` (MNIST / Fashion-MNIST
            IDX files), ``cifar10:DIR`` (CIFAR-10 binary release), ``synthetic-linreg``, ``synthetic-logreg``.
        n_train, n_test: examples to generate (mnist1d: 20000 / 4000, synthetic: 2000 / 1000), or a seeded
            random subset of a fixed set (digits, idx, cifar10: all of it when None).
        seed: the *data* seed (split, subsets, synthetic draws, replication); keep it apart from the
            training seed. None means each set's canonical one: 42 for mnist1d (the package's default, the
            one its published accuracies use), 0 for the others.
        dim: input dimension of the synthetic sets (default 20).
        noise: synthetic-linreg's label-noise standard deviation (default 0); synthetic-logreg's softmax
            temperature (default 1, 0 = noiseless argmax labels).
        num_classes: synthetic-logreg's number of classes (default 2).
        replicate: r >= 1; keep n/r distinct training examples and repeat them to n
            (:func:`replicate_training_set`); 1 keeps the set as it is.

    Returns:
        The :class:`Dataset`. Raises :class:`DataError` with the problem and its fix on bad input.
    """
    if seed is not None and (int(seed) != seed or seed < 0):
        raise DataError(f"the data seed must be an integer >= 0, got {seed!r}")
    _check_positive("--n-train", n_train)
    _check_positive("--n-test", n_test)
    _check_positive("--dim", dim)
    if num_classes is not None and (int(num_classes) != num_classes or num_classes < 2):
        raise DataError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if noise is not None and not (noise >= 0 and np.isfinite(noise)):
        raise DataError(f"--noise must be a finite number >= 0, got {noise!r}")
    if not (replicate >= 1 and np.isfinite(replicate)):
        raise DataError(f"--replicate must be >= 1 (1 keeps the training set as it is), got {replicate!r}; "
                        f"pass --replicate 2, say")
    name, _, path = spec.partition(":")
    if name not in ("idx", "cifar10") and (path or name not in DATASET_NAMES):
        hint = " (only idx and cifar10 take a :PATH)" if path and name in DATASET_NAMES else ""
        # a user's own data file given without its function is the likely slip: show the form it needs
        own = f"{spec}:make_data" if spec.endswith(".py") else "mypkg.data:make_data"
        raise DataError(f"unknown data set {spec!r}{hint}; choose one of {', '.join(DATASET_NAMES)}, or your own "
                        f"as MODULE:FUNCTION, e.g. {own}")
    allowed = {"synthetic-linreg": ("--dim", "--noise"),
               "synthetic-logreg": ("--dim", "--noise", "num_classes")}.get(name, ())
    given = [option for option, value in (("--dim", dim), ("--noise", noise), ("num_classes", num_classes))
             if value is not None and option not in allowed]
    if given:
        raise DataError(f"{', '.join(given)} does not apply to data set {name!r}; leave it out "
                        f"(--dim and --noise are for {' and '.join(_SYNTHETIC)}, num_classes for synthetic-logreg)")
    data_seed = 0 if seed is None else int(seed)

    if name == "mnist1d":
        ds = load_mnist1d(n_train=n_train or 20000, n_test=n_test or 4000, seed=42 if seed is None else int(seed))
    elif name == "digits":
        ds = load_digits(n_train=n_train, n_test=n_test, seed=data_seed)
    elif name in ("idx", "cifar10"):
        if not path:
            example = "/data/mnist" if name == "idx" else "/data/cifar-10-batches-bin"
            raise DataError(f"{name} needs a directory: pass {name}:DIR, e.g. {name}:{example}")
        loader = load_idx if name == "idx" else load_cifar10
        ds = loader(path, n_train=n_train, n_test=n_test, seed=data_seed)
    elif name == "synthetic-linreg":
        ds = make_synthetic_linreg(n_train=n_train or 2000, n_test=n_test or 1000, dim=dim or 20,
                                   noise=0.0 if noise is None else float(noise), seed=data_seed)
    else:
        assert name == "synthetic-logreg", name
        ds = make_synthetic_logreg(n_train=n_train or 2000, n_test=n_test or 1000, dim=dim or 20,
                                   num_classes=num_classes or 2, noise=1.0 if noise is None else float(noise),
                                   seed=data_seed)
    for x, split in ((ds.x_train, "training"), (ds.x_test, "test")):
        check_finite(x, what=f"data set {spec!r}, {split} set", fix="check or regenerate its files")
    return replicate_training_set(ds, replicate, seed=data_seed)


def load_data(cfg: RunConfig) -> Dataset:
    """The data set a run's config names (its spec, sizes, data seed, replication), checked against the
    config's batch sizes (:func:`scalesgd.config.check_against_data`).

    Raises:
        DataError: bad data options or files; ConfigError: a batch the data set cannot fill.
    """
    # Imported here: config validates names from models/comm/policies, and must stay importable without data.
    from scalesgd.config import check_against_data
    from scalesgd.user_code import OBJECT_PREFIX, is_import_string

    if cfg.dataset.startswith(OBJECT_PREFIX):
        raise DataError(f"the run's data were Python objects ({cfg.dataset}) handed to scalesgd.fit; they cannot be "
                        "reloaded from the run directory. Give fit an import string (MODULE:FUNCTION) instead")
    if is_import_string(cfg.dataset):
        ds = load_user_dataset(cfg.dataset)
        if cfg.replicate != 1:
            ds = replicate_training_set(ds, cfg.replicate, seed=0 if cfg.data_seed is None else cfg.data_seed)
    else:
        ds = load_dataset(cfg.dataset, replicate=cfg.replicate, n_train=cfg.n_train, seed=cfg.data_seed,
                          dim=cfg.dim, noise=cfg.noise)
    check_against_data(cfg, ds.n_train)
    return ds


def load_user_dataset(spec: str) -> Dataset:
    """The data set a ``MODULE:FUNCTION`` import string names: the function is called with no arguments and
    returns ``(train, test)`` (:func:`scalesgd.data.user.from_user` says what each may be).

    Raises:
        ConfigError: the module or function cannot be found; DataError: it returned something else.
    """
    from scalesgd.data.user import from_user
    from scalesgd.user_code import resolve

    from scalesgd.user_code import call_with_accepted

    out = call_with_accepted(resolve(spec, option="--dataset"), what=f"--dataset {spec}")
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        got = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, (tuple, list)) else "")
        raise DataError(f"--dataset {spec} returned {got}; it must return (train, test), each a tuple of tensors "
                        "(x, y) or a map-style torch.utils.data.Dataset")
    return from_user(out[0], out[1], name=spec)
