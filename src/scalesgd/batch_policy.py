"""Batch-size policies: what global batch size the next step should use.

A policy is a frozen dataclass of options with two pure methods::

    policy = make_batch_policy("diversity", delta=0.5, max_batch=n_train)
    state = policy.init_state()
    # after every optimizer step:
    decision, state = policy.next(state, StepObservation(step=..., epoch=..., global_batch_size=...,
                                                         batch_bound_est=..., world_size=...))
    # decision.global_batch_size is the batch for the next step; log decision.reason when decision.changed

Nothing is hidden: the policy keeps its memory in the returned :class:`BatchPolicyState`, so the same
(state, observation) always gives the same (decision, state), and a checkpoint only needs the state.

Policies (see :data:`BATCH_POLICIES`):

- ``fixed``: the configured global batch, always.
- ``diversity``: target B = δ·B̂_S + 1 from the online estimate B̂_S = n·Δ̂ of the gradient-diversity
  batch-size bound (Yin et al., AISTATS 2018, arXiv 1706.05699), with clipping, rounding to a multiple of
  the worker count, a warm-up and hysteresis.
- ``schedule``: a user-given piecewise-constant epoch → batch schedule, "don't decay the learning rate,
  increase the batch size" (Smith, Kindermans, Ying, Le 2017, arXiv 1711.00489).
- ``goodput``: the batch that maximises throughput × statistical efficiency (Pollux), in
  :mod:`scalesgd.goodput` (which imports this module, so it is built here by a deferred import).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Protocol

from scalesgd.errors import ConfigError


@dataclass(frozen=True)
class StepObservation:
    """What the trainer knows after an optimizer step, as the policy sees it.

    Attributes:
        step: optimizer steps completed so far (the step the decision will apply to is ``step``, 0-based).
        epoch: epochs of training data consumed so far, fractional (examples seen / n_train).
        global_batch_size: the global batch the last step used (examples summed over all workers).
        batch_bound_est: the trainer's smoothed estimate of B_S = n·Δ_S = tr Σ/‖G‖² + 1 (examples), or
            None / NaN while there is none yet.
        world_size: number of data-parallel workers P; every global batch must be a multiple of it.
    """

    step: int
    epoch: float
    global_batch_size: int
    batch_bound_est: float | None
    world_size: int

    def __post_init__(self):
        if self.step < 0:
            raise ValueError(f"step must be >= 0, got {self.step}")
        if not (self.epoch >= 0):
            raise ValueError(f"epoch must be >= 0, got {self.epoch}")
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")


@dataclass(frozen=True)
class BatchDecision:
    """The global batch size for the next step, whether it differs from the last one, and why (for logs)."""

    global_batch_size: int
    changed: bool
    reason: str


@dataclass(frozen=True)
class BatchPolicyState:
    """Everything a policy remembers between steps.

    Attributes:
        n_estimates: steps so far that came with a usable ``batch_bound_est`` (counts toward warm-up).
        last_change_step: ``step`` of the last observation that changed the batch, or None.
        n_changes: how many times the policy changed the batch.
        pending_direction: +1 / −1 while the target has stayed above / below the hysteresis band on
            consecutive usable estimates, else 0.
        pending_count: how many consecutive usable estimates it has stayed there.
    """

    n_estimates: int = 0
    last_change_step: int | None = None
    n_changes: int = 0
    pending_direction: int = 0
    pending_count: int = 0


class BatchPolicy(Protocol):
    """``init_state() -> state``; ``next(state, obs) -> (decision, state)``, both pure."""

    name: str

    def init_state(self) -> BatchPolicyState: ...

    def next(self, state: BatchPolicyState, obs: StepObservation) -> tuple[BatchDecision, BatchPolicyState]: ...


def legal_batch_size(target: float, *, world_size: int, min_batch: int = 1, max_batch: int | None = None,
                     max_batch_memory: int | None = None) -> int:
    """The multiple of ``world_size`` nearest to ``target`` within the limits.

    Lower limit: max(min_batch, world_size), rounded up to a multiple of P. Upper limit:
    min(max_batch, max_batch_memory), rounded down to a multiple of P. If the two cross, the upper limit
    wins (memory and the user's maximum are hard limits; the minimum is a preference), but the result is
    never below P: one example per worker is the smallest batch a synchronous step can take.

    Args:
        target: the wanted global batch size (examples, any positive float).
        world_size: number of workers P.
        min_batch, max_batch: the user's limits on the global batch (max_batch None = none).
        max_batch_memory: the largest global batch that fits in memory (None = no cap).
    Returns:
        A global batch size that is a positive multiple of ``world_size``.
    Raises:
        ConfigError: if max_batch or max_batch_memory is below P, so no legal batch exists.
    """
    p = world_size
    for limit_name, limit in (("max_batch", max_batch), ("max_batch_memory", max_batch_memory)):
        if limit is not None and limit < p:
            raise ConfigError(
                f"{limit_name}={limit} is below the worker count {p}, so no global batch of at least one example "
                f"per worker fits; raise {limit_name} to at least {p} or use fewer workers")
    lower = -(-max(min_batch, p) // p) * p
    upper_limits = [lim for lim in (max_batch, max_batch_memory) if lim is not None]
    upper = (min(upper_limits) // p) * p if upper_limits else None
    if not math.isfinite(target):
        raise ValueError(f"target batch size must be finite, got {target}")
    # Half rounds up: the bound is an upper estimate of what is useful, so this errs towards parallelism.
    rounded = int(math.floor(target / p + 0.5)) * p
    rounded = max(rounded, lower)
    if upper is not None:
        rounded = min(rounded, upper)
    return max(rounded, p)


def _usable(estimate: float | None) -> bool:
    """A batch-bound estimate the policy may act on: finite and positive (B_S ≥ 1 in exact arithmetic)."""
    return estimate is not None and math.isfinite(estimate) and estimate > 0


@dataclass(frozen=True)
class FixedPolicy:
    """Always the configured global batch.

    Args:
        global_batch_size: the batch to use; None keeps whatever the trainer started with. It is returned
            verbatim (divisibility by P is the trainer's config check, not silently fixed here).
    """

    global_batch_size: int | None = None
    name: str = field(default="fixed", init=False)

    def __post_init__(self):
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"fixed batch policy: global_batch_size must be >= 1, got {self.global_batch_size}")

    def init_state(self) -> BatchPolicyState:
        return BatchPolicyState()

    def next(self, state: BatchPolicyState, obs: StepObservation) -> tuple[BatchDecision, BatchPolicyState]:
        batch = obs.global_batch_size if self.global_batch_size is None else self.global_batch_size
        changed = batch != obs.global_batch_size
        if changed:
            state = replace(state, last_change_step=obs.step, n_changes=state.n_changes + 1)
        return BatchDecision(batch, changed, "fixed"), state


@dataclass(frozen=True)
class DiversityPolicy:
    """Follow the gradient-diversity batch-size bound: B_target = δ·B̂_S + 1.

    Yin et al. (2018), with B_S = n·Δ_S: sampling B examples, E‖Σ g‖² = B·M2·(1 + (B−1)/B_S), so with
    B ≤ δ·B_S + 1 the noise term grows by at most a factor (1+δ), and minibatch SGD needs at most (1+δ)×
    the gradient evaluations of serial SGD. δ is that allowed inflation.

    Default δ = 0.5: at most 1.5× the serial sample count (statistical efficiency ≥ 2/3). Since
    n·Δ = B_simple + 1 (McCandlish et al. 2018), δ = 1 is about their critical batch B_crit ≈ B_noise, the
    knee where steps and examples are each 2× their minimum. The estimate is noisy and B_S falls sharply
    mid-training (≈265 → ≈30 in the paper's ResNet), and the hysteresis band lets the batch sit up to
    ``rel_threshold`` above target; δ = 0.5 with the 25% band keeps the effective inflation (≈0.6) below
    the knee.

    The target is clipped to [min_batch, max_batch] and rounded to a
    multiple of P (never below P); see :func:`legal_batch_size`. The batch changes only when

    - at least ``min_steps`` observations have carried a usable estimate (warm-up), and
    - at least ``min_interval_steps`` steps passed since the last change, and
    - the legal target lies outside the relative band around the current batch,
      target > current·(1+θ) or target < current/(1+θ), θ = ``rel_threshold`` (symmetric in log scale),
      on the same side for ``patience_steps`` consecutive usable estimates.

    The band alone does not stop thrashing: after a change the batch sits at a noisy target, and the next
    estimate on the other side of the true value leaves the band again (with 12% estimate noise and a 25%
    band that is a change on ~18% of steps). Requiring persistence makes an excursion caused by noise
    exponentially unlikely, and an estimate that oscillates across the band edge never changes the batch.

    A current batch that is itself illegal (above max_batch, below min_batch, not a
    multiple of P, e.g. after resuming on another worker count) is corrected at once, ignoring warm-up and
    hysteresis.

    Args:
        delta: allowed noise-term inflation δ > 0.
        min_batch, max_batch: limits on the global batch (max_batch None = none; the trainer should pass
            n_train, since the bound grows without limit as ‖G‖ → 0 near a minimum).
        rel_threshold: hysteresis band θ ≥ 0.
        patience_steps: consecutive out-of-band estimates (same side) needed for a change (≥ 1).
        min_interval_steps: fewest steps between two changes (≥ 0).
        min_steps: usable estimates needed before the first change (≥ 0); the smoothed estimate needs a
            horizon of the order of its EMA window to settle.
    """

    delta: float = 0.5
    min_batch: int = 1
    max_batch: int | None = None
    rel_threshold: float = 0.25
    patience_steps: int = 10
    min_interval_steps: int = 100
    min_steps: int = 100
    name: str = field(default="diversity", init=False)

    def __post_init__(self):
        if not (math.isfinite(self.delta) and self.delta > 0):
            raise ConfigError(f"diversity batch policy: delta must be a finite number > 0 (e.g. 0.5), "
                              f"got {self.delta}")
        if self.min_batch < 1:
            raise ConfigError(f"diversity batch policy: min_batch must be >= 1, got {self.min_batch}")
        if self.max_batch is not None and self.max_batch < self.min_batch:
            raise ConfigError(f"diversity batch policy: max_batch={self.max_batch} is below "
                              f"min_batch={self.min_batch}; raise max_batch or lower min_batch")
        if not (math.isfinite(self.rel_threshold) and self.rel_threshold >= 0):
            raise ConfigError(f"diversity batch policy: rel_threshold must be >= 0 (e.g. 0.25 for a 25% band), "
                              f"got {self.rel_threshold}")
        if self.patience_steps < 1:
            raise ConfigError(f"diversity batch policy: patience_steps must be >= 1 (1 = act on the first "
                              f"out-of-band estimate), got {self.patience_steps}")
        if self.min_interval_steps < 0:
            raise ConfigError(f"diversity batch policy: min_interval_steps must be >= 0, "
                              f"got {self.min_interval_steps}")
        if self.min_steps < 0:
            raise ConfigError(f"diversity batch policy: min_steps must be >= 0, got {self.min_steps}")

    def init_state(self) -> BatchPolicyState:
        return BatchPolicyState()

    def target(self, batch_bound_est: float) -> float:
        """The unclipped target δ·B̂_S + 1 (examples)."""
        return self.delta * batch_bound_est + 1.0

    def next(self, state: BatchPolicyState, obs: StepObservation) -> tuple[BatchDecision, BatchPolicyState]:
        current = obs.global_batch_size
        usable = _usable(obs.batch_bound_est)
        if usable:
            state = replace(state, n_estimates=state.n_estimates + 1)
        limits = dict(world_size=obs.world_size, min_batch=self.min_batch, max_batch=self.max_batch)
        ready = usable and state.n_estimates >= self.min_steps

        legal_current = legal_batch_size(current, **limits)
        if legal_current != current:
            new = legal_batch_size(self.target(obs.batch_bound_est), **limits) if ready else legal_current
            reason = f"forced: batch {current} is outside the limits ({_describe_limits(obs, self)}) -> {new}"
            return self._change(state, obs, new, reason)

        if not usable:
            return BatchDecision(current, False, "hold: no batch-bound estimate yet"), state
        if not ready:
            return BatchDecision(current, False, f"hold: warm-up ({state.n_estimates}/{self.min_steps} "
                                                 f"estimates)"), state

        raw = self.target(obs.batch_bound_est)
        new = legal_batch_size(raw, **limits)
        what = f"B_S_est={obs.batch_bound_est:.1f}, target {self.delta:g}*B_S+1={raw:.1f} -> {new}"
        if new > current * (1.0 + self.rel_threshold):
            direction, verb = 1, "grow"
        elif new * (1.0 + self.rel_threshold) < current:
            direction, verb = -1, "shrink"
        else:
            state = replace(state, pending_direction=0, pending_count=0)
            reason = f"hold: {what} within {self.rel_threshold:.0%} of {current}"
            return BatchDecision(current, False, reason), state
        count = state.pending_count + 1 if direction == state.pending_direction else 1
        state = replace(state, pending_direction=direction, pending_count=count)
        if count < self.patience_steps:
            return BatchDecision(current, False, f"hold: {verb} pending ({count}/{self.patience_steps}): "
                                                 f"{what}"), state
        since = None if state.last_change_step is None else obs.step - state.last_change_step
        if since is not None and since < self.min_interval_steps:
            return BatchDecision(current, False, f"hold: {verb} pending, last change {since} steps ago "
                                                 f"(< {self.min_interval_steps}): {what}"), state
        return self._change(state, obs, new, f"{verb}: {what}")

    @staticmethod
    def _change(state: BatchPolicyState, obs: StepObservation, new: int,
                reason: str) -> tuple[BatchDecision, BatchPolicyState]:
        state = replace(state, last_change_step=obs.step, n_changes=state.n_changes + 1, pending_direction=0,
                        pending_count=0)
        return BatchDecision(new, new != obs.global_batch_size, reason), state


def _describe_limits(obs: StepObservation, policy: DiversityPolicy) -> str:
    parts = [f"multiple of P={obs.world_size}", f"min_batch={policy.min_batch}"]
    if policy.max_batch is not None:
        parts.append(f"max_batch={policy.max_batch}")
    return ", ".join(parts)


Schedule = tuple[tuple[float, int], ...]


def parse_schedule(text: str) -> Schedule:
    """Parse an epoch → global batch schedule such as ``"0:128,5:256,10:512"``.

    Each comma-separated entry is ``EPOCH:BATCH``: from epoch EPOCH on (epochs of data consumed, fractional
    allowed, e.g. ``2.5``) use global batch BATCH. Epochs must be >= 0 and strictly increasing; batches
    are integers >= 1. Before the first epoch key the trainer's own batch stays in force.

    Returns:
        ((epoch, batch), ...) in increasing epoch order.
    Raises:
        ConfigError: naming the bad entry and the expected form.
    """
    example = "e.g. '0:128,5:256,10:512' (epoch:batch, epochs increasing)"
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"empty batch schedule; give comma-separated epoch:batch pairs, {example}")
    entries: list[tuple[float, int]] = []
    for raw in text.split(","):
        item = raw.strip()
        parts = item.split(":")
        if len(parts) != 2:
            raise ConfigError(f"batch schedule entry {item!r} is not of the form epoch:batch; {example}")
        epoch_text, batch_text = parts[0].strip(), parts[1].strip()
        try:
            epoch = float(epoch_text)
        except ValueError:
            raise ConfigError(f"batch schedule entry {item!r}: epoch {epoch_text!r} is not a number; "
                              f"{example}") from None
        try:
            batch = int(batch_text)
        except ValueError:
            raise ConfigError(f"batch schedule entry {item!r}: batch {batch_text!r} is not an integer; "
                              f"{example}") from None
        entries.append((epoch, batch))
    return validate_schedule(entries)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_schedule(entries) -> Schedule:
    """Check a sequence of (epoch, batch) pairs and return it as a tuple; see :func:`parse_schedule`."""
    out: list[tuple[float, int]] = []
    for epoch, batch in entries:
        if not (_is_number(epoch) and math.isfinite(epoch) and epoch >= 0):
            raise ConfigError(f"batch schedule: epoch {epoch} must be a finite number >= 0")
        if not (_is_number(batch) and math.isfinite(batch) and int(batch) == batch and batch >= 1):
            raise ConfigError(f"batch schedule: batch {batch} at epoch {epoch:g} must be an integer >= 1")
        if out and epoch <= out[-1][0]:
            raise ConfigError(f"batch schedule: epochs must be strictly increasing, but {epoch:g} follows "
                              f"{out[-1][0]:g}; list the entries in increasing epoch order without repeats")
        out.append((float(epoch), int(batch)))
    if not out:
        raise ConfigError("batch schedule is empty; give at least one epoch:batch pair, e.g. '0:128'")
    return tuple(out)


def scheduled_batch_size(schedule: Schedule, epoch: float) -> int | None:
    """The batch of the last entry whose epoch key is <= ``epoch``, or None before the first key."""
    batch = None
    for key, value in schedule:
        if key <= epoch:
            batch = value
        else:
            break
    return batch


@dataclass(frozen=True)
class SchedulePolicy:
    """A piecewise-constant epoch → global batch schedule (Smith et al. 2017: grow B instead of decaying η).

    The scheduled batch is rounded to a multiple of P (see :func:`legal_batch_size`); the reason string says
    when that changed the user's number.

    Args:
        schedule: a string for :func:`parse_schedule` or a sequence of (epoch, batch) pairs.
    """

    schedule: Schedule | str
    name: str = field(default="schedule", init=False)

    def __post_init__(self):
        if isinstance(self.schedule, str):
            value = parse_schedule(self.schedule)
        else:
            value = validate_schedule(self.schedule)
        object.__setattr__(self, "schedule", value)

    def init_state(self) -> BatchPolicyState:
        return BatchPolicyState()

    def next(self, state: BatchPolicyState, obs: StepObservation) -> tuple[BatchDecision, BatchPolicyState]:
        wanted = scheduled_batch_size(self.schedule, obs.epoch)
        if wanted is None:
            reason = f"schedule: before epoch {self.schedule[0][0]:g}, keep {obs.global_batch_size}"
            return BatchDecision(obs.global_batch_size, False, reason), state
        new = legal_batch_size(wanted, world_size=obs.world_size)
        reason = f"schedule: epoch {obs.epoch:.2f} -> {wanted}"
        if new != wanted:
            reason += f" (legalised to {new}: multiple of P={obs.world_size})"
        changed = new != obs.global_batch_size
        if changed:
            state = replace(state, last_change_step=obs.step, n_changes=state.n_changes + 1)
        return BatchDecision(new, changed, reason), state


# name -> policy class; options are the class's keyword arguments.
BATCH_POLICIES: dict[str, Callable[..., BatchPolicy]] = {
    "fixed": FixedPolicy,
    "diversity": DiversityPolicy,
    "schedule": SchedulePolicy,
}
# Every policy the trainer offers: the above, and goodput (scalesgd.goodput imports this module, so it cannot be
# in the dict without an import cycle; make_batch_policy builds it through a deferred import).
BATCH_POLICY_NAMES: tuple[str, ...] = (*BATCH_POLICIES, "goodput")


def run_batch_policy(name: str, *, global_batch_size: int, n_train: int, delta: float = 0.5,
                     min_batch: int | None = None, max_batch: int | None = None,
                     schedule: Schedule | str | None = None, base_batch_size: int | None = None) -> BatchPolicy:
    """The batch-size policy of a training run, from its command-line options.

    ``diversity`` never asks for more than the data set (``max_batch`` defaults to, and is capped at,
    ``n_train``). Without ``min_batch`` its floor is the starting global batch: it grows the batch when
    δ·B̂_S + 1 rises above it and never shrinks below it. Why: wall time to a target is
    T(B) ∝ (1 + B_noise/B)·(t0 + c·B) (steps from McCandlish et al. 2018 times an affine step time), least at
    B* = √(B_h·B_noise) with B_h = t0/c, the batch whose per-example cost equals the fixed per-step cost
    (all-reduce latency, launches, Python). The δ-bound counts examples only, so it sits below B* whenever
    B_h > δ²·B_noise, and the policy has no throughput model to tell. The starting batch is the one the user
    picked for the hardware and tuned the lr at, so, as Pollux does (AdaptDL's goodput optimiser searches
    [init_batch_size, max_batch_size] only), it is the floor; ``bench/time_to_accuracy.py`` measures the
    effect. Pass ``min_batch`` to let it shrink (worth it where the per-step overhead is small next to
    per-example compute).

    ``goodput`` has a throughput model, so it needs no floor: it searches [min_batch or P, min(max_batch,
    n_train)] and its efficiency is relative to B₀ = ``base_batch_size`` or the starting batch (the lr rule's
    B₀, so the lr it implies is the one the AdaScale rule then uses).

    Args:
        name: one of :data:`BATCH_POLICY_NAMES`.
        global_batch_size: the starting global batch (examples).
        n_train: training-set size.
        delta, min_batch, max_batch: the diversity (and goodput) policy's options (None: the defaults above).
        schedule: the schedule policy's epoch → batch schedule.
        base_batch_size: goodput's B₀ (None: the starting batch).
    Raises:
        ConfigError: as :func:`make_batch_policy`.
    """
    if name == "goodput":
        return make_batch_policy("goodput", min_batch=min_batch or 1, max_batch=min(max_batch or n_train, n_train),
                                 n_train=n_train, base_batch_size=base_batch_size or global_batch_size)
    if name == "diversity":
        top = min(max_batch or n_train, n_train)
        return make_batch_policy("diversity", delta=delta, min_batch=min_batch or min(global_batch_size, top),
                                 max_batch=top)
    if name == "schedule":
        return make_batch_policy("schedule", schedule=schedule)
    return make_batch_policy("fixed", global_batch_size=global_batch_size)


def make_batch_policy(name: str, **options) -> BatchPolicy:
    """Build the batch-size policy ``name`` with its options.

    Args:
        name: a key of :data:`BATCH_POLICIES` (``fixed``, ``diversity``, ``schedule``).
        options: the policy's keyword arguments, e.g. ``delta=0.5, max_batch=60000`` for ``diversity`` or
            ``schedule="0:128,5:256"`` for ``schedule``.
    Raises:
        ConfigError: unknown name or option, or an invalid option value.
    """
    if name == "goodput":
        from scalesgd.goodput import make_goodput_policy

        return make_goodput_policy(**options)
    if name not in BATCH_POLICIES:
        raise ConfigError(f"unknown batch policy {name!r}; choose one of {', '.join(sorted(BATCH_POLICY_NAMES))}")
    cls = BATCH_POLICIES[name]
    allowed = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"batch policy {name!r} has no option(s) {', '.join(unknown)}; "
                          f"its options are: {', '.join(sorted(allowed)) or 'none'}")
    if name == "schedule" and "schedule" not in options:
        raise ConfigError("batch policy 'schedule' needs schedule=..., e.g. '0:128,5:256,10:512' (epoch:batch)")
    return cls(**options)
