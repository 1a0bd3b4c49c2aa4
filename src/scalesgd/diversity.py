"""Gradient diversity: exact data-set statistics and online estimators.

Conventions (one for the whole module, DESIGN rule 13): a *per-example gradient* is the gradient of that
example's own loss, ``g_i = grad_w loss(w; z_i)``, whatever reduction the training loss uses ("sum-reduced
per-example gradients"). The gradient of the mean loss over a batch of b examples is ``G_b = (1/b) sum_i g_i``.

* :func:`gradient_diversity` streams a data set through :class:`scalesgd.ghost_norms.GhostNormTap` (per-example
  squared norms from the ordinary backward pass) and the summed gradient, and forms Delta, M2 and n Delta.
* :func:`per_example_noise_stats`, :func:`two_batch_noise_stats` and :class:`NoiseScaleEMA` estimate
  ``||G||^2`` and ``tr Sigma`` online during training, smooth them separately and only then form
  ``B_simple = tr Sigma / ||G||^2`` and the batch-size bound ``n Delta = B_simple + 1``
  (McCandlish et al., arXiv 1812.06162; Yin et al., arXiv 1706.05699; REFERENCES section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from scalesgd.errors import ConfigError
from scalesgd.ghost_norms import GhostNormTap, LossFn, _norms_and_grad, _trainable


# --------------------------------------------------------------------------------------------------------
# Exact diversity of a data set (streaming, optionally across workers)


@dataclass(frozen=True)
class DiversityStats:
    """Gradient diversity of a set of n examples (Yin et al. 2018; REFERENCES section 3).

    All gradients are per-example loss gradients g_i (sum-reduced convention); G = (1/n) sum_i g_i is the
    gradient of the mean loss.

    Attributes:
        n: number of examples.
        sum_sq_norms: S1 = sum_i ||g_i||^2.
        grad_sq_norm: ||sum_i g_i||^2.
        delta: Delta = S1 / ||sum_i g_i||^2, in [1/n, inf).
        m2: M2 = S1 / n.
        mean_grad_sq_norm: ||G||^2 = ||sum_i g_i||^2 / n^2.
        trace_cov: tr Sigma = M2 - ||G||^2 (per-example covariance over the n examples, 1/n normalised).
        batch_bound: B_S = n Delta = M2 / ||G||^2, the batch size up to which minibatch SGD keeps its
            sample efficiency.
        b_simple: the gradient noise scale tr Sigma / ||G||^2 (McCandlish et al. 2018); n Delta = b_simple + 1.
    """

    n: int
    sum_sq_norms: float
    grad_sq_norm: float
    delta: float
    m2: float
    mean_grad_sq_norm: float
    trace_cov: float
    batch_bound: float
    b_simple: float


def diversity_from_sums(sum_sq_norms: float, sum_grad: torch.Tensor | float, n: int) -> DiversityStats:
    """:class:`DiversityStats` from S1 = sum_i ||g_i||^2, the summed gradient (vector, or its squared norm) and n."""
    if n < 1:
        raise ConfigError(f"diversity needs at least one example, got n={n}")
    grad_sq = float(sum_grad) if not isinstance(sum_grad, torch.Tensor) else float(
        sum_grad.double().square().sum())
    s1 = float(sum_sq_norms)
    delta = s1 / grad_sq if grad_sq > 0 else math.inf
    m2 = s1 / n
    g2 = grad_sq / (n * n)
    trace = m2 - g2
    return DiversityStats(n=int(n), sum_sq_norms=s1, grad_sq_norm=grad_sq, delta=delta, m2=m2,
                          mean_grad_sq_norm=g2, trace_cov=trace, batch_bound=n * delta,
                          b_simple=trace / g2 if g2 > 0 else math.inf)


def _batches(inputs_or_loader: torch.Tensor | Iterable, targets: torch.Tensor | None,
             batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(inputs_or_loader, torch.Tensor):
        if targets is None:
            raise ConfigError("gradient_diversity: with an input tensor, pass the targets too")
        if targets.shape[0] != inputs_or_loader.shape[0]:
            raise ConfigError(f"gradient_diversity: {inputs_or_loader.shape[0]} inputs but {targets.shape[0]} "
                              "targets")
        for start in range(0, inputs_or_loader.shape[0], batch_size):
            yield inputs_or_loader[start:start + batch_size], targets[start:start + batch_size]
    else:
        if targets is not None:
            raise ConfigError("gradient_diversity: pass targets only with an input tensor; a loader yields "
                              "(x, y) batches itself")
        for batch in inputs_or_loader:
            x, y = batch[0], batch[1]
            yield x, y


def gradient_diversity(model: nn.Module, loss_fn: LossFn, inputs_or_loader: torch.Tensor | Iterable,
                       targets: torch.Tensor | None = None, *, world: Any = None,
                       batch_size: int = 512) -> DiversityStats:
    """Exact gradient diversity Delta = sum_i ||g_i||^2 / ||sum_i g_i||^2 of a data set at the current weights.

    Streams batches: the numerator accumulates per-example squared norms (ghost norms), the denominator the
    summed gradient vector (float64), both from one backward pass per batch. With ``world`` (a
    :class:`scalesgd.distributed.World` of size > 1) every rank passes its own part of the data set and the
    numerator, n and the summed gradient are all-reduced in one call, so the result is that of the union.

    Args:
        model: the model, in the mode to measure (its dropout, if in train mode, is part of the gradients).
        loss_fn: ``torch.nn`` loss module or per-example loss function (reduction is irrelevant).
        inputs_or_loader: an (N, ...) input tensor, or an iterable of (x, y) batches.
        targets: the (N, ...) targets when ``inputs_or_loader`` is a tensor.
        world: optional World; ranks must call this collectively.
        batch_size: chunk size for tensor inputs.
    Returns:
        :class:`DiversityStats` (Yin et al. 2018, eq. 3; n Delta = B_simple + 1).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    params = _trainable(model)
    numel = sum(p.numel() for p in params)
    device = params[0].device
    acc = torch.zeros(numel + 2, dtype=torch.float64, device=device)  # [sum_i g_i (flat), S1, n]
    with GhostNormTap(model) as tap:
        for x, y in _batches(inputs_or_loader, targets, batch_size):
            sq, grads = _norms_and_grad(tap, model, loss_fn, x, y, params, want_grad=True)
            offset = 0
            for gr in grads:
                acc[offset:offset + gr.numel()] += gr.detach().reshape(-1).double()
                offset += gr.numel()
            acc[numel] += sq.double().sum()
            acc[numel + 1] += sq.shape[0]
    if world is not None and world.size > 1:
        import torch.distributed as dist

        dist.all_reduce(acc)
    n = int(round(float(acc[numel + 1])))
    return diversity_from_sums(float(acc[numel]), acc[:numel], n)


