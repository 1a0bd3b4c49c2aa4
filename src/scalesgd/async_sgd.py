"""The asynchronous baselines of synchronous SGD: a parameter server with stale gradients, and Hogwild.

``--algorithm async-ps`` (Dean et al., "Large scale distributed deep networks", NeurIPS 2012: Downpour SGD):
rank 0 holds the master copy of the parameters and the optimizer state (the *server*, a thread beside rank 0's
own worker). Every worker, rank 0's included, loops: compute the gradient of its batch on the parameters it
pulled last, push it tagged with their version, receive the parameters as they are after the server applied
it (the pull of the next step). The server applies each gradient the moment it arrives, whatever has
happened since it was computed; its *staleness* is

    τ = (server version when the gradient is applied) − (version the gradient was computed on),

the number of other updates applied in between. τ is logged for every update (``kind: "update"`` lines of
metrics.jsonl) and summarised in summary.json (mean, max, histogram). With P = 1, τ = 0 always and the run is
synchronous SGD's. Messages go over torch.distributed point-to-point calls as the ``ps`` strategy's do; the
server learns the arrival order as the backup workers do (:mod:`scalesgd.backup_comm`).

``--algorithm hogwild`` (Recht, Ré, Wright, Niu, arXiv 1106.5730; PyTorch's ``examples/mnist_hogwild``): the
P processes map one parameter vector in shared memory and each applies its updates to it in place, without a
lock; a process's forward pass may read parameters another is writing. Each keeps its own optimizer state (as
each process of PyTorch's example has its own optimizer). The staleness of an update is read from a shared
update counter, incremented without a lock as well, so it is approximate (two increments at once may count
once).

Both follow the synchronous trainer's rules, so the three differ only in how updates are made:

* data order: round k's global batch of B examples is the synchronous trainer's step k (same seed, same
  permutations); worker p computes on its contiguous part b_p of it (:func:`scalesgd.data.sharding.shard`),
  so every example is used exactly once per epoch, once over all workers.
* step size: an update from b_p examples uses the local mean gradient and the learning rate η·b_p/B, with η
  the rate the synchronous trainer uses at step k (rule, schedule and warm-up). A round's P updates then
  apply, without staleness and momentum, what one synchronous step applies. Momentum buffers advance once
  per update (the server's one; Hogwild's per process).
* evaluation: the workers meet where the synchronous trainer evaluates (``--eval-every`` or epoch ends), when
  an exact diversity measurement falls due (``--exact-diversity-every``, in rounds) and at the end; there
  they all hold the same parameters (async-ps: the server's, broadcast), so evaluation, the exact B_S and
  the time to target are measured as for synchronous SGD. The time spent meeting and evaluating is not
  training time.

Not supported (refused by :class:`scalesgd.config.RunConfig`): the online diversity estimators and what needs
them (they ride on an all-reduced gradient there is none of), batch-size policies, ``--lr auto``, local SGD,
backup workers, checkpoints and restarts, ``--example-qsgd-levels``; CPU and gloo only.
"""

from __future__ import annotations

import math
import os
import queue
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from scalesgd import distributed
from scalesgd.backup_comm import _Watched
from scalesgd.config import RunConfig
from scalesgd.data import Dataset
from scalesgd.data.sharding import BatchStream, Cursor, GlobalBatch, shard
from scalesgd.distributed import StopRequest, World
from scalesgd.errors import ConfigError, DistributedError, DivergedError, StoppedError
from scalesgd.local_sgd import NO_COMM
from scalesgd.lr_rules import LrConfig, lr_terms
from scalesgd.models import example_randomness
from scalesgd.run import (Shard, divergence_advice, finished, log_eval, log_exact_diversity, loop_inputs,
                          reached_target, run_summary, warm_up, watch_loss)
from scalesgd.step import FlatModel
from scalesgd.stragglers import parse_straggler, sample_delay
from scalesgd.train_state import TrainState
from scalesgd.transforms import GradientTransformation, Hyper, apply_updates_
from scalesgd.writer import RunWriter

# What a push carries after the gradient (float32 slots): the version it was computed on, its learning rate,
# its round (0-based step), the epoch at that round, and the loss sum, correct count and examples of its batch.
META = ("version", "lr", "step", "epoch", "loss_sum", "correct", "count")
N_META = len(META)
TAG = 7  # the point-to-point tag of pushes and replies


