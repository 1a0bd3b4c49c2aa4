"""Gradient noise scale, adaptive global batch and learning-rate rules inside a plain DDP training loop.

Three pieces, each usable alone:

* :func:`noise_hook` with :class:`NoiseHookState` — a ``DistributedDataParallel`` communication hook that
  reduces every gradient bucket exactly as DDP does without a hook (so training is bitwise unchanged) and estimates ‖G‖², tr Σ and B_S = B_simple + 1 from each rank's local gradient and the reduced
  one (the two-batch-size estimator of McCandlish et al. 2018, appendix A.1, averaged over ranks as
  ``scalesgd train --diversity cheap`` does). Cost: one all-reduce of 2P scalars per step.
* :class:`AdaptiveBatchSampler` — a batch sampler that gives each rank its shard of a global batch whose
  size may change at any step, in exactly the order of ``scalesgd train`` (:mod:`scalesgd.data.sharding`):
  no example is repeated or skipped within an epoch.
* :class:`AdaptiveBatch` — both of them, a batch-size policy (:mod:`scalesgd.batch_policy`) and a
  learning-rate rule (:mod:`scalesgd.lr_rules`) behind one object that registers the hook, serves the
  batches and sets the optimizer's learning rate before each step::

      ab = scalesgd.ddp.AdaptiveBatch(model, dataset, optimizer=opt, global_batch_size=64)
      loader = DataLoader(dataset, batch_sampler=ab)
      for epoch in range(epochs):
          for x, y in loader:  # the rest of the epoch, at whatever batch size the policy picks
              ...  # the usual zero_grad / forward / loss / backward / opt.step()

Conventions (DDP's): each rank's loss is the *mean* over its local batch, and DDP averages the P local
gradients. With equal shards that is the mean gradient of the global batch; with unequal shards (a global
batch that is not a multiple of P, or the short last batch of an epoch) it weights an example of rank p by
1/(P·b_p). The estimator accounts for that: the reduced gradient is an unbiased estimate of G whose variance
is tr Σ/B_eff with B_eff = P²/Σ_p 1/b_p (the harmonic mean of the b_p times P; B_eff = B when the shards
are equal), so B_eff takes the big batch's place in the two-batch formulas.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, field
from fractions import Fraction
from typing import Any, Callable, Iterator, Sequence, Sized

import torch
import torch.distributed as dist

from scalesgd.batch_policy import BatchPolicy, StepObservation, make_batch_policy
from scalesgd.data.sharding import BatchStream, Cursor
from scalesgd.diversity import (EMAState, NoiseScaleEMA, NoiseStats, rank_averaged_two_batch_noise_stats,
                                two_batch_rank_terms)
from scalesgd.errors import ConfigError
from scalesgd.lr_rules import LrConfig, lr_terms

# --------------------------------------------------------------------------------------------------------
# The estimator (pure functions)


def pooled_two_batch_noise_stats(local_grad_sq_norms: Sequence[float], local_batch_sizes: Sequence[int],
                                 big_grad_sq_norm: float, big_batch_size: float) -> NoiseStats | None:
    """‖G‖² and tr Σ from P local mean gradients and one big-batch gradient, the per-rank estimates averaged.

    For each rank p with 0 < b_p < B the two-batch estimator (McCandlish et al. 2018, appendix A.1) is
    unbiased, since E‖G_b‖² = ‖G‖² + tr Σ/b for a mean over b examples:

        ‖G‖²_p = (B‖G_B‖² − b_p‖G_p‖²)/(B − b_p),   tr Σ_p = (‖G_p‖² − ‖G_B‖²)/(1/b_p − 1/B).

    Both are linear in ‖G_p‖² and ‖G_B‖², so their mean over the P' usable ranks is

        ‖G‖²̂ = (‖G_B‖²·Σ_p B/(B − b_p) − Σ_p b_p‖G_p‖²/(B − b_p))/P',
        tr Σ̂ = (Σ_p ‖G_p‖²/(1/b_p − 1/B) − ‖G_B‖²·Σ_p 1/(1/b_p − 1/B))/P',

    This is the trainer's own estimator (``scalesgd train --diversity cheap``, where the two per-rank sums ride in
    the gradient all-reduce): :func:`scalesgd.diversity.two_batch_rank_terms` summed over ranks, then
    :func:`scalesgd.diversity.rank_averaged_two_batch_noise_stats`.

    Args:
        local_grad_sq_norms: ‖G_p‖² for every rank, G_p the gradient of the mean loss over its b_p examples.
        local_batch_sizes: b_p for every rank (examples; ranks with b_p = 0 or b_p >= B are left out).
        big_grad_sq_norm: ‖G_B‖², the squared norm of the big-batch mean gradient.
        big_batch_size: B, or the effective size of the big batch (may be fractional, see
            :func:`ddp_noise_stats`).
    Returns:
        :class:`scalesgd.diversity.NoiseStats` (per-step ‖G‖² of the mean-loss gradient, per-example tr Σ),
        or None when no rank has 0 < b_p < B (no second batch size to compare with).
    """
    terms = [two_batch_rank_terms(s, b, big_batch_size)
             for s, b in zip(local_grad_sq_norms, local_batch_sizes, strict=True)]
    return rank_averaged_two_batch_noise_stats(sum(u for u, _ in terms), sum(v for _, v in terms),
                                               big_grad_sq_norm, local_batch_sizes, big_batch_size)


def ddp_effective_batch_size(local_batch_sizes: Sequence[int]) -> float:
    """B_eff = P²/Σ_p 1/b_p: the batch whose mean gradient has the variance of DDP's averaged gradient.

    DDP averages P per-rank mean gradients, Ḡ = (1/P)Σ_p G_p, so Var Ḡ = (1/P²)Σ_p tr Σ/b_p = tr Σ/B_eff.
    Computed exactly (rationals), so equal shards b give exactly B = P·b.

    Raises:
        ValueError: if some rank has no examples (its zero gradient would still be averaged in).
    """
    if any(int(b) < 1 for b in local_batch_sizes):
        raise ValueError(f"every rank needs at least one example, got local batch sizes {list(local_batch_sizes)}")
    p = len(local_batch_sizes)
    return float(Fraction(p * p) / sum(Fraction(1, int(b)) for b in local_batch_sizes))


def ddp_noise_stats(local_grad_sq_norms: Sequence[float], local_batch_sizes: Sequence[int],
                    reduced_grad_sq_norm: float) -> NoiseStats | None:
    """One DDP step's ‖G‖² and tr Σ from the ranks' local gradient norms and DDP's averaged gradient's norm.

    :func:`pooled_two_batch_noise_stats` with the big batch of effective size
    :func:`ddp_effective_batch_size` (= B = Σ_p b_p when the shards are equal).

    Args:
        local_grad_sq_norms: ‖G_p‖², G_p rank p's gradient of the mean loss over its b_p examples.
        local_batch_sizes: b_p (examples).
        reduced_grad_sq_norm: ‖Ḡ‖², Ḡ = (1/P)Σ_p G_p as DDP reduces it.
    Returns:
        NoiseStats, or None with one rank (no second batch size) or when a rank had no examples.
    """
    if len(local_batch_sizes) < 2 or any(int(b) < 1 for b in local_batch_sizes):
        return None
    return pooled_two_batch_noise_stats(local_grad_sq_norms, local_batch_sizes, reduced_grad_sq_norm,
                                        ddp_effective_batch_size(local_batch_sizes))


# --------------------------------------------------------------------------------------------------------
# The communication hook


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """‖t‖² as a 0-dim tensor on t's device (accumulated in at least float32; no host sync)."""
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(t, dtype=dtype).square()


