"""Deterministic global batches and their per-rank shards.

The order of examples depends only on the seed and the epoch, never on the number of workers: epoch e is
the permutation drawn from ``torch.Generator`` seeded with ``(seed, e)``, consumed front to back in global
batches of whatever size the batch policy asks for at that step. So a batch size may change mid-epoch
without repeating or skipping an example, and P = 1 and P = 4 see the same global batches.

Rank r of P takes the r-th of ``torch.tensor_split(batch, P)``: contiguous shards whose sizes differ by at
most one. The last batch of an epoch holds whatever is left (it may be smaller than asked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the n training examples in ``epoch`` (a function of seed and epoch only)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def shard(batch_indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous part of a global batch; sizes differ by at most one across ranks."""
    return torch.tensor_split(batch_indices, world_size)[rank]


@dataclass(frozen=True)
class Cursor:
    """Position in the stream of examples: epoch number and offset into that epoch's permutation."""

    epoch: int = 0
    offset: int = 0


@dataclass(frozen=True)
class GlobalBatch:
    indices: torch.Tensor  # (B,) global batch, same on every rank
    epoch: int
    epoch_end: bool  # this batch consumed the last example of its epoch


class BatchStream:
    """Cuts each epoch's permutation into global batches of the size asked for at each step.

    Pure apart from a cache of the current permutation: ``next(cursor, B)`` returns the batch and the
    advanced cursor.
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("BatchStream needs at least one example")
        self.n = n
        self.seed = seed
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm = epoch_permutation(self.n, self.seed, epoch)
            self._perm_epoch = epoch
        return self._perm

    def next(self, cursor: Cursor, global_batch_size: int) -> tuple[GlobalBatch, Cursor]:
        perm = self.permutation(cursor.epoch)
        end = min(cursor.offset + global_batch_size, self.n)
        batch = GlobalBatch(indices=perm[cursor.offset:end], epoch=cursor.epoch, epoch_end=end == self.n)
        nxt = Cursor(cursor.epoch + 1, 0) if end == self.n else Cursor(cursor.epoch, end)
        return batch, nxt