# --------------------------------------------------------------------------------------------------------
# The schedule both algorithms share


@dataclass(frozen=True)
class Round:
    """One round of a segment: the synchronous trainer's step ``step`` (0-based), its global batch, and the
    epoch (fractional) and examples consumed before it."""

    step: int
    batch: GlobalBatch
    epoch: float
    examples: int


def plan_segment(stream: BatchStream, cursor: Cursor, *, step: int, examples: int, global_batch_size: int,
                 steps: int | None, total_examples: int, eval_every: int | None,
                 diversity_every: int) -> tuple[list[Round], Cursor]:
    """The rounds up to the next meeting of the workers, and the cursor after them.

    A segment ends after the round that completes the budget, after the one where an evaluation falls due (every
    ``eval_every`` steps, else at an epoch's end) or an exact diversity measurement does (every
    ``diversity_every`` steps): the same steps at which the synchronous trainer evaluates and measures. Every
    rank computes the same plan (it depends on the seed and the counters only).
    """
    rounds: list[Round] = []
    n = stream.n
    while True:
        want = global_batch_size if steps else min(global_batch_size, total_examples - examples)
        batch, nxt = stream.next(cursor, want)
        rounds.append(Round(step=step, batch=batch, epoch=cursor.epoch + cursor.offset / n, examples=examples))
        step, examples, cursor = step + 1, examples + int(batch.indices.numel()), nxt
        done = step >= steps if steps else examples >= total_examples
        eval_due = (eval_every is not None and step % eval_every == 0) or (eval_every is None and batch.epoch_end)
        if done or eval_due or (diversity_every and step % diversity_every == 0):
            return rounds, cursor


@dataclass(frozen=True)
class LocalGradient:
    """What one worker measured on its batch: the loss sum, correct count and example count, and the compute
    time in seconds (including any injected straggler delay, ``injected_s``)."""

    loss_sum: float
    correct: float
    count: int
    compute_s: float
    injected_s: float


def local_gradient(flat: FlatModel, loss_fn: Callable, x: Any, y: torch.Tensor, *, seed: int, step: int,
                   first_row: int, global_rows: int, classification: bool,
                   delay: Callable[[float], float] | None = None) -> LocalGradient:
    """The mean gradient of this worker's batch, (1/b_p)·Σᵢ∇ℓᵢ, into ``flat.grad`` (N,), at the parameters the
    model holds now. Dropout masks are those of rows ``first_row …`` of the step's global batch, as in the
    synchronous trainer (:func:`scalesgd.models.example_randomness`). An empty batch leaves a zero gradient.
    ``delay``: the injected straggler delay (called with the measured compute time, seconds to sleep)."""
    t0 = time.perf_counter()
    flat.buffer.zero_()
    b = int(y.shape[0])
    loss_sum = correct = 0.0
    if b > 0:
        with example_randomness(flat.model, seed=seed, step=step, first_row=first_row, global_rows=global_rows):
            out = flat.model(x)
            loss = loss_fn(out, y)
            (loss * (1.0 / b)).backward()
        loss_sum = float(loss.detach())
        if classification:
            correct = float((out.detach().argmax(1) == y).sum())
    injected = delay(time.perf_counter() - t0) if delay is not None and b > 0 else 0.0
    if injected > 0:
        time.sleep(injected)
    return LocalGradient(loss_sum, correct, b, time.perf_counter() - t0, injected)


def staleness_summary(counts: Counter) -> dict[str, Any]:
    """``updates``, ``staleness_mean``, ``staleness_max`` and ``staleness_histogram`` ({τ: updates}) of the
    staleness counts."""
    updates = sum(counts.values())
    return {"updates": updates,
            "staleness_mean": sum(t * c for t, c in counts.items()) / updates if updates else None,
            "staleness_max": max(counts) if counts else None,
            "staleness_histogram": {str(t): counts[t] for t in sorted(counts)}}


# --------------------------------------------------------------------------------------------------------
# async-ps: the server