@dataclass
class _Pending:
    """One synced backward in flight: per-bucket local and reduced squared norms, the scalar all-reduce."""

    local_batch_size: int
    local_sq: dict[int, torch.Tensor] = field(default_factory=dict)
    reduced_sq: dict[int, torch.Tensor] = field(default_factory=dict)
    scalars: torch.Tensor | None = None
    work: Any = None  # the scalar all-reduce's Work, set when the last bucket is launched


class NoiseHookState:
    """The state of :func:`noise_hook`: the step in flight, the smoothed estimates and the last step's.

    Register with ``ddp_model.register_comm_hook(state, noise_hook)`` (or :func:`register_noise_hook`).
    Before each synced backward the hook needs this rank's local batch size b_p: either a constant
    (``local_batch_size=``), or set :attr:`local_batch_size` each step, or give ``local_batch_source``, a
    callable that returns it (what :class:`AdaptiveBatch` does). The loss must be the mean over those b_p
    examples (with gradient accumulation under ``no_sync``: the mean over all of them, e.g. each
    micro-batch's mean loss divided by the number of equal micro-batches).

    One synced backward is one step. Its estimate is folded into the EMA when the step is finished:
    explicitly by :meth:`finish_step` (AdaptiveBatch calls it after ``optimizer.step()``), else lazily by
    :meth:`estimate` or by the next backward. Backwards under ``no_sync`` call no hook and are part of the
    next synced one.

    Args:
        process_group: the group DDP reduces over (None: the default group).
        local_batch_size: b_p if it is constant, else None.
        local_batch_source: callable returning b_p, called once at the start of each synced backward.
        n_train: training-set size n, for Δ̂ = B̂_S/n (None: ``diversity_est`` is NaN).
        decay: EMA decay of :class:`scalesgd.diversity.NoiseScaleEMA` (0.99: a ~100-step window).
    """

    def __init__(self, *, process_group: dist.ProcessGroup | None = None, local_batch_size: int | None = None,
                 local_batch_source: Callable[[], int] | None = None, n_train: int | None = None,
                 decay: float = 0.99):
        if n_train is not None and n_train < 1:
            raise ConfigError(f"n_train must be >= 1 (the training-set size), got {n_train}")
        self.process_group = process_group
        self.local_batch_size = local_batch_size
        self.local_batch_source = local_batch_source
        self.n_train = n_train
        self.ema = NoiseScaleEMA(decay)
        self.ema_state: EMAState = self.ema.init()
        self.last_step: NoiseStats | None = None  # the last finished step's unsmoothed estimate
        self.steps = 0  # synced backwards finished
        self._pending: _Pending | None = None

    # -- called by the hook ------------------------------------------------------------------------------
    def _bucket_pending(self) -> _Pending:
        if self._pending is not None and self._pending.work is None:
            return self._pending  # a later bucket of the backward in flight
        self.finish_step()
        if self.local_batch_source is not None:
            b = self.local_batch_source()
        elif self.local_batch_size is not None:
            b = self.local_batch_size
        else:
            raise ConfigError("noise_hook needs this rank's local batch size: pass local_batch_size= (or "
                              "local_batch_source=) to NoiseHookState, or set state.local_batch_size before "
                              "backward")
        self._pending = _Pending(local_batch_size=int(b))
        return self._pending

    def _launch_scalars(self, pend: _Pending, device: torch.device) -> None:
        """After the last bucket: all-reduce [‖G_p‖² at slot p, b_p at slot P+p] so every rank has all of them."""
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        p, rank = dist.get_world_size(group), dist.get_rank(group)
        scalars = torch.zeros(2 * p, dtype=torch.float64, device=device)
        local_sq = torch.stack([pend.local_sq[i] for i in sorted(pend.local_sq)]).sum()
        scalars[rank] = local_sq.to(torch.float64)
        scalars[p + rank] = float(pend.local_batch_size)
        pend.scalars = scalars
        pend.work = dist.all_reduce(scalars, group=group, async_op=True)

    # -- public ------------------------------------------------------------------------------------------
    def finish_step(self) -> NoiseStats | None:
        """Fold the last completed synced backward into the estimate; a no-op when there is none.

        Returns:
            that step's unsmoothed estimate (None if there was no step to finish, or it gave no estimate:
            one rank, a rank without examples, or a non-finite value).
        Raises:
            RuntimeError: if a bucket's reduction had not finished (call it after ``backward()`` returns).
        """
        pend = self._pending
        if pend is None or pend.work is None:
            return None
        pend.work.wait()
        if sorted(pend.reduced_sq) != sorted(pend.local_sq):
            raise RuntimeError("noise_hook: a gradient bucket's all-reduce has not finished; finish the step "
                               "after backward() returns")
        self._pending = None
        values = pend.scalars.tolist()
        p = len(values) // 2
        local_sq, local_b = values[:p], [int(round(b)) for b in values[p:]]
        reduced_sq = sum(float(pend.reduced_sq[i]) for i in sorted(pend.reduced_sq))
        stats = ddp_noise_stats(local_sq, local_b, reduced_sq)
        self.steps += 1
        if stats is not None and not all(math.isfinite(v) for v in astuple(stats)):
            stats = None  # a diverging step's inf/NaN would poison the average for good
        self.last_step = stats
        if stats is not None:
            self.ema_state = self.ema.update(self.ema_state, *astuple(stats))
        return stats

    def estimate(self) -> dict[str, float]:
        """The smoothed estimates after the last finished step (finishing a completed one first).

        Returns:
            ``grad_sq_norm_est`` ‖G‖² (of the mean-loss gradient), ``trace_cov_est`` tr Σ (per example),
            ``b_simple_est`` tr Σ/‖G‖², ``batch_bound_est`` B_S = B_simple + 1 (examples),
            ``diversity_est`` Δ = B_S/n, and, when the last step gave an estimate, its unsmoothed
            ``grad_sq_norm_step`` and ``trace_cov_step`` — the keys ``scalesgd train`` logs. NaN before the
            first estimate; ``b_simple_est`` inf when ‖G‖² <= 0.
        """
        self.finish_step()
        est = self.ema.estimate(self.ema_state, self.n_train or 1)
        out = {"grad_sq_norm_est": est.grad_sq_norm_est, "trace_cov_est": est.trace_cov_est,
               "b_simple_est": est.b_simple_est, "batch_bound_est": est.batch_bound_est,
               "diversity_est": est.diversity_est if self.n_train else math.nan}
        if self.last_step is not None:
            g2, tr = astuple(self.last_step)
            out.update(grad_sq_norm_step=g2, trace_cov_step=tr)
        return out


