"""A user's data as a :class:`~scalesgd.data.datasets.Dataset`: tensors stay in memory, map-style sets are read
by index.

What a data function (or :func:`scalesgd.fit`) may give for each of train and test:

* a tuple of tensors ``(x, y)`` (or a ``TensorDataset`` of two tensors): kept in memory and indexed
  directly, the built-in sets' fast path;
* a map-style ``torch.utils.data.Dataset`` whose items are ``(input, target)`` pairs or dicts: read by index,
  only the examples of this rank's shard of each step, so a set larger than memory trains. Items are
  collated with torch's ``default_collate``. **Dict items**: the model gets the whole collated dict and the
  loss gets ``batch["target"]`` (so a dict item must have a ``"target"`` key).

An ``IterableDataset`` is refused: the trainer's batch order (:mod:`scalesgd.data.sharding`) must be
indexable, so that a batch size can change mid-epoch without repeating or skipping an example and every
rank can read exactly its shard.

Task and outputs: integer targets mean classification (``num_outputs`` = largest label + 1 for tensors;
for an indexed set its ``num_outputs`` attribute, else ``len(classes)``, else unknown), float targets
regression (``num_outputs`` = the target's size).
"""

from __future__ import annotations

import math
import multiprocessing
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, default_collate

from scalesgd.data.datasets import Dataset
from scalesgd.errors import DataError