class ParameterServer:
    """Rank 0's master copy of the parameters, updated by each pushed gradient as it arrives.

    :meth:`serve` starts a thread that handles a given number of pushes from every rank and then ends (the
    workers meet after it); rank 0's own worker pushes through :meth:`exchange_local`, the others over
    point-to-point messages of (N + len(META)) float32 values, answered with the parameters and the version
    (N + 1). An update is w ← w − lr·d with d the transformation ``tx`` of the gradient (weight decay, momentum):
    the same arithmetic as a synchronous step.

    Args:
        params: (N,) the initial parameters (copied).
        tx: the gradient transformation; its state lives here.
        world: the job (rank 0 builds the server).
        timeout_s: how long the server waits for any push before it fails naming the silent ranks.
        log: called with each update's record (rank 0's metrics writer).
        start_s: the run's start (perf_counter), for the records' ``time_s``.
    """

    def __init__(self, params: torch.Tensor, tx: GradientTransformation, *, world: World, timeout_s: float,
                 log: Callable[[dict[str, Any]], None], start_s: float):
        self.params = params.detach().clone()
        self.tx, self.tx_state = tx, tx.init(self.params)
        self.version = 0
        self.staleness: Counter = Counter()
        self.world_size, self.timeout_s, self.log, self.start_s = world.size, timeout_s, log, start_s
        self._arrivals: queue.SimpleQueue = queue.SimpleQueue()
        self._local_in: tuple | None = None
        self._local_out: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        n = self.params.numel()
        self._inbox = {r: torch.empty(n + N_META) for r in range(1, world.size)}
        self._outbox = {r: torch.empty(n + 1) for r in range(1, world.size)}

    def apply(self, grad: torch.Tensor, meta: list[float], rank: int) -> None:
        """Apply one pushed gradient (N,) now; ``meta`` as :data:`META`. An empty batch (count 0) changes nothing."""
        version, lr, step, epoch, loss_sum, correct, count = meta
        if count <= 0:
            return
        tau = self.version - int(version)
        with torch.no_grad():
            direction, self.tx_state = self.tx.update(grad, self.tx_state, self.params,
                                                      Hyper(lr=lr, step=self.version))
            apply_updates_(self.params, direction, lr)
        self.version += 1
        self.staleness[tau] += 1
        self.log({"kind": "update", "step": int(step) + 1, "epoch": epoch, "version": self.version, "rank": rank,
                  "staleness": tau, "loss": loss_sum / count, "train_batch_accuracy": correct / count,
                  "local_batch_size": int(count), "lr": lr, "time_s": time.perf_counter() - self.start_s})

    def serve(self, pushes_per_rank: int) -> None:
        """Start handling ``pushes_per_rank`` pushes from every rank, in arrival order, on a thread."""
        self._error = None
        self._thread = threading.Thread(target=self._serve, args=(pushes_per_rank,), daemon=True)
        self._thread.start()

    def exchange_local(self, grad: torch.Tensor, meta: list[float], into: torch.Tensor) -> int:
        """Rank 0's worker: push ``grad`` (N,) with ``meta``; the server's parameters after it land in ``into``
        (N,). Returns their version."""
        self._local_in = (grad, meta, into)
        self._arrivals.put(0)
        while True:
            try:
                return self._local_out.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive():
                    self.join()  # raises the server's error
                    raise DistributedError("the parameter server stopped before answering rank 0's push")

    def join(self) -> None:
        """Wait until the pushes of this segment are applied (and their answers sent); re-raise a failure."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error

    def _serve(self, pushes: int) -> None:
        remaining = {r: pushes for r in range(1, self.world_size)}
        timeout = timedelta(seconds=self.timeout_s)
        receives: dict[int, _Watched] = {}
        sends: dict[int, _Watched] = {}

        def post(r: int) -> None:
            buf = self._inbox[r]
            receives[r] = _Watched(dist.irecv(buf, src=r, tag=TAG), buf, timeout, key=r, arrivals=self._arrivals,
                                   what="asynchronous SGD")

        try:
            for r in remaining:
                if pushes:
                    post(r)
            n, left = self.params.numel(), pushes * self.world_size
            while left:
                try:
                    r = self._arrivals.get(timeout=self.timeout_s)
                except queue.Empty:
                    silent = [q for q, k in remaining.items() if k] + ([0] if self._local_in is None else [])
                    raise DistributedError(f"the parameter server heard from no worker for {self.timeout_s:g} s "
                                           f"(waiting for ranks {silent}); they are stuck or gone (raise "
                                           "--timeout-s if they are only slow)") from None
                if r == 0:
                    grad, meta, into = self._local_in
                    self._local_in = None
                    self.apply(grad, meta, 0)
                    into.copy_(self.params)
                    self._local_out.put(self.version)
                else:
                    buf = receives.pop(r).join()
                    self.apply(buf[:n], buf[n:].tolist(), r)
                    if r in sends:  # the previous answer to r must be out before its buffer is reused
                        sends.pop(r).join()
                    out = self._outbox[r]
                    out[:n].copy_(self.params)
                    out[n] = float(self.version)
                    sends[r] = _Watched(dist.isend(out, dst=r, tag=TAG), out, timeout, what="asynchronous SGD")
                    remaining[r] -= 1
                    if remaining[r]:
                        post(r)
                left -= 1
            for w in sends.values():
                w.join()
        except BaseException as e:  # kept for join(): a thread cannot raise to its caller
            self._error = e


def exchange_remote(grad: torch.Tensor, meta: list[float], message: torch.Tensor, answer: torch.Tensor, *,
                    timeout_s: float) -> int:
    """A worker other than rank 0: push ``grad`` (N,) and ``meta`` to the server in ``message`` (N + len(META),),
    receive the parameters and version into ``answer`` (N + 1,). Returns the version."""
    n = grad.numel()
    message[:n].copy_(grad)
    message[n:] = torch.tensor(meta, dtype=message.dtype)
    timeout = timedelta(seconds=timeout_s)
    try:
        send = dist.isend(message, dst=0, tag=TAG)
        recv = dist.irecv(answer, src=0, tag=TAG)
        send.wait(timeout)
        recv.wait(timeout)
    except RuntimeError as e:
        raise DistributedError(f"rank {dist.get_rank()}: the push to the parameter server (rank 0) failed ({e}); "
                               "rank 0 has died or --timeout-s is too short") from e
    return int(answer[n])


# --------------------------------------------------------------------------------------------------------
# Hogwild: one parameter vector in shared memory


def share_parameters_(flat: FlatModel, world: World) -> torch.Tensor:
    """Make ``flat.params`` (and the model's parameter views into it) one vector in shared memory that every
    local rank maps; rank 0's values are the starting point. Returns a shared (1,) int64 update counter.

    The memory is a file in /dev/shm (or the temporary directory) mapped with ``torch.from_file(shared=True)``:
    the same shared mapping ``model.share_memory()`` gives, reached by name because the launcher hands its
    workers their arguments by value. The file is deleted as soon as every rank has mapped it (the mappings
    stay), and by rank 0 whatever fails.

    Raises:
        ConfigError: the ranks are not all on this machine, or the parameters are not on the CPU.
    """
    if world.local_size != world.size or flat.params.device.type != "cpu":
        raise ConfigError("--algorithm hogwild shares one parameter vector in this machine's memory: run every "
                          "worker on one machine, on the CPU")
    nbytes = 8 + flat.numel * flat.params.element_size()
    name = [None]
    if world.is_main:
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, name[0] = tempfile.mkstemp(prefix="scalesgd-hogwild-", suffix=".bin", dir=where)
        os.ftruncate(fd, nbytes)
        os.close(fd)
    try:
        if world.size > 1:
            dist.broadcast_object_list(name, src=0)
        raw = None
        if world.is_main:
            raw = torch.from_file(name[0], shared=True, size=nbytes, dtype=torch.uint8)
            raw[8:].view(flat.params.dtype).copy_(flat.params)
        distributed.barrier(world)  # rank 0's values are in place
        if raw is None:
            raw = torch.from_file(name[0], shared=True, size=nbytes, dtype=torch.uint8)
        distributed.barrier(world)  # everyone has mapped it: the name is no longer needed
    finally:
        if world.is_main:
            os.unlink(name[0])
    shared = raw[8:].view(flat.params.dtype)
    offset = 0
    for p in flat.params_list:
        k = p.numel()
        p.data = shared[offset:offset + k].view_as(p)
        offset += k
    flat.params = shared
    return raw[:8].view(torch.int64)


# --------------------------------------------------------------------------------------------------------
# The loop


def loop(state: TrainState, *, cfg: RunConfig, world: World, ds: Dataset, flat: FlatModel,
         tx: GradientTransformation, lr_config: LrConfig, writer: RunWriter, stop: StopRequest,
         loss: Callable | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Train with ``cfg.algorithm`` (``async-ps`` or ``hogwild``) until the budget is spent or the target is
    reached; returns the final state (its parameters: the server's, or the shared ones) and the run summary
    (the synchronous trainer's keys, plus ``algorithm`` and :func:`staleness_summary`'s).

    Raises:
        DivergedError: a worker's loss stopped being finite or exploded (:func:`scalesgd.run.watch_loss` on its own
            updates).
        DistributedError: a worker fell silent for ``--timeout-s`` (the server or a peer names it).
        StoppedError: a stop signal reached a worker (asynchronous runs keep no checkpoint to resume from).
    """
    hogwild = cfg.algorithm == "hogwild"
    classification = ds.task == "classification"
    loss_fn, example_loss_fn, reader, read, stream, total_examples, eval_train_idx = loop_inputs(cfg, ds, world, loss)
    stragglers = parse_straggler(cfg.straggler)
    counter = share_parameters_(flat, world) if hogwild else None
    state = state.replace(params=flat.params)
    first, _ = stream.next(state.cursor, state.global_batch_size)
    warm_up(state, Shard(batch=first, local=shard(first.indices, world.rank, world.size), shard_sizes=[],
                         next_cursor=state.cursor), flat=flat, loss_fn=loss_fn, read=read, comm=NO_COMM)
    distributed.barrier(world)
    start_s = time.perf_counter()
    server = None
    if not hogwild and world.is_main:
        server = ParameterServer(flat.params, tx, world=world, timeout_s=cfg.timeout_s, log=writer.log,
                                 start_s=start_s)
    tx_state = tx.init(flat.params)  # Hogwild: this process's own momentum buffer
    version = 0
    message = torch.empty(flat.numel + N_META) if not hogwild and not world.is_main else None
    answer = torch.empty(flat.numel + 1) if not hogwild else None
    counts: Counter = Counter()  # Hogwild: this rank's staleness counts
    last_eval: dict[str, Any] = {}
    if cfg.exact_diversity_every:
        log_exact_diversity(state, model=flat.model, loss_fn=example_loss_fn, ds=ds, world=world, estimate=None,
                            start_s=start_s, writer=writer)
    try:
        while not finished(state, steps=cfg.steps, total_examples=total_examples):
            rounds, cursor = plan_segment(stream, state.cursor, step=state.step, examples=state.examples,
                                          global_batch_size=cfg.global_batch_size, steps=cfg.steps,
                                          total_examples=total_examples, eval_every=cfg.eval_every,
                                          diversity_every=cfg.exact_diversity_every)
            t0 = time.perf_counter()
            if server is not None:
                server.serve(len(rounds))
            records = []
            for rnd in rounds:
                b = int(rnd.batch.indices.numel())
                sizes = [int(t.numel()) for t in torch.tensor_split(rnd.batch.indices, world.size)]
                idx = shard(rnd.batch.indices, world.rank, world.size)
                lr = lr_terms(lr_config, step=rnd.step, epoch=rnd.epoch,
                              global_batch_size=state.global_batch_size).lr * (sizes[world.rank] / b)
                delay = None if stragglers is None else (
                    lambda c, s=rnd.step: sample_delay(stragglers, seed=cfg.seed, rank=world.rank, step=s,
                                                       compute_s=c))
                before = int(counter) if hogwild else version
                x, y = read(idx)
                g = local_gradient(flat, loss_fn, x, y, seed=cfg.seed, step=rnd.step,
                                   first_row=sum(sizes[:world.rank]), global_rows=b, classification=classification,
                                   delay=delay)
                if not math.isfinite(g.loss_sum):
                    raise DivergedError(f"the loss became {g.loss_sum / max(g.count, 1)} on rank {world.rank} at "
                                        f"step {rnd.step + 1} (lr {lr:.4g}); training stopped. "
                                        f"{divergence_advice(cfg).capitalize()}")
                if g.count:  # an exploding loss stops the run as the synchronous trainer's does, on this rank's
                    # own updates (the first rank to see it ends the job); named by the update's step
                    state = watch_loss(state.replace(step=rnd.step + 1), g.loss_sum / g.count, lr=lr, cfg=cfg,
                                       writer=writer).replace(step=state.step)
                meta = [float(version), lr, float(rnd.step), rnd.epoch, g.loss_sum, g.correct, float(g.count)]
                if hogwild:
                    if g.count:
                        with torch.no_grad():
                            direction, tx_state = tx.update(flat.grad, tx_state, flat.params,
                                                            Hyper(lr=lr, step=rnd.step))
                            apply_updates_(flat.params, direction, lr)  # in place, in shared memory, no lock
                        tau = int(counter) - before
                        counter.add_(1)
                        counts[tau] += 1
                        records.append({"kind": "update", "step": rnd.step + 1, "epoch": rnd.epoch,
                                        "rank": world.rank, "staleness": tau, "loss": g.loss_sum / g.count,
                                        "train_batch_accuracy": g.correct / g.count, "local_batch_size": g.count,
                                        "lr": lr, "time_s": time.perf_counter() - start_s,
                                        **({"injected_delay_s": g.injected_s} if g.injected_s else {})})
                elif server is not None:
                    version = server.exchange_local(flat.grad, meta, flat.params)
                else:
                    version = exchange_remote(flat.grad, meta, message, answer, timeout_s=cfg.timeout_s)
                    flat.params.copy_(answer[:flat.numel])
            # meet: every update of the segment applied, the same parameters everywhere
            if server is not None:
                server.join()
            if not hogwild:
                answer[:flat.numel].copy_(server.params if server is not None else flat.params)
                answer[flat.numel] = float(server.version if server is not None else 0)
                if world.size > 1:
                    dist.broadcast(answer, src=0)
                flat.params.copy_(answer[:flat.numel])
                version = int(answer[flat.numel])
            else:
                gathered = distributed.gather_objects(records, world)
                if gathered is not None:
                    for rec in sorted((r for recs in gathered for r in recs), key=lambda r: r["time_s"]):
                        writer.log(rec)
            train_s = distributed.all_reduce_scalars([time.perf_counter() - t0, float(stop.signum is not None)],
                                                     world)
            last = rounds[-1]
            state = state.replace(step=last.step + 1, examples=last.examples + int(last.batch.indices.numel()),
                                  cursor=cursor, train_time_s=state.train_time_s + train_s[0] / world.size)
            if train_s[1] > 0:
                raise StoppedError(f"stopped by {stop.name or 'a signal to another worker'} after step "
                                   f"{state.step}; asynchronous runs keep no checkpoint to resume from")
            done = finished(state, steps=cfg.steps, total_examples=total_examples)
            if cfg.exact_diversity_every and state.step % cfg.exact_diversity_every == 0:
                log_exact_diversity(state, model=flat.model, loss_fn=example_loss_fn, ds=ds, world=world,
                                    estimate=None, start_s=start_s, writer=writer)
            due = (cfg.eval_every is not None and state.step % cfg.eval_every == 0) or (
                cfg.eval_every is None and last.batch.epoch_end)
            if due or done:
                last_eval = log_eval(state, model=flat.model, loss_fn=loss_fn, ds=ds, eval_train_idx=eval_train_idx,
                                     world=world, classification=classification, start_s=start_s, writer=writer)
                state = reached_target(state, last_eval, target=cfg.target_accuracy, metric=cfg.target_metric)
            distributed.barrier(world)  # Hogwild: nobody writes the shared parameters while another evaluates
            if state.time_to_target_s is not None:
                break
    finally:
        reader.close()
    if server is not None:
        counts = server.staleness
    elif hogwild:
        merged = distributed.gather_objects(counts, world)
        counts = sum(merged, Counter()) if merged is not None else counts
    if not last_eval or last_eval["step"] != state.step:
        last_eval = log_eval(state, model=flat.model, loss_fn=loss_fn, ds=ds, eval_train_idx=eval_train_idx,
                             world=world, classification=classification, start_s=start_s, writer=writer)
    if server is not None:
        state = state.replace(tx_state=server.tx_state)
    elif hogwild:
        state = state.replace(tx_state=tx_state)
    return state, {**run_summary(state, last_eval, cfg=cfg, world=world, n_train=ds.n_train, num_parameters=flat.numel,
                                 start_s=start_s, checkpoints=0, checkpoint_s=0.0),
                   "algorithm": cfg.algorithm, **staleness_summary(counts)}
