"""One synchronous data-parallel training step, with the all-reduce and the statistics tap in plain view.

Memory layout: every parameter is a view into one flat vector ``params`` (N,), and every ``.grad`` is a
view into the front of one flat communication buffer ``buffer`` (N + tail,). Backward therefore writes the
local gradient straight into the buffer; the tail carries this rank's exact statistics (loss sum, correct
count, example count, diversity sums, its compute time, and its all-reduce and update times of the step
before, which are only known after that step's collective) and is summed by the *same* all-reduce, so a step
costs one collective whatever is measured.

Reduction convention: rank p backpropagates ``Σ_{i∈shard_p} ℓᵢ / B`` with B the global batch, so the sum
over ranks is exactly the gradient of the mean loss over the global batch (DDP's averaging of per-rank
means would weight unequal shards wrongly).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn

from scalesgd.comm import CommStrategy
from scalesgd.diversity import (NoiseStats, per_example_noise_stats, rank_averaged_two_batch_noise_stats,
                                two_batch_rank_terms)
from scalesgd.ghost_norms import GhostNormTap
from scalesgd.local_sgd import NO_COMM
from scalesgd.transforms import GradientTransformation, Hyper, apply_updates_

# Fixed slots at the head of the statistics tail; per-rank compute times follow them.
SLOT_LOSS, SLOT_CORRECT, SLOT_COUNT = 0, 1, 2
SLOT_CODEC_VAR = 3  # E‖Q(g) − g‖² a lossy codec adds to this rank's gradient part (0 for exact strategies)
# Requests any rank may raise (a signal, a checkpoint falling due): summed with the step, so every rank
# learns of them at the same step, at no extra collective.
SLOT_CHECKPOINT, SLOT_STOP = 4, 5
SLOT_TAP = 6  # first of the slots a statistics tap may use
N_TAP_SLOTS = 5
N_FIXED_SLOTS = SLOT_TAP + N_TAP_SLOTS
# After the fixed slots, three blocks of P per-rank slots: this step's compute time, then the previous step's
# all-reduce time and update time as that rank measured them (UNKNOWN_TIME when it had no previous step).
UNKNOWN_TIME = -1.0


class FlatModel:
    """A model whose parameters live in one flat vector and whose gradients land in one flat buffer."""

    def __init__(self, model: nn.Module, world_size: int, device: torch.device):
        self.model = model
        self.params_list = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params_list)
        self.world_size = world_size
        self.tail = N_FIXED_SLOTS + 3 * world_size
        # This rank's (all-reduce, update) seconds of its last step: sent with the next step's tail, so every
        # rank's own times reach rank 0's metrics without a collective of their own.
        self.last_times: tuple[float, float] = (UNKNOWN_TIME, UNKNOWN_TIME)
        dtype = self.params_list[0].dtype if self.params_list else torch.float32
        self.params = torch.empty(self.numel, dtype=dtype, device=device)  # (N,)
        self.buffer = torch.zeros(self.numel + self.tail, dtype=dtype, device=device)  # (N + tail,)
        offset = 0
        for p in self.params_list:
            n = p.numel()
            self.params[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.params[offset:offset + n].view_as(p)
            p.grad = self.buffer[offset:offset + n].view_as(p)
            offset += n

    @property
    def grad(self) -> torch.Tensor:
        return self.buffer[: self.numel]

    @property
    def stats(self) -> torch.Tensor:
        return self.buffer[self.numel:]


class StatsTap(Protocol):
    """Something that measures gradient statistics inside the step (e.g. the noise estimators).

    ``backward_context`` may return a context manager around backward; ``local_stats`` writes up to
    :data:`N_TAP_SLOTS` values into the tail before the all-reduce; ``after_reduce`` reads the summed
    tail and the reduced gradient (with ``codec_error_sq``, the squared error a lossy codec added to it in
    expectation, summed over ranks) and returns the step's :class:`~scalesgd.diversity.NoiseStats` (or None).
    A tap keeps no state between steps: smoothing is the caller's, on state it holds.
    """

    def backward_context(self) -> Any: ...

    def local_stats(self, grad: torch.Tensor, local_batch_size: int, global_batch_size: int,
                    loss_scale: float, example_sq_norms: float | None = None) -> list[float]: ...

    def after_reduce(self, grad: torch.Tensor, tap_sums: list[float], shard_sizes: list[int],
                     global_batch_size: int, codec_error_sq: float = 0.0) -> NoiseStats | None: ...


class NoiseTap:
    """The :class:`StatsTap` behind ``--diversity cheap|exact``: one step's unbiased ‖G‖² and tr Σ.

    Both paths put their few scalars into the tail of the gradient buffer, so they ride on the step's one
    all-reduce; the formulas are the pure functions of :mod:`scalesgd.diversity`:

    * ``exact`` — ghost norms give S₁ = Σᵢ‖gᵢ‖² of this rank's examples (summed over ranks by the all-reduce),
      the reduced gradient S₂ = ‖Σᵢgᵢ‖² = B²‖G_B‖²; :func:`~scalesgd.diversity.per_example_noise_stats`.
    * ``cheap`` — no per-example norms: every rank's local mean gradient against the all-reduced one,
      averaged over ranks (:func:`~scalesgd.diversity.two_batch_rank_terms`,
      :func:`~scalesgd.diversity.rank_averaged_two_batch_noise_stats`). With one worker there is no
      smaller batch; ``cheap`` then falls back to ``exact``.
    * either way, under a lossy codec ‖G_B‖² is the reduced gradient's squared norm less the codec's
      rounding variance summed over ranks (tail slot ``SLOT_CODEC_VAR``), so both paths stay unbiased.
    """

    def __init__(self, mode: str, model: nn.Module, *, world_size: int):
        if mode == "cheap" and world_size == 1:
            mode = "exact"  # no second batch size to compare with; documented in the option's help
        self.mode = mode
        self.ghost = GhostNormTap(model) if mode == "exact" else None

    def backward_context(self) -> Any:
        return self.ghost.capture() if self.ghost is not None else contextlib.nullcontext()

    def local_stats(self, grad: torch.Tensor, local_batch_size: int, global_batch_size: int,
                    loss_scale: float, example_sq_norms: float | None = None) -> list[float]:
        """``example_sq_norms``: Σᵢ‖gᵢ‖² of this shard when the step computed per-example gradients itself
        (``--example-qsgd-levels``: those of the quantized gᵢ); else the ghost norms of the captured backward."""
        if local_batch_size == 0:
            return [0.0, 0.0]
        if self.mode == "exact":
            if example_sq_norms is not None:
                return [example_sq_norms]
            return [float(self.ghost.sq_norms(loss_scale).sum())]
        # The buffer holds Σ_{i∈shard} gᵢ / B; the local mean gradient is that times B / B_s.
        local_sq = float(torch.dot(grad, grad)) * (global_batch_size / local_batch_size) ** 2  # ‖G_s,p‖²
        return list(two_batch_rank_terms(local_sq, local_batch_size, global_batch_size))

    def after_reduce(self, grad: torch.Tensor, tap_sums: list[float], shard_sizes: list[int],
                     global_batch_size: int, codec_error_sq: float = 0.0) -> NoiseStats | None:
        bb = global_batch_size
        # ‖G_B‖² of the reduced mean gradient. A lossy codec's result is Σᵣ Q(gᵣ), whose squared norm exceeds
        # the exact one by Σᵣ E‖Q(gᵣ) − gᵣ‖² on average (``codec_error_sq``, summed exactly in the tail):
        # subtracted, the estimate is unbiased whatever the codec.
        big_sq = float(torch.dot(grad, grad)) - codec_error_sq
        if self.mode == "exact":
            return per_example_noise_stats(tap_sums[0], big_sq * bb * bb, bb) if bb >= 2 else None
        return rank_averaged_two_batch_noise_stats(tap_sums[0], tap_sums[1], big_sq, shard_sizes, bb)

    def close(self) -> None:
        if self.ghost is not None:
            self.ghost.close()


@dataclass(frozen=True)
class StepResult:
    """What one step measured. Times in seconds; loss is the global mean over the batch."""

    loss: float
    correct: int
    global_batch_size: int
    compute_s: float  # forward + backward + local statistics, this rank
    comm_s: float  # the all-reduce, as this rank saw it (includes waiting for slower peers)
    update_s: float  # the optimizer update
    wait_s: float  # estimated wait for the slowest peer: max over ranks of compute_s − own compute_s
    compute_s_per_rank: tuple[float, ...]
    bytes_sent: int
    noise: NoiseStats | None  # the tap's unbiased ‖G‖² (mean gradient) and tr Σ of this step; None without
    injected_delay_s: float = 0.0  # the straggler delay slept inside compute_s (``--straggler``), this rank
    checkpoint_requested: bool = False  # some rank asked for a checkpoint after this step
    stop_requested: bool = False  # some rank asked to checkpoint and stop after this step (a signal)
    # The *previous* step's all-reduce and update seconds as each rank measured them (it rode in this step's
    # tail); UNKNOWN_TIME for a rank without a previous step in this job; empty when the step had no collective.
    prev_comm_s_per_rank: tuple[float, ...] = ()
    prev_update_s_per_rank: tuple[float, ...] = ()

    @property
    def previous_comm_s(self) -> float:
        """The previous step's all-reduce seconds, mean over the ranks that had one (NaN when none did): what
        the goodput policy's step-time fit uses, alike on every rank, one step late at no collective of its own."""
        return _mean_known(self.prev_comm_s_per_rank)

    @property
    def previous_update_s(self) -> float:
        """The previous step's update seconds, mean over the ranks that had one (NaN when none did)."""
        return _mean_known(self.prev_update_s_per_rank)


