"""Learning-rate rules for large and changing batch sizes, and the base schedules multiplied into them.

    η(t) = η₀ · warm(t, rule factor) · schedule(t)

- rule factor (how η follows the global batch B relative to the base batch B₀, S = B/B₀):
  ``constant`` 1; ``linear`` S (Goyal et al. 2017, arXiv 1706.02677); ``sqrt`` √S;
  ``adascale`` the AdaScale gain r (Johnson et al. 2020, arXiv 2007.05105; petuum/adaptdl).
- warm-up (Goyal's gradual warm-up): over the first ``warmup_steps`` steps (or ``warmup_epochs`` epochs)
  the factor ramps linearly to the rule's factor k from min(1, k/10): from η₀, the base-batch rate, as
  Goyal et al. do, when that is at most a tenth of the target rate, else from a tenth of it, so warm-up
  also ramps when the rule leaves the rate at η₀ (``constant``, or ``linear`` at B = B₀).
- base schedule: ``constant`` 1; ``cosine`` f + (1−f)·½(1 + cos(π t/T)); ``step`` γ^(milestones passed).

Every function here is pure. The trainer builds one :class:`LrConfig` at start-up and calls
:func:`learning_rate` (or :func:`lr_terms`, which also returns the parts for logging) every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scalesgd.errors import ConfigError

if TYPE_CHECKING:
    from scalesgd.config import RunConfig

LR_RULES = ("constant", "linear", "sqrt", "adascale")
BASE_SCHEDULES = ("constant", "cosine", "step")


def linear_scale(global_batch_size: int, base_batch_size: int) -> float:
    """Linear-scaling factor S = B/B₀ (Goyal et al. 2017): η = η₀·B/B₀."""
    return global_batch_size / base_batch_size


def sqrt_scale(global_batch_size: int, base_batch_size: int) -> float:
    """Square-root-scaling factor √(B/B₀): η = η₀·√(B/B₀) (keeps the update's noise variance fixed)."""
    return math.sqrt(global_batch_size / base_batch_size)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def adascale_gain(mean_grad_sq_norm: float | None, trace_cov: float | None, global_batch_size: int,
                  base_batch_size: int) -> float:
    """AdaScale gain r for the scale S = B/B₀.

    r = (σ₀² + ‖G‖²) / (σ₀²/S + ‖G‖²),  σ₀² = tr Σ / B₀,

    where G is the mean gradient over the training set, Σ the per-example gradient covariance and σ₀² the
    variance of a base-batch (B₀) minibatch gradient (AdaScale's σ², AdaptDL's ``var_avg``; REFERENCES
    §4 writes the formula with B₀ = 1). Equivalently, with B_noise = tr Σ/‖G‖²,
    r = S·(B_noise + B₀)/(B_noise + B).

    Negative estimates (unbiased estimators can dip below zero) are clamped to 0 first; the result is
    clipped to [min(1, S), max(1, S)]. Missing or non-finite estimates, or both zero, give r = 1.

    Args:
        mean_grad_sq_norm: smoothed estimate of ‖G‖² (squared norm of the mean gradient, not of the sum).
        trace_cov: smoothed estimate of tr Σ (per-example covariance, i.e. per-example variance).
        global_batch_size, base_batch_size: B and B₀ (examples).
    Returns:
        The gain r: 1 at S = 1, → S when tr Σ dominates, → 1 when ‖G‖² dominates.
    """
    scale = global_batch_size / base_batch_size
    if not (_finite(mean_grad_sq_norm) and _finite(trace_cov)):
        return 1.0
    sqr = max(mean_grad_sq_norm, 0.0)
    var = max(trace_cov, 0.0) / base_batch_size
    if sqr == 0.0 and var == 0.0:
        return 1.0
    gain = (var + sqr) / (var / scale + sqr)
    return min(max(gain, min(1.0, scale)), max(1.0, scale))


def statistical_efficiency(mean_grad_sq_norm: float | None, trace_cov: float | None, global_batch_size: int,
                           base_batch_size: int) -> float:
    """AdaScale/Pollux statistical efficiency r/S: progress per example at B relative to B₀.

    Equals (B_noise + B₀)/(B_noise + B) with B_noise = tr Σ/‖G‖² (McCandlish et al. 2018). Missing
    estimates give r = 1, so 1/S: the pessimistic reading (no gain from the larger batch).
    """
    scale = global_batch_size / base_batch_size
    return adascale_gain(mean_grad_sq_norm, trace_cov, global_batch_size, base_batch_size) / scale


WARMUP_START_FRACTION = 0.1  # warm-up starts at no more than this fraction of the rate it ramps to


def warmup_factor(rule_factor: float, progress: float) -> float:
    """Gradual warm-up: a linear ramp from s = min(1, k·WARMUP_START_FRACTION) to k = ``rule_factor``,
    s + (k − s)·min(1, progress).

    Goyal et al. (2017, arXiv 1706.02677 §2.2) ramp from η₀ to k·η₀, which for k ≥ 10 starts at no more
    than a tenth of the target; for smaller k (and k = 1, where their ramp is no ramp at all) the ramp
    starts at a tenth of the target instead, so warm-up always starts small.

    Args:
        rule_factor: k, the lr rule's factor (the target rate is η₀·k), > 0.
        progress: t/T_warmup ∈ [0, ∞); at 0 the factor is s, at >= 1 it is k.
    """
    start = min(1.0, rule_factor * WARMUP_START_FRACTION)
    return start + (rule_factor - start) * min(1.0, max(0.0, progress))


def cosine_factor(progress: float, final_lr_fraction: float = 0.0) -> float:
    """Cosine decay f + (1 − f)·½(1 + cos(π·min(1, progress))): 1 at the start, f at the end and after."""
    p = min(1.0, max(0.0, progress))
    return final_lr_fraction + (1.0 - final_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * p))


