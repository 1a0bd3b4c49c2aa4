"""What every communication strategy is: the protocol, its self-description, and the input contract.

A strategy takes a rank's buffer (the local gradient contributions followed by a short tail of exact
statistics such as the local loss sum) and replaces it, in place, with the sum over all ranks, like PyTorch
DDP's comm hooks. Each strategy class says what it is through class attributes: ``name``, ``exact`` (False
for a lossy codec), ``devices`` (the device types whose tensors it moves) and ``options`` (the keyword
arguments it takes, as :class:`Option`). ``close()`` releases what the strategy holds (sockets, process
groups); the trainer calls it at the end of a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from scalesgd.errors import ConfigError


@dataclass(frozen=True)
class CommStats:
    """What one call moved: bytes this rank sent on the wire (payload, excluding protocol overhead)."""

    bytes_sent: int


@dataclass(frozen=True)
class Option:
    """One keyword option of a strategy: its type, its default and what it does."""

    type: type
    default: Any
    help: str


class CommStrategy(Protocol):
    """``allreduce_(buffer, exact_tail)``: sum ``buffer`` over all ranks, in place.

    Args:
        buffer: a tensor of identical shape and dtype on every rank, any layout (strided views included).
        exact_tail: number of trailing elements (of the flattened buffer) that must be reduced exactly
            (statistics); a lossy codec compresses at most the elements before them.
    Returns:
        :class:`CommStats` for this rank.
    Raises:
        ConfigError: a dtype or device the strategy does not move (one line saying what to use instead).
    After the call every rank holds bit-identical contents.
    """

    name: str
    exact: bool
    devices: tuple[str, ...]
    options: dict[str, Option]

    def allreduce_(self, buffer: torch.Tensor, exact_tail: int = 0) -> CommStats: ...

    def close(self) -> None: ...


class Transport:
    """Base of the strategies: the input contract, then :meth:`_allreduce_flat_` on a flat contiguous buffer.

    Any layout is accepted: a non-contiguous buffer is reduced in a contiguous copy that is written back
    (the engine's collectives and our byte views both need contiguous memory). Subclasses set the class
    attributes below and implement :meth:`_allreduce_flat_`.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    options: ClassVar[dict[str, Option]] = {}
    # The α–β cost formula that describes the strategy: "ring" (2(P−1)α + 2(P−1)/P·N·β), "star" (rank 0
    # moves (P−1)·N each way), "all-gather" ((P−1) payloads per rank).
    cost_model: ClassVar[str] = "ring"
    # Small messages go by recursive doubling (P a power of two) up to the option ``small_bytes`` at P = 2.
    recursive_doubling: ClassVar[bool] = False
    world_size: int = 1

    def allreduce_(self, buffer: torch.Tensor, exact_tail: int = 0) -> CommStats:
        check_tail(buffer.numel(), exact_tail)
        self.check_input(buffer)
        if buffer.is_contiguous():
            return self._allreduce_flat_(buffer.view(-1), exact_tail)
        flat = buffer.contiguous().view(-1)
        stats = self._allreduce_flat_(flat, exact_tail)
        buffer.copy_(flat.view(buffer.shape))
        return stats

    def error_variance(self, values: torch.Tensor) -> float:
        """E‖result − exact‖² this strategy adds to ``values``' contribution: 0 for an exact transport; a
        lossy codec says how much (:meth:`scalesgd.comm.Compressed.error_variance`)."""
        return 0.0

    def check_input(self, buffer: torch.Tensor) -> None:
        """Refuse a buffer this strategy cannot move, with one line saying what to do instead."""
        if buffer.device.type not in self.devices:
            raise ConfigError(f"--comm {self.name} moves {'/'.join(self.devices)} tensors, got one on "
                              f"{buffer.device.type}; on GPUs use --comm allreduce (NCCL) or --comm ring")
        if buffer.dtype.is_complex or buffer.dtype == torch.bool:
            raise ConfigError(f"--comm {self.name} sums real numbers, got a {buffer.dtype} buffer; convert it "
                              "to a real dtype first")

    def _allreduce_flat_(self, buffer: torch.Tensor, exact_tail: int) -> CommStats:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the strategy holds; a no-op unless a subclass holds something."""



class RingTransport(Transport):
    """A ring all-reduce that sends messages of at most ``doubling_max_bytes`` by recursive doubling
    (:func:`scalesgd.ring_schedule.doubling_max_bytes` sets it): the one dispatch both rings share, over
    whatever links a subclass has (torch.distributed point-to-point, our own sockets). Subclasses implement
    :meth:`_ring_` and :meth:`_recursive_doubling_` on a flat contiguous buffer."""

    doubling_max_bytes: int = 0

    def _allreduce_flat_(self, buffer: torch.Tensor, exact_tail: int) -> CommStats:
        n = buffer.numel()
        if self.world_size == 1 or n == 0:
            return CommStats(bytes_sent=0)
        if n * buffer.element_size() <= self.doubling_max_bytes:
            return self._recursive_doubling_(buffer)
        return self._ring_(buffer)

    def _ring_(self, buffer: torch.Tensor) -> CommStats:
        raise NotImplementedError

    def _recursive_doubling_(self, buffer: torch.Tensor) -> CommStats:
        raise NotImplementedError

def check_tail(numel: int, exact_tail: int) -> None:
    if not 0 <= exact_tail <= numel:
        raise ConfigError(f"exact_tail must lie in [0, {numel}] for a buffer of {numel} elements, "
                          f"got {exact_tail}")
