"""Backup workers: each step uses the first P − b gradients to reach rank 0 and drops the rest.

Chen, Pan, Monga, Bengio, Jozefowicz, "Revisiting distributed synchronous SGD" (arXiv 1604.00981). Every
rank posts its buffer (gradient contribution Σ_{i∈shard} ∇ℓᵢ/B and the statistics tail) to rank 0 over the
parameter-server path, tagged with the round; rank 0 counts its own buffer as arrived when it calls, polls the
others' receives for arrival order, sums the first P − b, rescales the gradient part by P/(P − b) (so that the
update is unbiased for equal shards: a uniformly chosen P − b of P contributions, times P/(P − b), has the
full sum as its mean) and sends the result to every rank, which applies it: the replicas stay identical.
The tail is summed, not rescaled, so the step's loss is the mean over the examples used.

A late rank does not hold the step up: its buffer lands in a receive rank 0 no longer waits for (kept
pending, dropped on arrival), and if the result of its next round is already there when it starts that
round (:meth:`BackupWorkers.result_ready`), the trainer skips its compute (an empty shard) so it catches up
instead of falling further behind.

Rank 0 is the coordinator and its own gradient is always among those used; a slow rank 0 is not mitigated.
"""

from __future__ import annotations

import queue
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from scalesgd.comm_protocol import CommStats, Option, Transport
from scalesgd.distributed import World
from scalesgd.errors import ConfigError, DistributedError

class _Watched:
    """A point-to-point operation waited for on a thread of its own: gloo marks a request complete only in
    ``wait()``, so arrival order is learnt from these threads, which set ``done`` (and put ``key`` on
    ``arrivals``) as each completes. ``what``: the user of the transfer, named in its error
    (:mod:`scalesgd.async_sgd` uses these too)."""

    def __init__(self, work: dist.Work, tensor: torch.Tensor, timeout: timedelta, key: int | None = None,
                 arrivals: queue.SimpleQueue | None = None, what: str = "backup workers"):
        self.work, self.tensor, self.done, self.what = work, tensor, threading.Event(), what
        self.error: BaseException | None = None

        def wait() -> None:
            try:
                work.wait(timeout)
            except BaseException as e:  # kept and re-raised by the caller's join(): a thread cannot raise
                self.error = e
            self.done.set()
            if arrivals is not None:
                arrivals.put(key)

        self.thread = threading.Thread(target=wait, daemon=True)
        self.thread.start()

    def join(self) -> torch.Tensor:
        self.thread.join()
        if self.error is not None:
            raise DistributedError(f"{self.what}: a point-to-point transfer failed ({self.error}); a peer "
                                   "has died or --timeout-s is too short") from self.error
        return self.tensor


class BackupWorkers(Transport):
    """The parameter-server path with ``backups`` = b backup workers (see the module docstring).

    Args:
        world: this process's place in the default group.
        backups: b, the gradients dropped per step (0 <= b < P).
        timeout_s: how long :meth:`close` waits for messages still in flight.
    Raises:
        ConfigError: b outside [0, P).
    """

    name = "backup"
    exact = False
    devices = ("cpu",)
    cost_model = "star"
    options = {"backups": Option(int, 1, "gradients dropped per step (the slowest b)"),
               "timeout_s": Option(float, 600.0, "seconds close() waits for messages in flight")}

    def __init__(self, world: World, *, backups: int = 1, timeout_s: float = 600.0):
        if not 0 <= backups < world.size:
            raise ConfigError(f"--backup-workers must lie in [0, {world.size}) for {world.size} workers, got "
                              f"{backups}; each step needs at least one gradient")
        self.world_size, self.rank, self.backups = world.size, world.rank, backups
        self.timeout = timedelta(seconds=timeout_s)
        self.round = 0
        self.used_ranks: list[int] = []  # rank 0: the ranks whose gradients the last round used, arrival order
        self._pending: list[_Watched] = []  # sends, and rank 0's receives of late buffers
        self._result: _Watched | None = None  # a worker's posted receive of the next round's result
        self._like: torch.Tensor | None = None  # the last buffer (shape and dtype of close()'s dummy)

    def result_ready(self) -> bool:
        """Whether the result of the coming round has already arrived (this rank is late: skip its compute)."""
        return self._result is not None and self._result.done.is_set()

    def _post_result_receive(self, like: torch.Tensor, tag: int) -> None:
        buf = torch.empty_like(like)
        self._result = _Watched(dist.irecv(buf, src=0, tag=tag), buf, self.timeout)

    def _send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self._pending.append(_Watched(dist.isend(tensor, dst=dst, tag=tag), tensor, self.timeout))

    def _reap(self) -> None:
        done = [w for w in self._pending if w.done.is_set()]
        for w in done:
            w.join()  # raises a failed transfer's error here
        self._pending = [w for w in self._pending if not w.done.is_set()]

    def _allreduce_flat_(self, buffer: torch.Tensor, exact_tail: int) -> CommStats:
        P, n = self.world_size, buffer.numel()
        if P == 1:
            return CommStats(bytes_sent=0)
        nbytes = n * buffer.element_size()
        tag = self.round
        self.round += 1
        self._like = buffer
        self._reap()
        if self.rank != 0:
            if self._result is None:  # the first round: no receive posted yet
                self._post_result_receive(buffer, tag)
            self._send(buffer.clone(), 0, tag)  # a copy: rank 0 may not have posted this round's receive yet
            buffer.copy_(self._result.join())
            self._post_result_receive(buffer, self.round)  # the next round's, so a late rank can see it is late
            return CommStats(bytes_sent=nbytes)
        arrivals: queue.SimpleQueue = queue.SimpleQueue()
        recvs = {}
        for r in range(1, P):
            t = torch.empty_like(buffer)
            recvs[r] = _Watched(dist.irecv(t, src=r, tag=tag), t, self.timeout, key=r, arrivals=arrivals)
        arrived = [0]  # rank 0's own buffer is here already
        while len(arrived) < P - self.backups:
            arrived.append(arrivals.get())
        for r in arrived[1:]:
            buffer.add_(recvs.pop(r).join())
        self._pending.extend(recvs.values())  # late buffers: received whenever they come, then dropped
        grad = buffer[: n - exact_tail]
        grad.mul_(P / len(arrived))
        self.used_ranks = arrived
        for r in range(1, P):
            self._send(buffer.clone(), r, tag)
        return CommStats(bytes_sent=(P - 1) * nbytes)

    def close(self) -> None:
        """Answer each worker's posted receive of a next result (with a dummy), then wait for what is in flight."""
        if self.world_size == 1:
            return
        if self.rank == 0 and self.round > 0:
            for r in range(1, self.world_size):
                self._send(torch.zeros_like(self._like), r, self.round)
        pending, result = self._pending, self._result
        self._pending, self._result = [], None
        for w in pending:
            w.join()
        if result is not None:
            result.join()