def step_factor(t: float, milestones: tuple[float, ...], gamma: float) -> float:
    """Step decay γ^k, k = number of milestones ≤ t (a milestone takes effect when reached)."""
    return gamma ** sum(1 for m in milestones if m <= t)


@dataclass(frozen=True)
class LrConfig:
    """How the learning rate follows the batch size and time. Validated on construction.

    Attributes:
        base_lr: η₀, the rate tuned for the base batch B₀ (> 0).
        base_batch_size: B₀ (examples, >= 1), usually the starting global batch.
        rule: one of :data:`LR_RULES`.
        schedule: one of :data:`BASE_SCHEDULES`.
        warmup_steps / warmup_epochs: warm-up length, in steps or in epochs (at most one > 0).
        total_steps / total_epochs: the cosine horizon T (cosine needs exactly one; others ignore it).
        final_lr_fraction: cosine floor f ∈ [0, 1]: the schedule ends at f·(rule rate).
        milestone_steps / milestone_epochs: step-decay milestones (step needs exactly one non-empty),
            strictly increasing and > 0.
        gamma: step-decay factor per milestone (> 0, usually 0.1).

    With a batch that changes during training, epochs are the natural time axis: steps per epoch change.
    """

    base_lr: float
    base_batch_size: int
    rule: str = "linear"
    schedule: str = "constant"
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    total_steps: int | None = None
    total_epochs: float | None = None
    final_lr_fraction: float = 0.0
    milestone_steps: tuple[int, ...] = ()
    milestone_epochs: tuple[float, ...] = ()
    gamma: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "milestone_steps", tuple(self.milestone_steps))
        object.__setattr__(self, "milestone_epochs", tuple(self.milestone_epochs))
        if not (math.isfinite(self.base_lr) and self.base_lr > 0):
            raise ConfigError(f"base_lr must be a finite number > 0, got {self.base_lr}")
        if self.base_batch_size < 1:
            raise ConfigError(f"base_batch_size must be >= 1, got {self.base_batch_size}")
        if self.rule not in LR_RULES:
            raise ConfigError(f"unknown learning-rate rule {self.rule!r}; choose one of {', '.join(LR_RULES)}")
        if self.schedule not in BASE_SCHEDULES:
            raise ConfigError(f"unknown learning-rate schedule {self.schedule!r}; choose one of "
                              f"{', '.join(BASE_SCHEDULES)}")
        if self.warmup_steps < 0 or not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ConfigError(f"warm-up length must be >= 0, got warmup_steps={self.warmup_steps}, "
                              f"warmup_epochs={self.warmup_epochs}")
        if self.warmup_steps > 0 and self.warmup_epochs > 0:
            raise ConfigError("give the warm-up in steps or in epochs, not both: set warmup_steps=0 or "
                              "warmup_epochs=0")
        if self.schedule == "cosine":
            given = [x for x in (self.total_steps, self.total_epochs) if x is not None]
            if len(given) != 1:
                raise ConfigError("the cosine schedule needs its length: give exactly one of total_steps or "
                                  "total_epochs")
        for name in ("total_steps", "total_epochs"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be > 0, got {value}")
        if not (0.0 <= self.final_lr_fraction <= 1.0):
            raise ConfigError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if self.final_lr_fraction != 0.0 and self.schedule != "cosine":
            raise ConfigError(f"final_lr_fraction applies only to schedule='cosine', not {self.schedule!r}; "
                              "remove it or use the cosine schedule")
        if self.schedule == "step":
            if bool(self.milestone_steps) == bool(self.milestone_epochs):
                raise ConfigError("the step schedule needs milestones: give exactly one of milestone_steps or "
                                  "milestone_epochs, e.g. milestone_epochs=(30, 60, 80)")
            milestones = self.milestone_steps or self.milestone_epochs
            if any(not (math.isfinite(m) and m > 0) for m in milestones) or any(
                    b <= a for a, b in zip(milestones, milestones[1:])):
                raise ConfigError(f"milestones must be > 0 and strictly increasing, got {milestones}")
            if not (math.isfinite(self.gamma) and self.gamma > 0):
                raise ConfigError(f"gamma must be a finite number > 0 (e.g. 0.1), got {self.gamma}")
        elif self.milestone_steps or self.milestone_epochs:
            raise ConfigError(f"milestones apply only to schedule='step', not {self.schedule!r}; remove them or "
                              "use the step schedule")

    @classmethod
    def from_run_config(cls, cfg: RunConfig, base_lr: float | None = None) -> LrConfig:
        """The rule and base schedule of a training run: B₀ is ``--base-batch-size`` or the starting global
        batch; cosine spans the whole run (its steps, or else its epochs); step decay uses the epoch
        milestones; the rule is ``cfg.effective_lr_rule``. ``base_lr`` overrides ``cfg.lr`` (with
        ``--lr auto`` the trainer passes the rate its range test found; before that it builds the config
        with a placeholder, see :func:`scalesgd.run.preflight`). Raises :class:`ConfigError` as the
        constructor does."""
        cosine = cfg.lr_schedule == "cosine"
        return cls(base_lr=cfg.lr if base_lr is None else base_lr,
                   base_batch_size=cfg.base_batch_size or cfg.global_batch_size,
                   rule=cfg.effective_lr_rule, schedule=cfg.lr_schedule, warmup_epochs=cfg.warmup_epochs,
                   total_steps=cfg.steps if cosine and cfg.steps else None,
                   total_epochs=cfg.epochs if cosine and not cfg.steps else None,
                   milestone_epochs=cfg.lr_milestones if cfg.lr_schedule == "step" else (),
                   gamma=cfg.lr_gamma)


@dataclass(frozen=True)
class LrTerms:
    """One step's learning rate and its parts, for logging.

    lr = base_lr · warmed_factor · schedule_factor; warmed_factor ramps to rule_factor (:func:`warmup_factor`).
    gain and efficiency are the AdaScale r and r/S (r = 1 when the estimates are missing).
    """

    lr: float
    rule_factor: float
    warmed_factor: float
    schedule_factor: float
    gain: float
    efficiency: float


def lr_terms(cfg: LrConfig, *, step: int, epoch: float, global_batch_size: int,
             grad_sq_norm_est: float | None = None, trace_cov_est: float | None = None) -> LrTerms:
    """The learning rate for the step about to run, with its parts.

    Args:
        cfg: the rule, schedule and their options.
        step: optimizer steps completed before this one (0 for the first step).
        epoch: epochs of data consumed before this step (fractional).
        global_batch_size: B for this step (examples over all workers).
        grad_sq_norm_est, trace_cov_est: smoothed ‖G‖² and per-example tr Σ (used by ``adascale`` only;
            None early on).
    Returns:
        :class:`LrTerms`; ``.lr`` is η(t).
    """
    if step < 0 or not (epoch >= 0):
        raise ValueError(f"step and epoch must be >= 0, got step={step}, epoch={epoch}")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    b, b0 = global_batch_size, cfg.base_batch_size
    gain = adascale_gain(grad_sq_norm_est, trace_cov_est, b, b0)
    efficiency = gain / (b / b0)
    rule_factor = {
        "constant": lambda: 1.0,
        "linear": lambda: linear_scale(b, b0),
        "sqrt": lambda: sqrt_scale(b, b0),
        "adascale": lambda: gain,
    }[cfg.rule]()

    if cfg.warmup_steps > 0:
        warmed = warmup_factor(rule_factor, step / cfg.warmup_steps)
    elif cfg.warmup_epochs > 0:
        warmed = warmup_factor(rule_factor, epoch / cfg.warmup_epochs)
    else:
        warmed = rule_factor

    if cfg.schedule == "cosine":
        progress = step / cfg.total_steps if cfg.total_steps is not None else epoch / cfg.total_epochs
        sched = cosine_factor(progress, cfg.final_lr_fraction)
    elif cfg.schedule == "step":
        sched = (step_factor(step, cfg.milestone_steps, cfg.gamma) if cfg.milestone_steps
                 else step_factor(epoch, cfg.milestone_epochs, cfg.gamma))
    else:
        sched = 1.0
    return LrTerms(lr=cfg.base_lr * warmed * sched, rule_factor=rule_factor, warmed_factor=warmed,
                   schedule_factor=sched, gain=gain, efficiency=efficiency)


def learning_rate(cfg: LrConfig, *, step: int, epoch: float, global_batch_size: int,
                  grad_sq_norm_est: float | None = None, trace_cov_est: float | None = None) -> float:
    """η(t) = η₀ · warm(t, rule factor) · schedule(t); see :func:`lr_terms` for the arguments."""
    return lr_terms(cfg, step=step, epoch=epoch, global_batch_size=global_batch_size,
                    grad_sq_norm_est=grad_sq_norm_est, trace_cov_est=trace_cov_est).lr
