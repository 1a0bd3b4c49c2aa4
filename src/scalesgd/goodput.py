"""Goodput: the global batch size (and with it the learning rate) chosen to make the most progress per second.

Pollux (Qiao et al., OSDI 2021, arXiv 2008.12260; petuum/adaptdl ``adaptdl/goodput.py``)::

    goodput(B) = throughput(B) × E(B)          [base-batch examples of progress per second]
    throughput(B) = B / T_step(B/P, P)         [examples/s]
    E(B) = (B_noise + B₀)/(B_noise + B)        [progress per example at B relative to the base batch B₀]

- ``T_step`` is fitted online from the run's own measured steps (:func:`update_step_times`,
  :func:`fit_step_time`): compute ``T_c(b) = α_c + β_c·b`` at the local batch b = B/P, all-reduce
  ``T_n = α_n`` (one gradient-sized message per step: constant in B for a fixed model), combined as
  ``(T_c^γ + T_n^γ)^(1/γ)`` (AdaptDL's p-norm; γ = 1, the sum, is our trainer, which does not overlap
  backward and the all-reduce).
- ``E(B)`` is :func:`scalesgd.lr_rules.statistical_efficiency` (the AdaScale gain over the scale, r/S), with
  the noise scale B_noise = tr Σ/‖G‖² = B_S − 1 from the trainer's smoothed estimates. The learning rate
  follows the same gain (``--lr-rule adascale``), so a step at B is worth r(B) base-batch steps.
- :func:`choose_global_batch` maximises goodput over the legal global batches (multiples of P within the
  limits); :class:`GoodputPolicy` wraps it in the batch-policy protocol of :mod:`scalesgd.batch_policy`
  with warm-up and hysteresis, its memory in a plain-data :class:`GoodputState`.
- :class:`LrRangeTest` is the pure state machine behind ``--lr auto``: a geometric learning-rate ramp, each
  trial from a saved copy of the training state, stopped at the first unstable rate (Smith, "Cyclical learning rates",
  arXiv 1506.01186), refined, and the base rate chosen from the largest stable one.

numpy only; every function is pure and every state is a frozen dataclass of numbers and tuples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Sequence

import numpy as np

from scalesgd.batch_policy import BatchDecision, legal_batch_size
from scalesgd.errors import ConfigError
from scalesgd.lr_rules import statistical_efficiency
from scalesgd.perf_model import nonneg_lstsq

# ---------------------------------------------------------------------------------------------------------
# Step-time curve, fitted online


@dataclass(frozen=True)
class TimingBin:
    """Robust running timings at one local batch size.

    Attributes:
        local_batch_size: b (examples per worker).
        n: observations taken into this bin.
        compute_s, comm_s: the bin's estimate (seconds): an exponentially-forgetting mean of the medians of
            the last ``window`` observations, so a single outlier in a window of ≥ 3 never moves it.
        window_compute_s, window_comm_s: the last ``window`` raw timings, oldest first.
        last_step: training step of the latest observation (for forgetting bins not visited for long).
    """

    local_batch_size: int
    n: int
    compute_s: float
    comm_s: float
    window_compute_s: tuple[float, ...]
    window_comm_s: tuple[float, ...]
    last_step: int


@dataclass(frozen=True)
class StepTimeState:
    """The step-time fit's sufficient statistics: at most ``max_bins`` :class:`TimingBin` (most recent kept).

    The least-squares fit over the bins equals the fit over all observations with each observation replaced
    by its bin's robust mean, so updating is O(window) and fitting O(max_bins) per step: constant.
    ``world_size`` is the P the timings were taken at (a different P starts a fresh state: the all-reduce
    time depends on it).
    """

    world_size: int = 0
    bins: tuple[TimingBin, ...] = ()

    @property
    def n_observations(self) -> int:
        return sum(b.n for b in self.bins)


def _median(values: Sequence[float]) -> float:
    """The median of a timing window (a handful of floats, at every step): numpy's definition (the mean of the
    two middle values of an even count), without numpy's per-call cost on tiny inputs."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def update_step_times(state: StepTimeState, *, local_batch_size: int, world_size: int, compute_s: float,
                      comm_s: float, step: int, window: int = 5, horizon: int = 50,
                      max_bins: int = 8) -> StepTimeState:
    """Add one measured step to the step-time statistics.

    Args:
        state: the statistics so far (``StepTimeState()`` to start).
        local_batch_size: b = B/P of the measured step (examples per worker, ≥ 1).
        world_size: P of the measured step; a change of P discards the old bins.
        compute_s: seconds of everything but the all-reduce (forward, backward, optimizer update) on the
            slowest worker (≥ 0, finite).
        comm_s: seconds of the gradient all-reduce (≥ 0, finite; 0 on one worker).
        step: the training step this was measured at (for the recency order of bins).
        window: raw timings kept per bin; the bin moves by the window's median (robust to single outliers).
        horizon: the bin estimate is the running mean of window medians over its first ``horizon``
            observations, then an exponential moving average with weight 1/horizon (follows slow drift).
        max_bins: distinct batch sizes remembered; the least recently seen is dropped first.
    Returns:
        The new :class:`StepTimeState` (the input is not modified).
    Raises:
        ValueError: a non-finite or negative timing, or b, P < 1.
    """
    if local_batch_size < 1 or world_size < 1:
        raise ValueError(f"local_batch_size and world_size must be >= 1, got {local_batch_size}, {world_size}")
    for name, value in (("compute_s", compute_s), ("comm_s", comm_s)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if window < 1 or horizon < 1 or max_bins < 1:
        raise ValueError(f"window, horizon and max_bins must be >= 1, got {window}, {horizon}, {max_bins}")
    bins = state.bins if state.world_size == world_size else ()
    old = next((b for b in bins if b.local_batch_size == local_batch_size), None)
    if old is None:
        new = TimingBin(local_batch_size, 1, float(compute_s), float(comm_s), (float(compute_s),),
                        (float(comm_s),), step)
    else:
        wc = (old.window_compute_s + (float(compute_s),))[-window:]
        wn = (old.window_comm_s + (float(comm_s),))[-window:]
        n = old.n + 1
        eta = 1.0 / min(n, horizon)
        new = TimingBin(local_batch_size, n, old.compute_s + eta * (_median(wc) - old.compute_s),
                        old.comm_s + eta * (_median(wn) - old.comm_s), wc, wn, step)
    others = sorted((b for b in bins if b.local_batch_size != local_batch_size), key=lambda b: b.last_step)
    kept = tuple(others[-(max_bins - 1):]) if max_bins > 1 else ()
    return StepTimeState(world_size=world_size,
                         bins=tuple(sorted(kept + (new,), key=lambda b: b.local_batch_size)))


def combine_times(compute_s, comm_s, gamma: float = 1.0):
    """Step time from compute and all-reduce time: ``(T_c^γ + T_n^γ)^(1/γ)`` (AdaptDL's p-norm).

    γ = 1 is the sum (no overlap: our trainer); γ → ∞ tends to max(T_c, T_n) (perfect overlap, as DDP's
    bucketed all-reduce during backward approaches). Scalars or arrays (seconds) in, seconds out.
    Raises ValueError for γ < 1.
    """
    if not (gamma >= 1.0):
        raise ValueError(f"gamma must be >= 1 (1 = no overlap of compute and all-reduce), got {gamma}")
    tc = np.asarray(compute_s, dtype=np.float64)
    tn = np.asarray(comm_s, dtype=np.float64)
    if gamma == 1.0:
        return tc + tn
    top = np.maximum(np.maximum(tc, tn), 1e-300)  # scale first: x**γ underflows for millisecond times, big γ
    return top * ((tc / top) ** gamma + (tn / top) ** gamma) ** (1.0 / gamma)


@dataclass(frozen=True)
class StepTimeModel:
    """``T_step(b) = (T_c(b)^γ + α_n^γ)^(1/γ)``, ``T_c(b) = α_c + β_c·b``, b the local batch (seconds).

    Attributes:
        alpha_c_s: per-step compute cost (s): kernel launches, optimizer update, Python overhead.
        beta_c_s: per-example compute cost (s/example at the local batch).
        alpha_n_s: all-reduce time per step (s).
        gamma: overlap exponent γ ≥ 1.
        n_sizes: distinct local batch sizes the fit saw (0 for a model built by hand).
        how: ``fit``, ``prior`` (one size seen: the slope is a prior, see :func:`fit_step_time`) or ``given``.
        min_local_batch, max_local_batch: the observed range (0 when built by hand).
    """

    alpha_c_s: float
    beta_c_s: float
    alpha_n_s: float = 0.0
    gamma: float = 1.0
    n_sizes: int = 0
    how: str = "given"
    min_local_batch: int = 0
    max_local_batch: int = 0

    def __post_init__(self):
        for name in ("alpha_c_s", "beta_c_s", "alpha_n_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.alpha_c_s + self.beta_c_s + self.alpha_n_s <= 0:
            raise ValueError("a step-time model needs some positive cost (alpha_c_s, beta_c_s or alpha_n_s)")
        if not (self.gamma >= 1.0):
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")

    def compute_s(self, local_batch_size):
        """``α_c + β_c·b`` (seconds), scalar or array b."""
        return self.alpha_c_s + self.beta_c_s * np.asarray(local_batch_size, dtype=np.float64)

    def __call__(self, local_batch_size):
        """Seconds per step at local batch ``b`` (scalar or array)."""
        return combine_times(self.compute_s(local_batch_size), self.alpha_n_s, self.gamma)

    def describe(self) -> str:
        text = (f"step {self.alpha_c_s * 1e3:.3g} ms + {self.beta_c_s * 1e3:.3g} ms/example"
                f" + all-reduce {self.alpha_n_s * 1e3:.3g} ms")
        if self.gamma != 1.0:
            text += f" (p-norm gamma {self.gamma:g})"
        if self.how == "prior":
            text += " [one batch size measured: slope from the prior]"
        return text


def fit_step_time(state: StepTimeState, *, gamma: float = 1.0, single_size_slope_share: float = 0.5,
                  half_life_steps: float = 1000.0, step: int | None = None) -> StepTimeModel | None:
    """Fit :class:`StepTimeModel` to the bins of ``state``.

    Compute: ``α_c, β_c ≥ 0`` minimising the weighted relative error Σ w_k((α_c + β_c·b_k − t_k)/t_k)²
    over the bins (:func:`scalesgd.perf_model.nonneg_lstsq`), weight w_k = min(n_k, 20)·2^(−age_k/half-life),
    so a bin of many steps counts more, but not without limit, and a bin not visited for long fades.
    A fitted slope that would be negative (a noisy profile, or a device not yet saturated) is 0: the model
    then says bigger local batches are free, which the policy only believes up to its extrapolation limit.
    All-reduce: α_n = the weighted mean of the bins' all-reduce times (constant in B for a fixed model).

    Only one local batch size seen (the slope is not identifiable): the prior of AdaptDL's
    ``fit_perf_params``: a share ``s`` of the measured compute time t is per-example,
    ``β_c = s·t/b``, ``α_c = (1 − s)·t``. s = 0.5 (AdaptDL's equal split) is optimistic about larger batches,
    so the policy explores upward and the next fit has two sizes; s = 1 is proportional scaling through the
    origin (pessimistic: no compute economy of scale).

    Args:
        state: the statistics from :func:`update_step_times`.
        gamma: overlap exponent γ ≥ 1 of :func:`combine_times`.
        single_size_slope_share: s ∈ [0, 1] above.
        half_life_steps: age (steps since a bin was last seen) that halves its weight.
        step: the current step (ages are measured from it); None: from the newest bin.
    Returns:
        The model, or None while no step has been observed (or every timing was 0).
    """
    if not (0.0 <= single_size_slope_share <= 1.0):
        raise ValueError(f"single_size_slope_share must be in [0, 1], got {single_size_slope_share}")
    bins = [b for b in state.bins if b.compute_s + b.comm_s > 0]
    if not bins:
        return None
    now = max(b.last_step for b in bins) if step is None else step
    w = np.array([min(b.n, 20) * 0.5 ** (max(now - b.last_step, 0) / half_life_steps) for b in bins])
    b_loc = np.array([b.local_batch_size for b in bins], dtype=np.float64)
    t_c = np.array([b.compute_s for b in bins])
    t_n = np.array([b.comm_s for b in bins])
    alpha_n = float(np.sum(w * t_n) / np.sum(w))
    common = dict(alpha_n_s=alpha_n, gamma=gamma, n_sizes=len(bins), min_local_batch=int(b_loc.min()),
                  max_local_batch=int(b_loc.max()))
    if len(bins) == 1:
        t, b = float(t_c[0]), float(b_loc[0])
        return StepTimeModel(alpha_c_s=(1.0 - single_size_slope_share) * t,
                             beta_c_s=single_size_slope_share * t / b, how="prior", **common)
    pos = t_c > 0
    if pos.sum() == 0:
        return StepTimeModel(alpha_c_s=0.0, beta_c_s=0.0, how="fit", **common)
    # Relative error with weights: scale each row by sqrt(w)/t, target sqrt(w).
    sw = np.sqrt(w[pos])
    feats = np.stack([np.ones(pos.sum()), b_loc[pos]], axis=1) * (sw / t_c[pos])[:, None]
    alpha_c, beta_c = nonneg_lstsq(feats, sw, relative=False)
    return StepTimeModel(alpha_c_s=float(alpha_c), beta_c_s=float(beta_c), how="fit", **common)


# ---------------------------------------------------------------------------------------------------------
# Statistical efficiency and goodput


def noise_scale(grad_sq_norm_est: float | None = None, trace_cov_est: float | None = None,
                batch_bound_est: float | None = None) -> float | None:
    """The gradient noise scale B_noise = tr Σ/‖G‖² (examples), or None when there is no usable estimate.

    From the smoothed ‖G‖² and tr Σ when both are finite with ‖G‖² > 0 (preferred: McCandlish et al. 2018,
    arXiv 1812.06162), else from the diversity batch bound B_S = n·Δ = B_noise + 1. A
    negative tr Σ estimate counts as 0 (no noise: every batch size equally efficient).
    """
    if (grad_sq_norm_est is not None and trace_cov_est is not None and math.isfinite(grad_sq_norm_est)
            and math.isfinite(trace_cov_est) and grad_sq_norm_est > 0):
        return max(trace_cov_est, 0.0) / grad_sq_norm_est
    if batch_bound_est is not None and math.isfinite(batch_bound_est) and batch_bound_est > 0:
        return max(batch_bound_est - 1.0, 0.0)
    return None


def efficiency(global_batch_size, base_batch_size: int, b_noise: float):
    """Statistical efficiency ``E(B) = (B_noise + B₀)/(B_noise + B)`` (scalar or array B).

    One definition: this is :func:`scalesgd.lr_rules.statistical_efficiency` (the AdaScale gain r over
    S = B/B₀) with ‖G‖² = 1, tr Σ = B_noise, so it matches the learning-rate rule exactly: a scalar B calls
    it; an array B runs the same float64 operations in the same order elementwise (the chooser evaluates
    hundreds of candidates at every step, one Python call each would dominate the policy's cost).
    """
    if not (math.isfinite(b_noise) and b_noise >= 0):
        raise ValueError(f"b_noise must be a finite number >= 0, got {b_noise}")
    arr = np.asarray(global_batch_size, dtype=np.float64)
    if not arr.ndim:
        return statistical_efficiency(1.0, b_noise, float(arr), base_batch_size)
    # adascale_gain's arithmetic with ‖G‖² = 1 (so never the both-zero case), clipped alike, over S
    scale = arr / base_batch_size
    var = max(b_noise, 0.0) / base_batch_size
    gain = (var + 1.0) / (var / scale + 1.0)
    gain = np.minimum(np.maximum(gain, np.minimum(1.0, scale)), np.maximum(1.0, scale))
    return gain / scale


def goodput(global_batch_size, *, model: StepTimeModel, world_size: int, base_batch_size: int,
            b_noise: float):
    """``goodput(B) = B/T_step(B/P) × E(B)`` in base-batch examples of progress per second (scalar or array).

    Raises ValueError for B not a positive multiple of P: the local batch would not be whole.
    """
    b = np.asarray(global_batch_size, dtype=np.float64)
    if np.any(b < world_size) or np.any(b % world_size != 0):
        raise ValueError(f"global batch sizes must be positive multiples of P={world_size}, got {b.tolist()}")
    out = b / model(b / world_size) * efficiency(b, base_batch_size, b_noise)
    return out if out.ndim else float(out)


def optimal_batch_closed_form(b_noise: float, t0_s: float, c_s_per_example: float) -> float:
    """B* = √(B_noise·t₀/c): the global batch minimising time to a loss for T_step(B) = t₀ + c·B.

    Wall time ∝ steps × T_step ∝ (1 + B_noise/B)(t₀ + c·B) (McCandlish et al.'s steps/examples trade-off);
    its derivative vanishes at B² = B_noise·t₀/c. For the model of this module,
    t₀ = α_c + α_n (γ = 1) and c = β_c/P. Continuous: the chooser's answer is the best legal batch near it.
    """
    if not (b_noise >= 0 and t0_s >= 0 and c_s_per_example > 0):
        raise ValueError("need b_noise >= 0, t0_s >= 0, c_s_per_example > 0")
    return math.sqrt(b_noise * t0_s / c_s_per_example)


@dataclass(frozen=True)
class GoodputChoice:
    """The chooser's answer: the best legal global batch and what the model predicts there and at the current one.

    Goodput in base-batch examples/s; step time in seconds; efficiency in (0, ∞) (1 at B₀).
    """

    global_batch_size: int
    goodput: float
    step_time_s: float
    efficiency: float
    current_goodput: float | None
    n_candidates: int


def _candidates(lo: int, hi: int, p: int, max_candidates: int) -> np.ndarray:
    """Multiples of p in [lo, hi]: all of them if few, else a geometric grid (rounded to multiples of p)."""
    count = (hi - lo) // p + 1
    if count <= max_candidates:
        return np.arange(lo, hi + 1, p, dtype=np.int64)
    grid = np.geomspace(lo, hi, max_candidates)
    return np.unique(np.clip(np.round(grid / p).astype(np.int64) * p, lo, hi))


def choose_global_batch(*, model: StepTimeModel, b_noise: float, world_size: int, base_batch_size: int,
                        max_batch: int, min_batch: int = 1, current: int | None = None,
                        max_candidates: int = 512) -> GoodputChoice:
    """The global batch maximising :func:`goodput` among multiples of P in [min_batch, max_batch].

    Search: every multiple of P when there are at most ``max_candidates``; otherwise a geometric grid of
    ``max_candidates`` points, then the same search again between the best point's neighbours, until the
    interval holds few enough multiples to try them all (goodput is unimodal in B for this model:
    maximising it is minimising B_noise·t₀/B + c·B, so the local refinement finds the global optimum).

    Args:
        model: the step-time model (local batch → seconds).
        b_noise: the noise scale (examples, ≥ 0).
        world_size: P; candidates are multiples of it.
        base_batch_size: B₀, the batch the base learning rate was tuned at.
        min_batch, max_batch: limits (examples). A cap is required: with a flat fitted slope (β_c = 0)
            goodput grows without bound, so the caller decides how far the fit may be believed.
        current: the batch in use now, to report its goodput (None: not reported).
        max_candidates: grid size per round (≥ 8).
    Returns:
        :class:`GoodputChoice`.
    Raises:
        ConfigError: no multiple of P within the limits (max_batch < P).
    """
    p = world_size
    if max_candidates < 8:
        raise ValueError(f"max_candidates must be >= 8, got {max_candidates}")
    lo = legal_batch_size(max(min_batch, p), world_size=p, min_batch=min_batch, max_batch=max_batch)
    hi = (max_batch // p) * p
    if hi < p:
        raise ConfigError(f"max_batch={max_batch} is below the worker count {p}; raise it or use fewer workers")
    hi = max(hi, lo)
    n_tried = 0
    while True:
        cand = _candidates(lo, hi, p, max_candidates)
        gp = goodput(cand, model=model, world_size=p, base_batch_size=base_batch_size, b_noise=b_noise)
        n_tried += cand.size
        i = int(np.argmax(gp))
        if cand.size == (hi - lo) // p + 1:  # exhaustive on [lo, hi]
            break
        lo, hi = int(cand[max(i - 1, 0)]), int(cand[min(i + 1, cand.size - 1)])
    best = int(cand[i])
    cur = None
    if current is not None and current >= p and current % p == 0:
        cur = float(goodput(current, model=model, world_size=p, base_batch_size=base_batch_size, b_noise=b_noise))
    return GoodputChoice(global_batch_size=best, goodput=float(gp[i]), step_time_s=float(model(best / p)),
                         efficiency=float(efficiency(best, base_batch_size, b_noise)), current_goodput=cur,
                         n_candidates=n_tried)


# ---------------------------------------------------------------------------------------------------------
# The batch policy


@dataclass(frozen=True)
class GoodputObservation:
    """What the goodput policy needs after an optimizer step (a superset of ``StepObservation``).

    Attributes:
        step: optimizer steps completed so far; the decision applies to step ``step`` (0-based).
        epoch: epochs of training data consumed so far (fractional).
        global_batch_size: B of the step just measured (examples over all workers).
        world_size: P.
        compute_s: seconds of that step's forward+backward (slowest worker), or None for "no timing this
            step" (the caller's warm-up steps, a step that ran an evaluation).
        comm_s: seconds of that step's gradient all-reduce (0 on one worker; None with compute_s None).
        update_s: seconds of its optimizer update (added to compute: constant in B, it lands in α_c).
        grad_sq_norm_est, trace_cov_est: the trainer's smoothed ‖G‖² and per-example tr Σ (None early).
        batch_bound_est: the smoothed B_S = B_noise + 1, used when the two above are missing.
        max_batch_memory: largest global batch that fits in memory on P workers, or None.
        timed_step: the step the timings were measured at; None: the step just completed (``step − 1``). A
            trainer that learns a step's agreed times one step late passes an older step; a timing from
            before the last change of batch, or from the first ``skip_after_change`` steps after it, is left
            out (it is not a timing of the current batch in its steady state).
    """

    step: int
    epoch: float
    global_batch_size: int
    world_size: int
    compute_s: float | None
    comm_s: float | None = 0.0
    update_s: float = 0.0
    grad_sq_norm_est: float | None = None
    trace_cov_est: float | None = None
    batch_bound_est: float | None = None
    max_batch_memory: int | None = None
    timed_step: int | None = None

    def __post_init__(self):
        if self.step < 0 or not (self.epoch >= 0):
            raise ValueError(f"step and epoch must be >= 0, got step={self.step}, epoch={self.epoch}")
        if self.global_batch_size < 1 or self.world_size < 1:
            raise ValueError(f"global_batch_size and world_size must be >= 1, got {self.global_batch_size}, "
                             f"{self.world_size}")
        if self.max_batch_memory is not None and self.max_batch_memory < 1:
            raise ValueError(f"max_batch_memory must be >= 1 or None, got {self.max_batch_memory}")
        if self.timed_step is not None and not 0 <= self.timed_step < self.step:
            raise ValueError(f"timed_step must be a completed step (0 <= timed_step < step={self.step}), got "
                             f"{self.timed_step}")


@dataclass(frozen=True)
class GoodputState:
    """Everything :class:`GoodputPolicy` remembers between steps: plain numbers, tuples and one nested state.

    Attributes:
        times: the step-time statistics (:class:`StepTimeState`).
        base_batch_size: B₀ (the first observed batch unless the policy fixes it), 0 until known.
        n_timings: timed steps taken into the fit.
        n_estimates: steps that came with a usable noise-scale estimate.
        last_change_step: ``step`` of the last change, or None.
        n_changes: changes so far.
    """

    times: StepTimeState = field(default_factory=StepTimeState)
    base_batch_size: int = 0
    n_timings: int = 0
    n_estimates: int = 0
    last_change_step: int | None = None
    n_changes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict/list/number form (JSON- and ``torch.save``-safe)."""
        d = asdict(self)
        d["times"]["bins"] = [dict(b, window_compute_s=list(b["window_compute_s"]),
                                   window_comm_s=list(b["window_comm_s"])) for b in d["times"]["bins"]]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "GoodputState":
        """Inverse of :meth:`to_dict`. Raises ValueError on a malformed dict."""
        try:
            bins = tuple(TimingBin(int(b["local_batch_size"]), int(b["n"]), float(b["compute_s"]),
                                   float(b["comm_s"]), tuple(float(x) for x in b["window_compute_s"]),
                                   tuple(float(x) for x in b["window_comm_s"]), int(b["last_step"]))
                         for b in d["times"]["bins"])
            last = d["last_change_step"]
            return GoodputState(times=StepTimeState(int(d["times"]["world_size"]), bins),
                                base_batch_size=int(d["base_batch_size"]), n_timings=int(d["n_timings"]),
                                n_estimates=int(d["n_estimates"]),
                                last_change_step=None if last is None else int(last),
                                n_changes=int(d["n_changes"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a goodput policy state: {e!r}") from e


@dataclass(frozen=True)
class GoodputPolicy:
    """Choose the global batch that maximises predicted goodput; the lr follows by the AdaScale rule.

    After every step the measured times go into the online step-time fit (:func:`update_step_times`,
    :func:`fit_step_time`) and the smoothed ‖G‖², tr Σ give B_noise (:func:`noise_scale`); then
    :func:`choose_global_batch` picks the best legal batch. The batch changes only when all hold:

    - at least ``min_timed_steps`` timed steps and ``min_estimates`` usable noise estimates (warm-up);
    - at least ``min_interval_steps`` steps since the last change;
    - the step is a multiple of ``decide_every`` (the fit and the search over batches cost about as much as a
      small model's step in Python, and the inputs move slowly: a decision every few steps loses nothing but
      that cost, as Pollux re-optimises periodically rather than per step);
    - the predicted goodput at the best batch exceeds the current batch's by more than ``rel_gain``
      (hysteresis: an estimate wandering across the point where two batches tie predicts a gain near 0
      there, so it never flips the batch back and forth).

    Extrapolation: the fit is trusted only up to ``max_extrapolation``× beyond the measured local batch
    sizes, so a change is at most that factor past what was measured; with one size measured the slope is
    AdaptDL's prior (:func:`fit_step_time`), so the policy explores by at most that factor, measures, and
    refits. The first ``skip_after_change`` steps at a new batch are left out of the fit (allocator
    and autotuner warm-up at the new shape). A current batch that is illegal (not a multiple of P, above
    a limit, e.g. after resuming on other workers) is corrected at once.

    Args:
        min_batch, max_batch: limits on the global batch (max_batch None: none).
        n_train: training-set size; the batch never exceeds it (None: no such cap).
        base_batch_size: B₀ of the efficiency (the batch the base lr was tuned at); None: the first batch seen.
            B₀ scales every E(B) by the same factor, so it changes the reported goodput, never the choice.
        rel_gain: hysteresis threshold (0.05 = 5% predicted gain needed).
        min_interval_steps, min_timed_steps, min_estimates, decide_every: see above (decide_every ≥ 1).
        max_extrapolation: factor ≥ 1 (see above).
        gamma: compute/all-reduce overlap exponent of :func:`combine_times` (1: our trainer).
        single_size_slope_share: the one-size prior of :func:`fit_step_time`.
        skip_after_change: steps at a new batch whose timings are ignored (≥ 0).
        timing_window, timing_horizon: :func:`update_step_times` options.
    """

    min_batch: int = 1
    max_batch: int | None = None
    n_train: int | None = None
    base_batch_size: int | None = None
    rel_gain: float = 0.05
    min_interval_steps: int = 50
    min_timed_steps: int = 5
    min_estimates: int = 20
    decide_every: int = 10
    max_extrapolation: float = 2.0
    gamma: float = 1.0
    single_size_slope_share: float = 0.5
    skip_after_change: int = 1
    timing_window: int = 5
    timing_horizon: int = 50
    name: str = field(default="goodput", init=False)

    def __post_init__(self):
        def bad(msg: str) -> None:
            raise ConfigError(f"goodput batch policy: {msg}")
        if self.min_batch < 1:
            bad(f"min_batch must be >= 1, got {self.min_batch}")
        for nm in ("max_batch", "n_train", "base_batch_size"):
            v = getattr(self, nm)
            if v is not None and v < 1:
                bad(f"{nm} must be >= 1 or unset, got {v}")
        if self.max_batch is not None and self.max_batch < self.min_batch:
            bad(f"max_batch={self.max_batch} is below min_batch={self.min_batch}; raise max_batch or lower min_batch")
        if not (math.isfinite(self.rel_gain) and self.rel_gain >= 0):
            bad(f"rel_gain must be >= 0 (e.g. 0.05 for 5%), got {self.rel_gain}")
        if min(self.min_interval_steps, self.min_timed_steps, self.min_estimates, self.skip_after_change) < 0:
            bad("min_interval_steps, min_timed_steps, min_estimates and skip_after_change must be >= 0")
        if not (isinstance(self.decide_every, int) and self.decide_every >= 1):
            bad(f"decide_every must be an integer >= 1 (1: a decision every step), got {self.decide_every!r}")
        if not (math.isfinite(self.max_extrapolation) and self.max_extrapolation >= 1):
            bad(f"max_extrapolation must be a finite number >= 1 (e.g. 2), got {self.max_extrapolation}")
        if not (math.isfinite(self.gamma) and self.gamma >= 1):
            bad(f"gamma must be >= 1 (1 = compute and all-reduce do not overlap), got {self.gamma}")
        if not (0 <= self.single_size_slope_share <= 1):
            bad(f"single_size_slope_share must be in [0, 1], got {self.single_size_slope_share}")
        if self.timing_window < 1 or self.timing_horizon < 1:
            bad("timing_window and timing_horizon must be >= 1")

    def init_state(self) -> GoodputState:
        return GoodputState()

    def upper_limit(self, obs: GoodputObservation) -> int | None:
        """The hard cap on the global batch: min(max_batch, n_train, memory cap), or None."""
        caps = [c for c in (self.max_batch, self.n_train, obs.max_batch_memory) if c is not None]
        return min(caps) if caps else None

    def model(self, state: GoodputState, step: int | None = None) -> StepTimeModel | None:
        """The current step-time fit (None before the first timed step)."""
        return fit_step_time(state.times, gamma=self.gamma, single_size_slope_share=self.single_size_slope_share,
                             step=step)

    def next(self, state: GoodputState, obs: GoodputObservation) -> tuple[BatchDecision, GoodputState]:
        """One decision: the global batch for step ``obs.step``, and the new state. Pure."""
        p, current = obs.world_size, obs.global_batch_size
        if state.base_batch_size == 0:
            state = replace(state, base_batch_size=self.base_batch_size or current)
        since = None if state.last_change_step is None else obs.step - state.last_change_step
        # steps the timed step ran after the last change (the first step at a new batch is step last_change_step)
        timed_at = obs.step - 1 if obs.timed_step is None else obs.timed_step
        settled = state.last_change_step is None or timed_at - state.last_change_step >= self.skip_after_change
        if obs.compute_s is not None and settled:
            local = current // p if current % p == 0 else -(-current // p)
            state = replace(state, n_timings=state.n_timings + 1, times=update_step_times(
                state.times, local_batch_size=max(local, 1), world_size=p,
                compute_s=obs.compute_s + obs.update_s, comm_s=obs.comm_s or 0.0, step=obs.step,
                window=self.timing_window, horizon=self.timing_horizon))
        b_noise = noise_scale(obs.grad_sq_norm_est, obs.trace_cov_est, obs.batch_bound_est)
        if b_noise is not None:
            state = replace(state, n_estimates=state.n_estimates + 1)
        upper = self.upper_limit(obs)
        limits = dict(world_size=p, min_batch=self.min_batch, max_batch=upper)

        legal = legal_batch_size(current, **limits)
        if legal != current:
            return self._change(state, obs, legal, f"forced: batch {current} is outside the limits (multiple of "
                                                   f"P={p}, min {self.min_batch}, max {upper}) -> {legal}")
        if state.n_timings < self.min_timed_steps or b_noise is None or state.n_estimates < self.min_estimates:
            return BatchDecision(current, False, f"hold: warm-up ({state.n_timings}/{self.min_timed_steps} timed "
                                                 f"steps, {state.n_estimates}/{self.min_estimates} noise "
                                                 f"estimates)"), state
        if obs.step % self.decide_every:
            return BatchDecision(current, False, f"hold: decisions every {self.decide_every} steps"), state
        if since is not None and since < self.min_interval_steps:
            return BatchDecision(current, False, f"hold: last change {since} steps ago "
                                                 f"(< {self.min_interval_steps})"), state
        model = self.model(state, obs.step)
        # The fit is trusted up to max_extrapolation beyond the measured local batch sizes.
        lo_ex = max(int(model.min_local_batch / self.max_extrapolation), 1) * p
        hi_ex = int(model.max_local_batch * self.max_extrapolation) * p
        lo = max(self.min_batch, lo_ex)
        hi = hi_ex if upper is None else min(upper, hi_ex)
        hi = max(hi, legal_batch_size(lo, **limits))
        choice = choose_global_batch(model=model, b_noise=b_noise, world_size=p,
                                     base_batch_size=state.base_batch_size, min_batch=lo, max_batch=hi,
                                     current=current)
        new, cur_gp = choice.global_batch_size, choice.current_goodput
        what = (f"goodput {choice.goodput:,.0f} ex/s*eff at B={new} vs {cur_gp:,.0f} at B={current}: "
                f"B_noise {b_noise:,.1f}, {model.describe()}")
        if new == current or choice.goodput <= cur_gp * (1.0 + self.rel_gain):
            return BatchDecision(current, False, f"hold: {what} (gain below {self.rel_gain:.0%})"), state
        return self._change(state, obs, new, f"{'grow' if new > current else 'shrink'}: {what}")

    @staticmethod
    def _change(state: GoodputState, obs: GoodputObservation, new: int,
                reason: str) -> tuple[BatchDecision, GoodputState]:
        state = replace(state, last_change_step=obs.step, n_changes=state.n_changes + 1)
        return BatchDecision(new, new != obs.global_batch_size, reason), state


def make_goodput_policy(**options) -> GoodputPolicy:
    """Build :class:`GoodputPolicy` from keyword options, with one clear error for an unknown one.

    Raises:
        ConfigError: an unknown option or an invalid value.
    """
    allowed = {f.name for f in fields(GoodputPolicy) if f.init}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"batch policy 'goodput' has no option(s) {', '.join(unknown)}; "
                          f"its options are: {', '.join(sorted(allowed))}")
    return GoodputPolicy(**options)


# ---------------------------------------------------------------------------------------------------------
# --lr auto: a learning-rate range test as a pure state machine

LR_PICKS = ("stable", "steepest")


@dataclass(frozen=True)
class LrTrial:
    """One tried learning rate: the loss on a fixed probe batch before and after ``k`` steps at ``lr`` from the
    same saved state, and the verdict (``stable``, ``flat``, ``rose`` or ``diverged``; see :class:`LrRangeTest`)."""

    lr: float
    loss_before: float
    loss_after: float
    verdict: str

    def describe(self) -> str:
        change = ((self.loss_after - self.loss_before) / self.loss_before
                  if math.isfinite(self.loss_after) and self.loss_before != 0 else math.inf)
        return (f"lr {self.lr:.4g}: loss {self.loss_before:.4g} -> {self.loss_after:.4g} "
                f"({change:+.1%}), {self.verdict}")


@dataclass(frozen=True)
class LrSearchState:
    """The range test's memory: the trials so far, the phase (``up``, ``down``, ``refine``, ``done``) and
    how many refinement trials ran. Plain data; ``asdict`` gives a checkpointable dict."""

    trials: tuple[LrTrial, ...] = ()
    phase: str = "up"
    n_refined: int = 0


@dataclass(frozen=True)
class LrSearchResult:
    """The chosen base learning rate, why it won, and one line per trial."""

    lr: float
    reason: str
    log: tuple[str, ...]


@dataclass(frozen=True)
class LrRangeTest:
    """Find a base learning rate by trying a geometric ramp of rates, each trial from a saved training state.

    The trainer saves its state, then repeatedly: asks :meth:`propose` for a rate, measures the loss on a
    fixed probe batch, runs ``k`` steps at that rate, measures the loss on the same batch again and feeds the
    two to :meth:`observe`. A trial that rose or diverged is undone (the saved state restored: it leaves
    nothing behind). A stable or flat one is either undone too (every trial from the same point) or kept, its
    state saved for the next trial (the ramp then trains as it searches, as Smith's one-run range test does;
    ``scalesgd.lr_probe`` keeps them). The search is the same either way: it sees only the two losses. When
    :meth:`propose` returns None, :meth:`result` gives the rate to train with.

    Verdict of a trial (``start`` = the first trial's loss before):

    - ``diverged``: the loss after is not finite or above ``diverge_factor``·start;
    - ``rose``: it is at least the loss before (the rate overshoots: for gradient descent on
      f(w) = ½·h·w², every rate above 2/h);
    - ``stable``: it fell by more than ``min_rel_decrease`` (relative);
    - ``flat``: it fell, but by less (the rate is too small for k steps to show).

    Search (Smith, "Cyclical learning rates", arXiv 1506.01186, §3.3, as a stopped search rather than a
    full sweep): from ``start_lr``, multiply by ``factor`` while trials are stable or flat; at the first
    diverged or rose trial, bisect (geometrically) ``refine_trials`` times between the largest stable rate
    and the smallest unstable one. If the very first rate is unstable, divide by ``factor`` until a stable
    one appears. Stops after ``max_trials`` trials, above ``max_lr`` or below ``min_lr``.

    Choice: ``pick="stable"`` (default): the largest stable rate divided by ``safety_factor``. On the
    quadratic above the stable rates are (0, 2/h) and the best is 1/h; the largest stable rate tends to 2/h
    from below, so a safety factor of 2 lands just under the optimum. ``pick="steepest"``: the stable rate
    with the largest relative fall of the loss (Smith's "loss falls fastest"), used as is.

    Args:
        start_lr, factor (> 1), max_trials (≥ 2), min_lr, max_lr: the ramp.
        diverge_factor (> 1), min_rel_decrease (∈ [0, 1)): the verdicts.
        refine_trials (≥ 0), safety_factor (≥ 1), pick: the choice.
    Raises:
        ConfigError: an invalid option.
    """

    start_lr: float = 1e-3
    factor: float = 2.0
    max_trials: int = 24
    min_lr: float = 1e-8
    max_lr: float = 1e3
    diverge_factor: float = 4.0
    min_rel_decrease: float = 0.01
    refine_trials: int = 2
    safety_factor: float = 2.0
    pick: str = "stable"

    def __post_init__(self):
        def bad(msg: str) -> None:
            raise ConfigError(f"--lr auto: {msg}")
        if not (0 < self.min_lr <= self.start_lr <= self.max_lr < math.inf):
            bad(f"need 0 < min_lr <= start_lr <= max_lr < inf, got {self.min_lr}, {self.start_lr}, {self.max_lr}")
        if not (self.factor > 1 and math.isfinite(self.factor)):
            bad(f"factor must be a finite number > 1 (e.g. 2), got {self.factor}")
        if self.max_trials < 2:
            bad(f"max_trials must be >= 2, got {self.max_trials}")
        if not (self.diverge_factor > 1):
            bad(f"diverge_factor must be > 1 (e.g. 4), got {self.diverge_factor}")
        if not (0 <= self.min_rel_decrease < 1):
            bad(f"min_rel_decrease must be in [0, 1), got {self.min_rel_decrease}")
        if self.refine_trials < 0 or not (self.safety_factor >= 1):
            bad(f"refine_trials must be >= 0 and safety_factor >= 1, got {self.refine_trials}, {self.safety_factor}")
        if self.pick not in LR_PICKS:
            bad(f"unknown pick {self.pick!r}; choose one of {', '.join(LR_PICKS)}")

    def init_state(self) -> LrSearchState:
        return LrSearchState()

    @staticmethod
    def _stable(state: LrSearchState) -> list[LrTrial]:
        return [t for t in state.trials if t.verdict == "stable"]

    @staticmethod
    def _unstable(state: LrSearchState) -> list[LrTrial]:
        return [t for t in state.trials if t.verdict in ("rose", "diverged")]

    def propose(self, state: LrSearchState) -> float | None:
        """The next learning rate to try, or None when the search is over."""
        if state.phase == "done":
            return None
        if not state.trials:
            return self.start_lr
        last = state.trials[-1].lr
        if state.phase == "up":
            return last * self.factor
        if state.phase == "down":
            return last / self.factor
        # Between the largest stable rate and the smallest rate above it that was not stable: a flat trial
        # up there (the loss barely moved: near the edge) bounds the interval as an unstable one does.
        lo = max(t.lr for t in self._stable(state))
        hi = min(t.lr for t in state.trials if t.lr > lo and t.verdict != "stable")
        return math.sqrt(lo * hi)

    def verdict(self, state: LrSearchState, loss_before: float, loss_after: float) -> str:
        """Classify one trial (see the class docstring)."""
        start = state.trials[0].loss_before if state.trials else loss_before
        if not math.isfinite(loss_after) or loss_after > self.diverge_factor * abs(start):
            return "diverged"
        if loss_after >= loss_before:
            return "rose"
        if loss_after < loss_before - self.min_rel_decrease * abs(loss_before):
            return "stable"
        return "flat"

    def observe(self, state: LrSearchState, lr: float, loss_before: float, loss_after: float) -> LrSearchState:
        """Record the trial at ``lr`` and move the search on. Pure.

        Raises ValueError for a non-positive lr or a non-finite loss before (the saved state itself is bad).
        """
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if not math.isfinite(loss_before):
            raise ValueError(f"the loss before a trial must be finite, got {loss_before}: the saved state is bad")
        trial = LrTrial(float(lr), float(loss_before), float(loss_after), self.verdict(state, loss_before, loss_after))
        state = replace(state, trials=state.trials + (trial,))
        have_stable, unstable = bool(self._stable(state)), trial.verdict in ("rose", "diverged")
        if state.phase == "refine":
            state = replace(state, n_refined=state.n_refined + 1)
        if len(state.trials) >= self.max_trials:
            return replace(state, phase="done")
        if state.phase == "up":
            if unstable and have_stable:
                phase = "refine" if self.refine_trials else "done"
            elif unstable:  # the start was already too large, unless smaller rates were merely flat
                phase = "down" if len(state.trials) == 1 else "done"
            else:
                phase = "up" if lr * self.factor <= self.max_lr else "done"
        elif state.phase == "down":
            if trial.verdict == "stable":
                phase = "refine" if self.refine_trials else "done"
            elif trial.verdict == "flat":  # smaller rates would fall even less
                phase = "done"
            else:
                phase = "down" if lr / self.factor >= self.min_lr else "done"
        else:  # refine
            phase = "done" if state.n_refined >= self.refine_trials else "refine"
        return replace(state, phase=phase)

    def result(self, state: LrSearchState) -> LrSearchResult:
        """The chosen base learning rate with its reason and the trial log.

        Raises:
            ConfigError: no trial was stable (the loss never fell by more than ``min_rel_decrease``): the
                message names the range tried and asks for an explicit ``--lr``.
        """
        log = tuple(t.describe() for t in state.trials)
        stable = self._stable(state)
        if not stable:
            tried = [t.lr for t in state.trials] or [self.start_lr]
            raise ConfigError(f"--lr auto found no learning rate between {min(tried):.3g} and {max(tried):.3g} "
                              f"that lowered the loss by more than {self.min_rel_decrease:.0%}; give --lr explicitly")
        unstable_above = [t for t in self._unstable(state) if t.lr > max(s.lr for s in stable)]
        edge = (f"first unstable {min(unstable_above, key=lambda t: t.lr).describe()}" if unstable_above
                else f"no instability up to lr {max(t.lr for t in state.trials):.4g}")
        if self.pick == "stable":
            best = max(stable, key=lambda t: t.lr)
            lr = best.lr / self.safety_factor
            reason = (f"lr {lr:.4g} = largest stable lr {best.lr:.4g} / safety factor {self.safety_factor:g}; "
                      f"{edge}")
        else:
            best = max(stable, key=lambda t: (t.loss_before - t.loss_after) / abs(t.loss_before))
            lr = best.lr
            reason = (f"lr {lr:.4g}: steepest fall of the loss among {len(stable)} stable trials "
                      f"({best.describe()}); {edge}")
        return LrSearchResult(lr=lr, reason=reason, log=log)
