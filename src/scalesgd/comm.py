"""Communication strategies: how the workers' gradient buffers become their sum.

Every strategy has one signature, like PyTorch DDP's comm hooks: it takes the rank's flat float buffer
(the local gradient contributions followed by a short tail of exact statistics such as the local loss sum)
and replaces it, in place, with the sum over all ranks. Lossy codecs (quantization) may compress only the
gradient part; the last ``exact_tail`` elements are always reduced exactly, so loss, accuracy and
diversity statistics are never distorted by a codec.

Strategies are picked by name from :data:`COMM_STRATEGIES` through :func:`make_comm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from scalesgd.errors import ConfigError


@dataclass(frozen=True)
class CommStats:
    """What one call moved: bytes this rank sent on the wire (payload, excluding protocol overhead)."""

    bytes_sent: int


class CommStrategy(Protocol):
    """``allreduce_(buffer, exact_tail)``: sum ``buffer`` over all ranks, in place.

    Args:
        buffer: 1-D contiguous float tensor, identical length on every rank.
        exact_tail: number of trailing elements that must be reduced exactly (statistics); a lossy codec
            compresses at most ``buffer[:len(buffer) - exact_tail]``.
    Returns:
        :class:`CommStats` for this rank.
    After the call every rank holds bit-identical contents.
    """

    name: str

    def allreduce_(self, buffer: torch.Tensor, exact_tail: int = 0) -> CommStats: ...


class BuiltinAllReduce:
    """The engine's own all-reduce (gloo on CPU, NCCL on GPU): ``dist.all_reduce(buffer, SUM)``."""

    name = "allreduce"

    def __init__(self, *, world_size: int, rank: int, group=None):
        self.world_size = world_size
        self.rank = rank
        self.group = group

    def allreduce_(self, buffer: torch.Tensor, exact_tail: int = 0) -> CommStats:
        if self.world_size > 1:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        # A ring all-reduce sends 2(P-1)/P of the buffer from each rank.
        sent = 2 * (self.world_size - 1) * buffer.numel() * buffer.element_size() // max(self.world_size, 1)
        return CommStats(bytes_sent=sent)


# name -> constructor(world_size=, rank=, generator=, **options). Other modules add their strategies here.
COMM_STRATEGIES: dict[str, Callable[..., CommStrategy]] = {
    "allreduce": lambda *, world_size, rank, generator=None, **options: BuiltinAllReduce(
        world_size=world_size, rank=rank),
}


def make_comm(name: str, *, world_size: int, rank: int, generator: torch.Generator | None = None,
              **options) -> CommStrategy:
    """Build the communication strategy ``name`` for this rank.

    Args:
        name: a key of :data:`COMM_STRATEGIES`.
        world_size, rank: this process's place in the default process group.
        generator: randomness for stochastic codecs, seeded from (seed, rank) by the caller.
        options: strategy-specific settings (e.g. ``levels`` for ``qsgd``).
    """
    if name not in COMM_STRATEGIES:
        raise ConfigError(f"unknown communication strategy {name!r}; choose one of "
                          f"{', '.join(sorted(COMM_STRATEGIES))}")
    return COMM_STRATEGIES[name](world_size=world_size, rank=rank, generator=generator, **options)