def noise_hook(state: NoiseHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: DDP's own averaging all-reduce, plus the gradient-noise estimate.

    The bucket is reduced as DDP reduces it without a hook (scale by 1/P, all-reduce sum; the same
    all-reduce as :func:`torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook`, which
    divides by P instead of multiplying by 1/P), so the parameters are bitwise those of plain DDP. Before
    that the hook takes the bucket's local squared norm (rank p's ‖G_p‖² over this bucket's parameters);
    after it, the reduced squared norm (‖Ḡ‖²). Both are summed over the buckets of one backward; once the
    last bucket is launched one more all-reduce of 2P scalars shares every rank's ‖G_p‖² and b_p, and
    :meth:`NoiseHookState.finish_step` turns them into :func:`ddp_noise_stats`.

    Args:
        state: a :class:`NoiseHookState`.
        bucket: the gradient bucket DDP hands over.
    Returns:
        A future holding the reduced bucket, as DDP requires.
    """
    pend = state._bucket_pending()
    buf = bucket.buffer()
    index = bucket.index()
    pend.local_sq[index] = _sq_norm(buf)  # before the buffer is scaled in place
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    # DDP's built-in reducer scales each gradient by the reciprocal 1/P (at::mul_out with a wrapped double
    # scalar); default_hooks.allreduce_hook divides by P instead, which differs in the last bit when P is not
    # a power of two (seen at P = 3). Multiplying keeps the parameters bitwise those of DDP without a hook.
    buf.mul_(1.0 / dist.get_world_size(group))
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future()

    def record_reduced(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        reduced = f.value()[0]
        pend.reduced_sq[index] = _sq_norm(reduced)
        return reduced

    out = fut.then(record_reduced)
    if bucket.is_last():
        state._launch_scalars(pend, buf.device)
    return out


# DDP checks a hook's annotations against the objects themselves; ``from __future__ import annotations`` made
# them strings.
noise_hook.__annotations__.update(bucket=dist.GradBucket, state=NoiseHookState,
                                  **{"return": torch.futures.Future[torch.Tensor]})


def register_noise_hook(model: torch.nn.parallel.DistributedDataParallel, **options) -> NoiseHookState:
    """Register :func:`noise_hook` on a DDP model; returns its :class:`NoiseHookState` (options go to it).

    DDP allows one communication hook per model, registered before the first backward.
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ConfigError(f"register_noise_hook needs a torch.nn.parallel.DistributedDataParallel model, got "
                          f"{type(model).__name__}; wrap it first: model = DistributedDataParallel(model)")
    state = NoiseHookState(process_group=model.process_group, **options)
    model.register_comm_hook(state, noise_hook)
    return state


# --------------------------------------------------------------------------------------------------------
# The batch sampler


@dataclass(frozen=True)
class BatchRecord:
    """One served global batch: what the step that uses it needs, and where to rewind to.

    Attributes:
        step: index of the batch (0-based; the optimizer step that uses it).
        epoch: epochs consumed before it (fractional).
        policy_batch_size: the global batch the policy asked for (the lr rule's B).
        global_batch_size: examples actually in it (smaller at the end of an epoch).
        local_batch_size: this rank's share.
        cursor: the stream position before it.
        batch_before: the global batch in force before the policy's decision.
        policy_state: the policy's state before its decision.
    """

    step: int
    epoch: float
    policy_batch_size: int
    global_batch_size: int
    local_batch_size: int
    cursor: Cursor
    batch_before: int
    policy_state: Any = None


class AdaptiveBatchSampler(torch.utils.data.Sampler):
    """Batch sampler: this rank's shard of a global batch whose size may change before any step.

    The global batches are those of ``scalesgd train`` with the same seed: epoch e's permutation
    (:func:`scalesgd.data.sharding.epoch_permutation`) cut front to back into batches of the size asked
    for at each step, the last one of an epoch holding what is left; rank r takes
    ``torch.tensor_split(batch, P)[r]``. A size change mid-epoch repeats or skips nothing. One exception to
    the trainer's order: when what would be left of the epoch after a batch is smaller than P (some rank
    would get no example), that remainder joins the batch.

    Iterating yields the rest of the current epoch (so ``for epoch in ...: for batch in loader:`` works
    without ``set_epoch``). Before each batch ``decide(step, epoch, current_batch)`` (if given) returns the
    global batch to use. Batches are handed out in a FIFO of :class:`BatchRecord` that the step consuming
    them pops (:meth:`pop`); a new iteration started while some were served but never popped (a loop left
    early, a DataLoader's prefetch) rewinds to the first of them, so none is lost.

    Args:
        n: training-set size (examples), or a Sized data set.
        global_batch_size: the starting global batch B (examples over all ranks, >= world_size).
        rank, world_size: this rank and P (None: from the default process group).
        seed: the seed of the order (``scalesgd train --seed``).
    """

    def __init__(self, n: int | Sized, global_batch_size: int, *, rank: int | None = None,
                 world_size: int | None = None, seed: int = 0):
        n = n if isinstance(n, int) else len(n)
        if rank is None or world_size is None:
            if not dist.is_initialized():
                raise ConfigError("AdaptiveBatchSampler needs rank and world_size, or an initialized default "
                                  "process group (torch.distributed.init_process_group)")
            rank, world_size = dist.get_rank(), dist.get_world_size()
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
        if global_batch_size < world_size or global_batch_size > n:
            raise ConfigError(f"global_batch_size={global_batch_size} must be between the world size {world_size} "
                              f"(one example per rank) and the data set size {n}")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.stream = BatchStream(n, seed)
        self.cursor = Cursor()
        self.global_batch_size = int(global_batch_size)
        self.step = 0
        self.decide: Callable[[int, float, int], int] | None = None
        self.policy_state: Any = None  # owned by ``decide``'s owner; saved per batch so a rewind restores it
        self.served: list[BatchRecord] = []  # FIFO: served, not yet consumed by a step

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional), counting every served batch."""
        return self.cursor.epoch + self.cursor.offset / self.n

    def _next_batch(self) -> torch.Tensor:
        start_cursor, start_state, start_batch = self.cursor, self.policy_state, self.global_batch_size
        if self.decide is not None:
            self.global_batch_size = int(self.decide(self.step, self.epoch, self.global_batch_size))
        batch, nxt = self.stream.next(self.cursor, self.global_batch_size)
        indices = batch.indices
        if 0 < self.n - nxt.offset < self.world_size and nxt.epoch == self.cursor.epoch:
            batch, nxt = self.stream.next(self.cursor, self.n - self.cursor.offset)  # absorb a tail < P
            indices = batch.indices
        local = torch.tensor_split(indices, self.world_size)[self.rank]
        self.served.append(BatchRecord(step=self.step, epoch=self.epoch, policy_batch_size=self.global_batch_size,
                                       global_batch_size=int(indices.numel()), local_batch_size=int(local.numel()),
                                       cursor=start_cursor, batch_before=start_batch,
                                       policy_state=start_state))
        self.cursor = nxt
        self.step += 1
        return local

    def pop(self) -> BatchRecord:
        """The oldest served batch not yet consumed by a step (the one the current step trains on)."""
        if not self.served:
            raise RuntimeError("a training step ran without a batch from this sampler; draw every batch of the "
                               "loop from the DataLoader built on it")
        return self.served.pop(0)

    def rewind(self) -> None:
        """Forget the served batches no step consumed: the next batch is the first of them again."""
        if self.served:
            first = self.served[0]
            self.cursor, self.step, self.policy_state = first.cursor, first.step, first.policy_state
            self.global_batch_size = first.batch_before
            self.served.clear()

    def __iter__(self) -> Iterator[list[int]]:
        self.rewind()
        epoch = self.cursor.epoch
        while self.cursor.epoch == epoch:
            yield self._next_batch().tolist()

    def __len__(self) -> int:
        """Batches left in the current epoch at the current global batch (exact while the batch holds)."""
        left = self.n - self.cursor.offset
        return max(1, left // self.global_batch_size)


# --------------------------------------------------------------------------------------------------------
# Everything together


class AdaptiveBatch(torch.utils.data.Sampler):
    """The batch sampler, noise hook, batch-size policy and lr rule of ``scalesgd train`` for a DDP loop.

    Registers :func:`noise_hook` on ``model``, serves this rank's shards (use it as a DataLoader's
    ``batch_sampler``), and hooks ``optimizer.step``: before the step it sets every param group's lr to
    its initial lr times η(t)/η₀ from :func:`scalesgd.lr_rules.lr_terms` (rule, warm-up, schedule; AdaScale
    reads the smoothed ‖G‖² and tr Σ); after it, it folds the step's noise estimate into the EMA. Before
    each batch it asks the policy for the global batch, as the trainer does: with the step count, the
    epochs consumed, the current batch and the latest B̂_S.

    Args:
        model: the DistributedDataParallel model (no comm hook registered yet).
        dataset: the training set (its length is used) or its size n.
        optimizer: the optimizer whose lr to drive (its param groups' current lrs are the base rates η₀).
        global_batch_size: the starting global batch B₀ (examples over all ranks), also the lr rule's base.
        policy: ``"fixed"``, ``"diversity"`` or ``"schedule"`` (:func:`scalesgd.batch_policy.make_batch_policy`).
        policy_options: its options; for ``diversity`` the defaults are the trainer's: min_batch = B₀,
            max_batch = n (lower it to what fits in memory), and the policy's own warm-up and hysteresis
            (``min_steps``, ``patience_steps``, ...).
        lr_rule: ``constant``, ``linear``, ``sqrt`` or ``adascale`` (:class:`scalesgd.lr_rules.LrConfig`).
        lr_options: more LrConfig fields (``warmup_epochs``, ``schedule``, ``total_epochs``, ...).
        decay: the noise estimate's EMA decay.
        seed: seed of the example order.
    Raises:
        ConfigError: bad policy or lr options, a model that is not DDP, a starting batch outside [P, n].

    Attributes:
        hook: the :class:`NoiseHookState` (``ab.hook.estimate()``).
        sampler: the :class:`AdaptiveBatchSampler`.
        lr: η(t) of the last step for the first param group's base rate η₀ (every group gets its own initial
            lr times η(t)/η₀).
        last: the :class:`BatchRecord` of the last step.
    """

    def __init__(self, model: torch.nn.parallel.DistributedDataParallel, dataset: Sized | int, *,
                 optimizer: torch.optim.Optimizer, global_batch_size: int, policy: str = "diversity",
                 policy_options: dict[str, Any] | None = None, lr_rule: str = "constant",
                 lr_options: dict[str, Any] | None = None, decay: float = 0.99, seed: int = 0):
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ConfigError(f"AdaptiveBatch needs a torch.nn.parallel.DistributedDataParallel model, got "
                              f"{type(model).__name__}; wrap it first: model = DistributedDataParallel(model)")
        taken = sorted({"base_lr", "base_batch_size", "rule"} & set(lr_options or {}))
        if taken:
            raise ConfigError(f"lr_options may not set {', '.join(taken)}: the base lr is the optimizer's, the base "
                              f"batch is global_batch_size and the rule is lr_rule=")
        n = dataset if isinstance(dataset, int) else len(dataset)
        group = model.process_group
        self.sampler = AdaptiveBatchSampler(n, global_batch_size, rank=dist.get_rank(group),
                                            world_size=dist.get_world_size(group), seed=seed)
        options = dict(policy_options or {})
        if policy == "diversity":
            options.setdefault("min_batch", global_batch_size)
            options.setdefault("max_batch", n)
        elif policy == "fixed":
            options.setdefault("global_batch_size", global_batch_size)
        self.policy: BatchPolicy = make_batch_policy(policy, **options)
        self.sampler.policy_state = self.policy.init_state()
        self.sampler.decide = self._decide
        self.optimizer = optimizer
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.lr_config = LrConfig(base_lr=self.base_lrs[0], base_batch_size=global_batch_size, rule=lr_rule,
                                  **(lr_options or {}))
        self.hook = register_noise_hook(model, local_batch_source=self._step_started, n_train=n, decay=decay)
        self.lr = self.lr_config.base_lr
        self.last: BatchRecord | None = None
        self._current: BatchRecord | None = None
        self._estimate: dict[str, float] = self.hook.estimate()
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    # sampler protocol: DataLoader(dataset, batch_sampler=ab)
    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def global_batch_size(self) -> int:
        """The global batch the policy asked for last (examples over all ranks)."""
        return self.sampler.global_batch_size

    def estimate(self) -> dict[str, float]:
        """The smoothed noise estimates after the last step (see :meth:`NoiseHookState.estimate`)."""
        return self.hook.estimate()

    def _decide(self, step: int, epoch: float, current: int) -> int:
        est = self.hook.estimate()
        decision, self.sampler.policy_state = self.policy.next(self.sampler.policy_state, StepObservation(
            step=step, epoch=epoch, global_batch_size=current, batch_bound_est=est["batch_bound_est"],
            world_size=self.sampler.world_size))
        return decision.global_batch_size

    def _step_started(self) -> int:
        """The hook's local-batch source: the first synced backward on a batch takes it off the FIFO."""
        self.hook.finish_step()  # the previous step's estimate, before the lr of this one is set
        self._estimate = self.hook.estimate()
        self._current = self.sampler.pop()
        return self._current.local_batch_size

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        rec = self._current
        if rec is None:
            raise RuntimeError("optimizer.step() ran without a synced backward on a batch from AdaptiveBatch; "
                               "call loss.backward() on the DDP model's output before each step")
        terms = lr_terms(self.lr_config, step=rec.step, epoch=rec.epoch, global_batch_size=rec.policy_batch_size,
                         grad_sq_norm_est=_none_if_nan(self._estimate["grad_sq_norm_est"]),
                         trace_cov_est=_none_if_nan(self._estimate["trace_cov_est"]))
        self.lr = terms.lr
        factor = terms.lr / self.lr_config.base_lr
        for group, base in zip(optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.hook.finish_step()
        self.last, self._current = self._current, None


def _none_if_nan(x: float) -> float | None:
    return None if not math.isfinite(x) else x
