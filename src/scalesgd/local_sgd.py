"""Local SGD and post-local SGD: H local steps on each worker's own shard, then one parameter average.

Stich, "Local SGD converges fast and communicates little" (arXiv 1805.09767); Lin, Stich, Patel, Jaggi,
"Don't use large mini-batches, use local SGD" (post-local SGD, arXiv 1808.07217). The schedule is PyTorch's
``PeriodicModelAverager(period=H, warmup_steps=W)``: after the optimizer step of index s (0-based) the
parameters are averaged when s >= W and (s − W) mod H = 0, W being the first local step (the steps before W
are synchronous: gradients all-reduced every step). The average is ``w ← Σ_p (w_p / P)``, divided before the
sum as PyTorch's ``average_parameters`` does, through the run's (exact) communication strategy.

Momentum buffers are *not* averaged: each worker keeps its own, as ``PeriodicModelAverager`` /
``PostLocalSGDOptimizer`` do, and as post-local SGD prescribes; averaging them would double the traffic of
every average, and with H = 1 it is unnecessary: the buffers are linear in the gradients, so the mean of
the local buffers follows exactly the synchronous buffer and the averaged parameters equal synchronous SGD's
(to round-off, when the P shards are of equal size so that the mean of local mean gradients is the global
mean gradient).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from scalesgd.comm_protocol import CommStats, CommStrategy


class NoComm:
    """The communication of a local step: none. ``allreduce_`` leaves the buffer as it is (this rank's own
    contribution is its "sum"), so :func:`scalesgd.step.train_step` runs unchanged on the local gradient."""

    name = "none"
    exact = True
    devices = ("cpu", "cuda")
    options: dict = {}

    def allreduce_(self, buffer: torch.Tensor, exact_tail: int = 0) -> CommStats:
        return CommStats(bytes_sent=0)

    def close(self) -> None:
        """Nothing to release."""


NO_COMM = NoComm()


def averaging_due(step_index: int, local_start: int | None, sync_every: int) -> bool:
    """Whether the parameters are averaged after the optimizer step of index ``step_index`` (0-based):
    ``step_index >= W`` and ``(step_index − W) mod H == 0`` with W = ``local_start`` (PyTorch's
    ``PeriodicModelAverager`` rule); never before local SGD has started (``local_start`` None)."""
    return local_start is not None and step_index >= local_start and (step_index - local_start) % sync_every == 0


@torch.no_grad()
def average_parameters_(params: torch.Tensor, comm: CommStrategy, world_size: int) -> CommStats:
    """w ← mean over ranks of w, in place on the flat (N,) parameter vector: w/P, then the strategy's sum.

    Returns:
        the strategy's :class:`CommStats` (bytes this rank sent).
    """
    if world_size == 1:
        return CommStats(bytes_sent=0)
    params.div_(world_size)
    return comm.allreduce_(params)


@contextlib.contextmanager
def averaged_parameters(params: torch.Tensor, comm: CommStrategy, world_size: int, *,
                        needed: bool) -> Iterator[None]:
    """Within the block, ``params`` holds the average of the replicas; afterwards each rank's own again.

    What evaluation and the diversity measurement see between two averages (the model local SGD would
    deliver if it stopped here), without changing the training trajectory. A no-op when ``needed`` is False
    (the replicas are identical already). Collective: every rank must enter it with the same ``needed``.
    """
    if not needed or world_size == 1:
        yield
        return
    own = params.clone()
    average_parameters_(params, comm, world_size)
    try:
        yield
    finally:
        params.copy_(own)