def _mean_known(times: tuple[float, ...]) -> float:
    known = [t for t in times if t >= 0.0]  # UNKNOWN_TIME (< 0): that rank had no previous step in this job
    return sum(known) / len(known) if known else math.nan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(*, flat: FlatModel, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               x: torch.Tensor, y: torch.Tensor, global_batch_size: int, shard_sizes: list[int], rank: int,
               comm: CommStrategy, tx: GradientTransformation, tx_state: Any, hyper: Hyper,
               tap: StatsTap | None = None, classification: bool = True,
               delay: Callable[[float], float] | None = None,
               requests: tuple[bool, bool] = (False, False),
               example_grad: Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]
               | None = None) -> tuple[StepResult, Any]:
    """Forward/backward on this rank's shard, one all-reduce, the same update on every rank.

    Args:
        flat: the model with flat parameters and gradient buffer.
        loss_fn: per-example loss, ``reduction="sum"`` semantics: ``loss_fn(out, y)`` returns Σᵢ ℓᵢ.
        x, y: this rank's shard of the global batch (may be empty for a tiny last batch); ``x`` is whatever
            the model takes (a tensor, or a dict batch), ``y`` a tensor whose first axis is the shard.
        global_batch_size: B, the size of the whole global batch.
        shard_sizes: the size of every rank's shard (for estimators that need them).
        comm: the communication strategy.
        tx, tx_state: the gradient transformation and its state.
        hyper: learning rate and step number.
        tap: optional statistics tap (:class:`NoiseTap`); its estimate is ``StepResult.noise``.
        delay: optional injected straggler delay: called with this rank's measured compute time (s), returns
            seconds to sleep before the all-reduce; the sleep counts as compute, so peers see it as wait
            (:mod:`scalesgd.stragglers`).
        requests: this rank's (checkpoint, stop) requests; ``StepResult.checkpoint_requested`` /
            ``stop_requested`` say whether any rank raised them (they ride in the all-reduced tail).
        example_grad: optional replacement of forward + backward that builds the gradient from per-example
            gradients (``--example-qsgd-levels``, :class:`scalesgd.mechanisms.ExampleQSGD`): ``(x, y) ->
            (outputs, loss sum, Σᵢ g̃ᵢ (N,), Σᵢ‖g̃ᵢ‖²)``; the step writes Σᵢ g̃ᵢ / B into the buffer, and the exact
            noise tap uses Σᵢ‖g̃ᵢ‖² in place of ghost norms.
    Returns:
        (StepResult, new tx_state).
    """
    device = flat.buffer.device
    t0 = time.perf_counter()
    flat.buffer.zero_()
    stats = flat.stats
    local_b = int(y.shape[0])  # the targets are a tensor even when the inputs are a dict
    loss_scale = 1.0 / global_batch_size
    example_sq = None
    if local_b > 0 and example_grad is not None:
        out, loss_sum, grad_sum, example_sq = example_grad(x, y)
        with torch.no_grad():
            torch.mul(grad_sum, loss_scale, out=flat.grad)
            correct = (out.argmax(1) == y).sum() if classification else torch.zeros((), device=device)
            stats[SLOT_LOSS:SLOT_COUNT + 1] = torch.stack([loss_sum.detach(), correct.to(stats.dtype),
                                                           torch.tensor(float(local_b), device=device)])
    elif local_b > 0:
        out = flat.model(x)
        loss_sum = loss_fn(out, y)
        if tap is not None:
            with tap.backward_context():
                (loss_sum * loss_scale).backward()
        else:
            (loss_sum * loss_scale).backward()
        with torch.no_grad():
            correct = (out.argmax(1) == y).sum() if classification else torch.zeros((), device=device)
            stats[SLOT_LOSS:SLOT_COUNT + 1] = torch.stack([loss_sum.detach(), correct.to(stats.dtype),
                                                           torch.tensor(float(local_b), device=device)])
    else:
        stats[SLOT_COUNT] = 0.0
    if tap is not None:
        values = (tap.local_stats(flat.grad, local_b, global_batch_size, loss_scale) if example_sq is None else
                  tap.local_stats(flat.grad, local_b, global_batch_size, loss_scale, example_sq_norms=example_sq))
        if values:
            # Through a float64 tensor: a diverging run's statistics saturate to inf instead of raising.
            stats[SLOT_TAP:SLOT_TAP + len(values)] = torch.tensor(values, dtype=torch.float64).to(stats.dtype)
    error_variance = getattr(comm, "error_variance", None)
    if tap is not None and error_variance is not None and local_b > 0:
        stats[SLOT_CODEC_VAR] = error_variance(flat.grad)
    _sync(device)
    t1 = time.perf_counter()
    injected = delay(t1 - t0) if delay is not None else 0.0
    if injected > 0:
        time.sleep(injected)
        t1 = time.perf_counter()
    compute_s = t1 - t0
    world_size = flat.world_size
    stats[N_FIXED_SLOTS + rank] = compute_s
    stats[N_FIXED_SLOTS + world_size + rank] = flat.last_times[0]
    stats[N_FIXED_SLOTS + 2 * world_size + rank] = flat.last_times[1]
    stats[SLOT_CHECKPOINT] = float(requests[0])
    stats[SLOT_STOP] = float(requests[1])

    comm_stats = comm.allreduce_(flat.buffer, exact_tail=flat.tail)
    _sync(device)
    t2 = time.perf_counter()

    summed = stats.tolist()
    noise = None
    if tap is not None:
        noise = tap.after_reduce(flat.grad, summed[SLOT_TAP:SLOT_TAP + N_TAP_SLOTS], shard_sizes, global_batch_size,
                                 codec_error_sq=summed[SLOT_CODEC_VAR])
    with torch.no_grad():
        direction, tx_state = tx.update(flat.grad, tx_state, flat.params, hyper)
        apply_updates_(flat.params, direction, hyper.lr)
    _sync(device)
    t3 = time.perf_counter()

    flat.last_times = (t2 - t1, t3 - t2)
    per_rank = tuple(summed[N_FIXED_SLOTS:N_FIXED_SLOTS + world_size])
    # Without a collective (a local-SGD step) the tail holds this rank's values only: no per-rank times.
    reduced = comm is not NO_COMM or world_size == 1
    prev_comm = tuple(summed[N_FIXED_SLOTS + world_size:N_FIXED_SLOTS + 2 * world_size]) if reduced else ()
    prev_update = tuple(summed[N_FIXED_SLOTS + 2 * world_size:]) if reduced else ()
    count = max(summed[SLOT_COUNT], 1.0)
    result = StepResult(
        loss=summed[SLOT_LOSS] / count,
        correct=int(round(summed[SLOT_CORRECT])),
        global_batch_size=int(round(summed[SLOT_COUNT])),
        compute_s=compute_s,
        comm_s=t2 - t1,
        update_s=t3 - t2,
        wait_s=max(per_rank) - compute_s if per_rank else 0.0,
        compute_s_per_rank=per_rank,
        bytes_sent=comm_stats.bytes_sent,
        noise=noise,
        injected_delay_s=injected,
        checkpoint_requested=summed[SLOT_CHECKPOINT] > 0.5,
        stop_requested=summed[SLOT_STOP] > 0.5,
        prev_comm_s_per_rank=prev_comm,
        prev_update_s_per_rank=prev_update,
    )
    return result, tx_state


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: Callable, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
             rank: int, world_size: int, device: torch.device, classification: bool, batch_size: int = 4096,
             read: Callable[[torch.Tensor], tuple[Any, torch.Tensor]] | None = None, n: int | None = None
             ) -> tuple[float, float, float]:
    """This rank's share of (loss sum, correct count, example count) on (x, y); sum over ranks outside.

    Instead of tensors, ``read(indices) -> (inputs, targets)`` over ``n`` examples (a data set read by index).
    Runs in eval mode (dropout off) and restores the previous mode.
    """
    from scalesgd.data.user import to_device

    if read is None:
        read, n = (lambda i: (x[i], y[i])), int(x.shape[0])
    was_training = model.training
    model.eval()
    idx = torch.tensor_split(torch.arange(n), world_size)[rank]
    loss_sum = correct = 0.0
    for start in range(0, idx.numel(), batch_size):
        part = idx[start:start + batch_size]
        xb, yb = read(part)
        xb, yb = to_device(xb, device), yb.to(device, non_blocking=True)
        out = model(xb)
        loss_sum += float(loss_fn(out, yb))
        if classification:
            correct += float((out.argmax(1) == yb).sum())
    model.train(was_training)
    return loss_sum, correct, float(idx.numel())