# --------------------------------------------------------------------------------------------------------
# Online estimators during training


def local_grad_sq_norm(grads: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    """``||G||^2`` of a gradient held as one flat buffer (one dot product) or as a list of tensors; 0-d tensor."""
    if isinstance(grads, torch.Tensor):
        flat = grads.reshape(-1)
        return torch.dot(flat, flat)
    return sum(torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads)


@dataclass(frozen=True)
class NoiseStats:
    """One step's unbiased estimates: ``grad_sq_norm`` = ||G||^2 (mean-loss gradient), ``trace_cov`` = tr Sigma."""

    grad_sq_norm: float
    trace_cov: float


def per_example_noise_stats(sum_sq_norms: float, sum_grad_sq_norm: float, batch_size: int) -> NoiseStats:
    """Unbiased ||G||^2 and tr Sigma from one batch's per-example norms (lowest-variance path).

    With g_i the per-example loss gradients of the batch (sum-reduced convention; their mean is the mean-loss
    gradient), S1 = sum_i ||g_i||^2 and S2 = ||sum_i g_i||^2 (= b^2 ||G_b||^2 if you hold the mean gradient):
    ``||G||^2_hat = (S2 - S1) / (b (b - 1))``, ``tr Sigma_hat = S1 / b - ||G||^2_hat``
    (REFERENCES section 3; E S1 = b (tr Sigma + ||G||^2), E S2 = b tr Sigma + b^2 ||G||^2).
    """
    b = int(batch_size)
    if b < 2:
        raise ConfigError(f"the per-example estimate needs a batch of at least 2 examples, got {b}")
    s1, s2 = float(sum_sq_norms), float(sum_grad_sq_norm)
    g2 = (s2 - s1) / (b * (b - 1))
    return NoiseStats(grad_sq_norm=g2, trace_cov=s1 / b - g2)


def two_batch_noise_stats(small_grad_sq_norm: float, small_batch_size: int, big_grad_sq_norm: float,
                          big_batch_size: int) -> NoiseStats:
    """Unbiased ||G||^2 and tr Sigma from the squared norms of two mean-loss gradients (no per-example norms).

    ``small``: a worker's local gradient of the mean loss over its B_s examples (averaged over the P workers
    -- one extra scalar all-reduce -- to cut variance); ``big``: the all-reduced mean gradient over B_b
    examples. Since E||G_B||^2 = ||G||^2 + tr Sigma / B:
    ``||G||^2_hat = (B_b ||G_b||^2 - B_s ||G_s||^2) / (B_b - B_s)``,
    ``tr Sigma_hat = (||G_s||^2 - ||G_b||^2) / (1/B_s - 1/B_b)`` (McCandlish et al. 2018, appendix A.1).
    """
    bs, bb = int(small_batch_size), int(big_batch_size)
    if not 0 < bs < bb:
        raise ConfigError(f"the two-batch estimate needs 0 < small batch < big batch, got {bs} and {bb}: it needs "
                          "at least 2 workers; on one worker use the per-example path (--diversity exact)")
    gs, gb = float(small_grad_sq_norm), float(big_grad_sq_norm)
    return NoiseStats(grad_sq_norm=(bb * gb - bs * gs) / (bb - bs), trace_cov=(gs - gb) / (1.0 / bs - 1.0 / bb))


@dataclass(frozen=True)
class EMAState:
    """Bias-uncorrected EMAs of ||G||^2 and tr Sigma; ``weight`` = 1 - decay^steps corrects them."""

    grad_sq_norm_avg: float = 0.0
    trace_cov_avg: float = 0.0
    weight: float = 0.0
    steps: int = 0


@dataclass(frozen=True)
class DiversityEstimate:
    """Smoothed estimates. ``grad_sq_norm_est`` is ||G||^2 of the *mean*-loss gradient (not of the sum),
    ``trace_cov_est`` tr Sigma, ``b_simple_est`` their ratio, ``batch_bound_est`` = b_simple + 1 = n Delta,
    ``diversity_est`` = batch_bound / n. NaN before the first update; inf when ||G||^2_est <= 0 (noise wins)."""

    grad_sq_norm_est: float
    trace_cov_est: float
    b_simple_est: float
    batch_bound_est: float
    diversity_est: float
    steps: int


def batch_bound_over_run(grad_sq_norms: Sequence[float], trace_covs: Sequence[float]) -> float | None:
    """B_S for a whole run from its per-step estimates of ||G||^2 and tr Sigma: 1 + sum tr / sum ||G||^2.

    Numerator and denominator are averaged over every step and the ratio taken last (REFERENCES section 3):
    :class:`NoiseScaleEMA` with the whole run as its horizon. Steps where either estimate is not finite are
    skipped. Returns None when no step is usable or the summed ||G||^2 is not positive (noise wins).
    """
    pairs = [(float(g), float(t)) for g, t in zip(grad_sq_norms, trace_covs, strict=True)
             if math.isfinite(g) and math.isfinite(t)]
    g2_sum = sum(g for g, _ in pairs)
    if not pairs or g2_sum <= 0:
        return None
    return 1.0 + sum(t for _, t in pairs) / g2_sum


@dataclass(frozen=True)
class NoiseScaleEMA:
    """Smooth ||G||^2 and tr Sigma separately (bias-corrected EMA), then take the ratio.

    Each per-step estimate is unbiased but very noisy (its ||G||^2 is often negative when B_simple >> b), and
    the ratio of two noisy numbers is biased; averaging numerator and denominator first and dividing last
    removes most of that (REFERENCES section 3: ratio of means 409.8 vs true 415.3; plug-in per batch 60.7).

    ``decay=0.99`` (default): a time constant of 1/(1-decay) = 100 steps, i.e. an effective sample of
    (1+decay)/(1-decay) ~ 200 steps, which cuts the per-step noise by ~14x -- enough for +-10% at
    B_simple/b ~ 6 -- while still following the drift of the statistics over a training run of thousands of
    steps (they change on the scale of epochs, not steps). Use 0.995-0.999 for small batches or slow drift.
    """

    decay: float = 0.99

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {self.decay}; 0.99 averages over ~100 steps")

    def init(self) -> EMAState:
        return EMAState()

    def update(self, state: EMAState | None, g2_hat: float, tr_hat: float) -> EMAState:
        """Fold one step's estimates of ||G||^2 and tr Sigma into the state; returns the new state."""
        state = EMAState() if state is None else state
        a = self.decay
        return EMAState(grad_sq_norm_avg=a * state.grad_sq_norm_avg + (1 - a) * float(g2_hat),
                        trace_cov_avg=a * state.trace_cov_avg + (1 - a) * float(tr_hat),
                        weight=a * state.weight + (1 - a), steps=state.steps + 1)

    def estimate(self, state: EMAState, n: int) -> DiversityEstimate:
        """Bias-corrected ||G||^2, tr Sigma, B_simple, n Delta and Delta for a data set of n examples."""
        if n < 1:
            raise ConfigError(f"n (the data set size) must be positive, got {n}")
        if state.steps == 0:
            nan = math.nan
            return DiversityEstimate(nan, nan, nan, nan, nan, 0)
        g2 = state.grad_sq_norm_avg / state.weight
        tr = state.trace_cov_avg / state.weight
        b_simple = tr / g2 if g2 > 0 else math.inf
        bound = b_simple + 1.0
        return DiversityEstimate(grad_sq_norm_est=g2, trace_cov_est=tr, b_simple_est=b_simple,
                                 batch_bound_est=bound, diversity_est=bound / n, steps=state.steps)
