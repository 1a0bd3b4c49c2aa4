"""Gradient diversity: exact data-set statistics and online estimators.

Conventions (one for the whole module, DESIGN rule 13): a *per-example gradient* is the gradient of that
example's own loss, ``g_i = grad_w loss(w; z_i)``, whatever reduction the training loss uses ("sum-reduced
per-example gradients"). The gradient of the mean loss over a batch of b examples is ``G_b = (1/b) sum_i g_i``.

* :func:`gradient_diversity` streams a data set through :class:`scalesgd.ghost_norms.GhostNormTap` (per-example
  squared norms from the ordinary backward pass) and the summed gradient, and forms Delta, M2 and n Delta.
* :func:`per_example_noise_stats`, :func:`two_batch_noise_stats` (and its average over the workers,
  :func:`rank_averaged_two_batch_noise_stats`, the one the trainer runs) and :class:`NoiseScaleEMA` estimate
  ``||G||^2`` and ``tr Sigma`` online during training, smooth them separately and only then form
  ``B_simple = tr Sigma / ||G||^2`` and the batch-size bound ``n Delta = B_simple + 1``
  (McCandlish et al., arXiv 1812.06162; Yin et al., arXiv 1706.05699).
* :func:`measure_exact_diversity` and :func:`diversity_at_checkpoint`: the exact whole-data figures of a run.

Names: ``sum_grad_sq_norm`` is ``||sum_i g_i||^2`` of the summed gradient, ``mean_grad_sq_norm`` (and the
metrics' ``grad_sq_norm_*``) ``||G||^2`` of the mean gradient; the two differ by n^2.
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
    """Gradient diversity of a set of n examples (Yin et al. 2018).

    All gradients are per-example loss gradients g_i (sum-reduced convention); G = (1/n) sum_i g_i is the
    gradient of the mean loss.

    Attributes:
        n: number of examples.
        sum_sq_norms: S1 = sum_i ||g_i||^2.
        sum_grad_sq_norm: S2 = ||sum_i g_i||^2 (of the *summed* gradient; ``mean_grad_sq_norm`` is S2 / n^2).
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
    sum_grad_sq_norm: float
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
    return DiversityStats(n=int(n), sum_sq_norms=s1, sum_grad_sq_norm=grad_sq, delta=delta, m2=m2,
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
    """One step's unbiased estimates of the gradient noise.

    Attributes:
        mean_grad_sq_norm: ||G||^2, the squared norm of the gradient of the *mean* loss (not of the sum).
        trace_cov: tr Sigma, the trace of the per-example gradient covariance.
    """

    mean_grad_sq_norm: float
    trace_cov: float


def per_example_noise_stats(sum_sq_norms: float, sum_grad_sq_norm: float, batch_size: int) -> NoiseStats:
    """Unbiased ||G||^2 and tr Sigma from one batch's per-example norms (lowest-variance path).

    With g_i the per-example loss gradients of the batch (sum-reduced convention; their mean is the mean-loss
    gradient), S1 = sum_i ||g_i||^2 and S2 = ||sum_i g_i||^2 (= b^2 ||G_b||^2 if you hold the mean gradient):
    ``||G||^2_hat = (S2 - S1) / (b (b - 1))``, ``tr Sigma_hat = S1 / b - ||G||^2_hat``
    (E S1 = b (tr Sigma + ||G||^2), E S2 = b tr Sigma + b^2 ||G||^2).

    Raises:
        ConfigError: if ``batch_size`` < 2.
    """
    b = int(batch_size)
    if b < 2:
        raise ConfigError(f"the per-example estimate needs a batch of at least 2 examples, got {b}")
    s1, s2 = float(sum_sq_norms), float(sum_grad_sq_norm)
    g2 = (s2 - s1) / (b * (b - 1))
    return NoiseStats(mean_grad_sq_norm=g2, trace_cov=s1 / b - g2)


def two_batch_noise_stats(small_mean_grad_sq_norm: float, small_batch_size: int, big_mean_grad_sq_norm: float,
                          big_batch_size: int) -> NoiseStats:
    """Unbiased ||G||^2 and tr Sigma from the squared norms of two mean-loss gradients (no per-example norms).

    ``small``: ||G_s||^2 of a gradient of the mean loss over B_s examples; ``big``: ||G_b||^2 of the mean
    gradient over B_b examples that include them. Since E||G_B||^2 = ||G||^2 + tr Sigma / B:
    ``||G||^2_hat = (B_b ||G_b||^2 - B_s ||G_s||^2) / (B_b - B_s)``,
    ``tr Sigma_hat = (||G_s||^2 - ||G_b||^2) / (1/B_s - 1/B_b)`` (McCandlish et al. 2018, appendix A.1).
    :func:`rank_averaged_two_batch_noise_stats` averages this over the P workers of a step.

    Raises:
        ConfigError: unless 0 < B_s < B_b.
    """
    bs, bb = int(small_batch_size), int(big_batch_size)
    if not 0 < bs < bb:
        raise ConfigError(f"the two-batch estimate needs 0 < small batch < big batch, got {bs} and {bb}: it needs "
                          "at least 2 workers; on one worker use the per-example path (--diversity exact)")
    gs, gb = float(small_mean_grad_sq_norm), float(big_mean_grad_sq_norm)
    return NoiseStats(mean_grad_sq_norm=(bb * gb - bs * gs) / (bb - bs), trace_cov=(gs - gb) / (1.0 / bs - 1.0 / bb))


def two_batch_rank_terms(local_mean_grad_sq_norm: float, local_batch_size: int,
                         global_batch_size: int) -> tuple[float, float]:
    """One rank's two scalars (u_p, v_p) for :func:`rank_averaged_two_batch_noise_stats`; summed over ranks.

    With ||G_s,p||^2 the squared norm of rank p's mean gradient over its B_s,p examples and B the global batch:
    ``u_p = B_s,p ||G_s,p||^2 / (B - B_s,p)``, ``v_p = ||G_s,p||^2 / (1/B_s,p - 1/B)``; (0, 0) for a rank with no
    examples or with the whole batch (it has no smaller batch to compare).
    """
    bs, bb = int(local_batch_size), float(global_batch_size)  # B may be an effective, fractional size (DDP)
    if not 0 < bs < bb:
        return 0.0, 0.0
    g2 = float(local_mean_grad_sq_norm)
    return bs * g2 / (bb - bs), g2 / (1.0 / bs - 1.0 / bb)


def rank_averaged_two_batch_noise_stats(sum_u: float, sum_v: float, global_mean_grad_sq_norm: float,
                                        shard_sizes: Sequence[int], global_batch_size: int) -> NoiseStats | None:
    """The mean over ranks of :func:`two_batch_noise_stats` (rank p's B_s,p examples against the global batch),
    from the all-reduced sums of :func:`two_batch_rank_terms` and the reduced gradient alone.

    Each per-rank estimate is linear in ||G_s,p||^2 and ||G_B||^2, so their average over the P' ranks with
    0 < B_s,p < B needs only Sigma_p u_p and Sigma_p v_p (two scalars riding on the gradient's all-reduce):
    ``||G||^2_hat = (||G_B||^2 Sigma_p B/(B - B_s,p) - Sigma_p u_p) / P'``,
    ``tr Sigma_hat = (Sigma_p v_p - ||G_B||^2 Sigma_p 1/(1/B_s,p - 1/B)) / P'``. Averaging the P estimates
    cuts the variance of one (McCandlish et al. 2018, appendix A.1).

    Args:
        sum_u, sum_v: Sigma_p u_p and Sigma_p v_p over all ranks.
        global_mean_grad_sq_norm: ||G_B||^2 of the all-reduced mean gradient over the global batch.
        shard_sizes: B_s,p of every rank (P,).
        global_batch_size: B = Sigma_p B_s,p (or DDP's effective batch, :func:`scalesgd.ddp.ddp_effective_batch_size`).
    Returns:
        :class:`NoiseStats`, or None when no rank holds a proper part of the batch (P = 1, or B < 2).
    """
    bb = float(global_batch_size)  # may be an effective, fractional size (scalesgd.ddp)
    ranks = [int(bs) for bs in shard_sizes if 0 < bs < bb]
    if not ranks:
        return None
    p = len(ranks)
    gb = float(global_mean_grad_sq_norm)
    coef_g = sum(bb / (bb - bs) for bs in ranks)
    coef_t = sum(1.0 / (1.0 / bs - 1.0 / bb) for bs in ranks)
    return NoiseStats(mean_grad_sq_norm=(gb * coef_g - float(sum_u)) / p, trace_cov=(float(sum_v) - gb * coef_t) / p)


@dataclass(frozen=True)
class EMAState:
    """Bias-uncorrected EMAs of ||G||^2 (of the mean gradient) and tr Sigma; ``weight`` = 1 - decay^steps
    corrects them."""

    mean_grad_sq_norm_avg: float = 0.0
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


@dataclass(frozen=True)
class NoiseEstimate:
    """What the trainer's estimate stage reports after a step: the smoothed estimates and the step's own.

    Attributes:
        smoothed: :class:`DiversityEstimate` after folding in this step.
        step: this step's unbiased :class:`NoiseStats`, or None when the step gave none (batch < 2, one
            worker on the two-batch path, or a non-finite value that was not folded in).
    """

    smoothed: DiversityEstimate
    step: NoiseStats | None

    def metrics(self) -> dict[str, float]:
        """The ``metrics.jsonl`` keys: ``grad_sq_norm_est``, ``trace_cov_est``, ``batch_bound_est``,
        ``diversity_est`` and, when the step gave an estimate, ``grad_sq_norm_step``, ``trace_cov_step``
        (every ``grad_sq_norm_*`` is ||G||^2 of the mean gradient)."""
        out = {"grad_sq_norm_est": self.smoothed.grad_sq_norm_est, "trace_cov_est": self.smoothed.trace_cov_est,
               "batch_bound_est": self.smoothed.batch_bound_est, "diversity_est": self.smoothed.diversity_est}
        if self.step is not None:
            out["grad_sq_norm_step"] = self.step.mean_grad_sq_norm
            out["trace_cov_step"] = self.step.trace_cov
        return out


def batch_bound_over_run(grad_sq_norms: Sequence[float], trace_covs: Sequence[float]) -> float | None:
    """B_S for a whole run from its per-step estimates of ||G||^2 (mean gradient) and tr Sigma:
    ``1 + sum tr / sum ||G||^2``.

    Numerator and denominator are averaged over every step and the ratio taken last:
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
    removes most of that (in simulation: ratio of means 409.8 vs true 415.3; plug-in per batch 60.7).

    ``decay=0.99`` (default): a time constant of 1/(1-decay) = 100 steps, i.e. an effective sample of
    (1+decay)/(1-decay) ~ 200 steps, which cuts the per-step noise by ~14x -- enough for +-10% at
    B_simple/b ~ 6 -- while still following the drift of the statistics over a training run of thousands of
    steps (they change on the scale of epochs, not steps). Use 0.995-0.999 for small batches or slow drift.

    A fixed per-step rate lags statistics that drift within its horizon: when a run nears a minimum of its
    training loss, ||G||^2 can fall by an order of magnitude within ~1/(1-decay) steps while tr Sigma falls
    less, so the smoothed ||G||^2 stays too large and the estimated B_S trails the exact one (compare with
    ``--exact-diversity-every``); a smaller decay follows faster at the price of more noise.
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
        return EMAState(mean_grad_sq_norm_avg=a * state.mean_grad_sq_norm_avg + (1 - a) * float(g2_hat),
                        trace_cov_avg=a * state.trace_cov_avg + (1 - a) * float(tr_hat),
                        weight=a * state.weight + (1 - a), steps=state.steps + 1)

    def estimate(self, state: EMAState, n: int) -> DiversityEstimate:
        """Bias-corrected ||G||^2, tr Sigma, B_simple, n Delta and Delta for a data set of n examples."""
        if n < 1:
            raise ConfigError(f"n (the data set size) must be positive, got {n}")
        if state.steps == 0:
            nan = math.nan
            return DiversityEstimate(nan, nan, nan, nan, nan, 0)
        g2 = state.mean_grad_sq_norm_avg / state.weight
        tr = state.trace_cov_avg / state.weight
        b_simple = tr / g2 if g2 > 0 else math.inf
        bound = b_simple + 1.0
        return DiversityEstimate(grad_sq_norm_est=g2, trace_cov_est=tr, b_simple_est=b_simple,
                                 batch_bound_est=bound, diversity_est=bound / n, steps=state.steps)

    def fold(self, state: EMAState, step: NoiseStats | None, n: int) -> tuple[EMAState, NoiseEstimate]:
        """Fold a step's :class:`NoiseStats` into the state when both values are finite (a diverging step's
        inf/NaN would poison the average for good); returns the new state and the :class:`NoiseEstimate`."""
        usable = step if step is not None and all(
            math.isfinite(v) for v in (step.mean_grad_sq_norm, step.trace_cov)) else None
        if usable is not None:
            state = self.update(state, usable.mean_grad_sq_norm, usable.trace_cov)
        return state, NoiseEstimate(smoothed=self.estimate(state, n), step=usable)


# --------------------------------------------------------------------------------------------------------
# Exact whole-data diversity of a training run


def measure_exact_diversity(model: nn.Module, loss_fn: LossFn, x_train: torch.Tensor | None,
                            y_train: torch.Tensor | None, *, world: Any = None, batch_size: int = 1024,
                            dataset: Any = None) -> dict[str, float]:
    """Exact Delta_S, M2, ||G||^2 (mean gradient), tr Sigma, B_S and B_simple over a whole training set at the
    current weights, as the flat record a ``diversity`` line of ``metrics.jsonl`` holds.

    Every rank of ``world`` streams its contiguous part of (x_train, y_train) (N, ...) and the sums are
    all-reduced (Yin et al. 2018, eq. 3); ranks must call this collectively.

    Args:
        model: the model at the weights to measure.
        loss_fn: per-example loss (``reduction="none"``).
        x_train, y_train: the whole training set (every rank passes all of it).
        dataset: instead of the tensors, a :class:`scalesgd.data.Dataset` read by index (its
            ``train_batch``), for sets not held in memory; a dataset in memory uses its tensors.
        world: optional :class:`scalesgd.distributed.World`.
        batch_size: chunk size per backward pass.
    Returns:
        ``{"delta", "m2", "mean_grad_sq_norm", "trace_cov", "batch_bound", "b_simple", "n"}``.
    """
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    if dataset is not None and dataset.in_memory:
        x_train, y_train, dataset = dataset.x_train, dataset.y_train, None
    device = world.device if world is not None else next(model.parameters()).device
    n = dataset.n_train if dataset is not None else x_train.shape[0]
    part = torch.tensor_split(torch.arange(n), size)[rank]
    if dataset is None:
        x, y = x_train[part].to(device), y_train[part].to(device)
        stats = gradient_diversity(model, loss_fn, x, y, world=world, batch_size=batch_size)
    else:
        from scalesgd.data.user import to_device

        def batches():  # this rank's part, read a chunk at a time
            for chunk in torch.split(part, batch_size):
                xb, yb = dataset.train_batch(chunk)
                yield to_device(xb, device), yb.to(device)

        stats = gradient_diversity(model, loss_fn, batches(), world=world)
    return {"delta": stats.delta, "m2": stats.m2, "mean_grad_sq_norm": stats.mean_grad_sq_norm,
            "trace_cov": stats.trace_cov, "batch_bound": stats.batch_bound, "b_simple": stats.b_simple,
            "n": stats.n}


def diversity_at_checkpoint(path: Any) -> dict[str, float]:
    """Exact whole-data diversity at a run's saved checkpoint (``RUN_DIR`` or ``RUN_DIR/checkpoint.pt``).

    Rebuilds the run's data set and model from the config saved in the checkpoint, loads the weights and
    measures in train mode (dropout, if any, is part of the gradients, as during training). Writes
    ``diversity_checkpoint.json`` next to the checkpoint and returns ``{"step", **measure_exact_diversity}``.

    Raises:
        DataError: no checkpoint at ``path``, or one that is damaged, not a scalesgd checkpoint, or whose
            weights do not fit the model its own config builds (:func:`scalesgd.writer.load_checkpoint`).
    """
    from pathlib import Path

    from scalesgd.config import RunConfig
    from scalesgd.data import load_data
    from scalesgd.errors import DataError
    from scalesgd.user_code import build_run_model, loss_for
    from scalesgd.writer import load_checkpoint, write_json_atomic

    path = Path(path)
    ckpt_path = path / "checkpoint.pt" if path.is_dir() else path
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["model"], dict):
        raise DataError(f"{ckpt_path} is not a scalesgd checkpoint (its config or model is not a mapping)")
    known = {k: v for k, v in ckpt["config"].items() if k in RunConfig.__dataclass_fields__}
    known["lr_milestones"] = tuple(known.get("lr_milestones", ()))
    cfg = RunConfig(**known)
    ds = load_data(cfg)
    model = build_run_model(cfg, input_shape=ds.input_shape, num_outputs=ds.num_outputs)  # the run's own
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:  # another model's weights: missing/unexpected/shapes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{ckpt_path} does not hold weights of the model its own config describes ({first[:160]}); "
                        "it is damaged or was taken from another run") from None
    model.train()
    stats = {"step": ckpt["step"], **measure_exact_diversity(model, loss_for(cfg.loss, ds.task, "none"), ds.x_train,
                                                             ds.y_train, dataset=ds)}
    write_json_atomic(ckpt_path.parent / "diversity_checkpoint.json", stats)
    return stats