TARGET_KEY = "target"  # the key of a dict example (and batch) that holds the target


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """(model input, target) of a collated batch: a dict gives (the dict, its ``"target"``), a pair gives its
    two parts.

    Raises:
        DataError: a dict without ``"target"``, or a batch that is neither.
    """
    if isinstance(batch, dict):
        if TARGET_KEY not in batch:
            raise DataError(f"dict examples need a {TARGET_KEY!r} key (the loss's target; the model gets the "
                            f"whole dict); got keys {sorted(batch)}")
        return batch, batch[TARGET_KEY]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise DataError(f"examples must be (input, target) pairs or dicts with a {TARGET_KEY!r} key; got a "
                    f"{type(batch).__name__}{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` on ``device``: tensors moved, dicts/tuples of them moved element-wise, anything else as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def read_batch(dataset: Any, indices: torch.Tensor | Sequence[int]) -> tuple[Any, torch.Tensor]:
    """Read ``dataset[i]`` for each index, in order, and collate (torch's ``default_collate``)."""
    items = [dataset[int(i)] for i in indices]
    if not items:
        raise DataError("read_batch: no indices")
    return split_batch(default_collate(items))


def concat_batches(parts: Sequence[Any]) -> Any:
    """Concatenate collated batches along the batch axis (tensors, dicts and tuples of them, nested)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts))
    if isinstance(first, dict):
        return {k: concat_batches([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([p[i] for p in parts]) for i in range(len(first)))
    raise DataError(f"cannot concatenate batches of {type(first).__name__}; collate to tensors")


def _is_integer(t: Any) -> bool:
    if isinstance(t, torch.Tensor):
        return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
    return isinstance(t, int) and not isinstance(t, bool)


def _check_set(obj: Any, what: str) -> None:
    if isinstance(obj, IterableDataset):
        raise DataError(f"{what} is an IterableDataset; give a map-style Dataset (with __getitem__ and __len__): "
                        "the trainer chooses each step's examples by index, so that the batch size can change "
                        "mid-epoch without repeating or skipping examples and each rank reads only its shard")
    if not (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        raise DataError(f"{what} is a {type(obj).__name__}; give a tuple of tensors (x, y) or a map-style "
                        "torch.utils.data.Dataset of (input, target) pairs")
    if len(obj) == 0:
        raise DataError(f"{what} is empty")


def _as_tensors(obj: Any, what: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x, y) when ``obj`` is a pair of tensors or a TensorDataset of two; None for other Datasets."""
    if isinstance(obj, TensorDataset):
        obj = obj.tensors
    if isinstance(obj, (tuple, list)):
        if len(obj) != 2 or not all(isinstance(t, torch.Tensor) for t in obj):
            raise DataError(f"{what} is a {type(obj).__name__} of {len(obj)}; a tuple must hold two tensors (x, y)")
        x, y = obj
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{what}: {x.shape[0]} inputs but {y.shape[0]} targets; x and y need the same first axis")
        if x.shape[0] == 0:
            raise DataError(f"{what} is empty")
        return x, y
    return None


def from_user(train: Any, test: Any, *, name: str) -> Dataset:
    """The :class:`Dataset` of a user's ``(train, test)``: tensors in memory, map-style sets by index.

    Args:
        train, test: each a tuple of tensors ``(x, y)``, a ``TensorDataset`` of two, or a map-style Dataset.
        name: the data set's name in the run (its import string, or ``object:…``).
    Raises:
        DataError: an IterableDataset, an empty set, mismatched lengths, or a type that is neither.
    """
    train_t, test_t = _as_tensors(train, "the training set"), _as_tensors(test, "the test set")
    if (train_t is None) != (test_t is None):
        # Mixed kinds: read both by index (tensors index fine as a TensorDataset).
        train = TensorDataset(*train_t) if train_t is not None else train
        test = TensorDataset(*test_t) if test_t is not None else test
        train_t = test_t = None
    if train_t is not None:
        x_tr, y_tr = train_t
        x_te, y_te = test_t
        classification = _is_integer(y_tr)
        if classification:
            y_tr, y_te = y_tr.long(), y_te.long()
            num_outputs = int(max(int(y_tr.max()), int(y_te.max()))) + 1
        else:
            num_outputs = int(math.prod(y_tr.shape[1:])) if y_tr.ndim > 1 else 1
        return Dataset(name=name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_outputs=num_outputs,
                       task="classification" if classification else "regression")
    _check_set(train, "the training set")
    _check_set(test, "the test set")
    x0, y0 = split_batch(default_collate([train[0]]))
    classification = _is_integer(y0)
    num_outputs = getattr(train, "num_outputs", None)
    if num_outputs is None and hasattr(train, "classes"):
        num_outputs = len(train.classes)
    if num_outputs is None and classification and hasattr(train, "targets"):  # torchvision's convention
        num_outputs = int(torch.as_tensor(train.targets).max()) + 1
    if num_outputs is None and not classification:
        num_outputs = int(math.prod(y0.shape[1:])) if y0.ndim > 1 else 1
    shape = tuple(x0.shape[1:]) if isinstance(x0, torch.Tensor) else None
    return Dataset(name=name, x_train=None, y_train=None, x_test=None, y_test=None, num_outputs=num_outputs,
                   task="classification" if classification else "regression", train_set=train, test_set=test,
                   example_shape=shape)


class _StepChunks:
    """A batch sampler whose every pass yields the current step's shard indices, cut into contiguous chunks
    in order (one per loader worker), so the workers read one step's examples in parallel."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


def _collate_pairs(items: list[Any]) -> Any:
    return default_collate(items)


class ShardReader:
    """Reads each step's shard of an indexed set, in the shard's order, in this process or through
    ``loader_workers`` DataLoader worker processes (persistent across steps).

    With workers, the step's indices are cut into ``loader_workers`` contiguous chunks, each read and collated
    by one worker, and the chunks are concatenated in order, so the batch is the same as read here.
    """

    def __init__(self, dataset: Dataset, loader_workers: int = 0):
        self.dataset = dataset
        self.loader: DataLoader | None = None
        if loader_workers > 0 and not dataset.in_memory:
            self.sampler = _StepChunks()
            self.workers = loader_workers
            # Forked, not spawned: a data set class from a .py file loaded by path (--dataset file.py:f) cannot be
            # re-imported by name in a fresh process; a forked loader worker inherits it.
            context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            self.loader = DataLoader(dataset.train_set, batch_sampler=self.sampler, num_workers=loader_workers,
                                     collate_fn=_collate_pairs, persistent_workers=True,
                                     multiprocessing_context=context)

    def read(self, indices: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """(inputs, targets) of the training examples ``indices`` (B,), B ≥ 1."""
        if self.loader is None:
            return self.dataset.train_batch(indices)
        self.sampler.chunks = [c.tolist() for c in torch.tensor_split(indices, min(self.workers, len(indices)))
                               if c.numel() > 0]
        return split_batch(concat_batches(list(self.loader)))

    def close(self) -> None:
        """Let go of the loader: its persistent workers are shut down as its iterator is collected."""
        self.loader = None
