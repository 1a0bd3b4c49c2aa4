"""Online gradient-diversity tracking inside the training step (``--diversity cheap|exact``).

Both paths put their few scalars into the tail of the gradient buffer, so they ride on the step's one
all-reduce; the estimators themselves live in :mod:`scalesgd.diversity`.

* ``exact`` — per-example path: ghost norms give S₁ = Σᵢ‖gᵢ‖² over the global batch (a scalar per rank,
  summed by the all-reduce) and the reduced gradient gives S₂ = ‖Σᵢgᵢ‖² = B²‖G_B‖²; then
  ‖G‖²̂ = (S₂ − S₁)/(B(B−1)), tr Σ̂ = S₁/B − ‖G‖²̂.
* ``cheap`` — two-batch-size path (no per-example norms): every rank's local mean gradient (its B_s,p
  examples) against the all-reduced mean gradient (B examples). The unbiased per-rank estimates are linear
  in ‖G_s,p‖² and ‖G_B‖², so their average over ranks needs only Σ_p of two per-rank scalars:
  u_p = B_s,p‖G_s,p‖²/(B − B_s,p) and v_p = ‖G_s,p‖²/(1/B_s,p − 1/B), giving
  ‖G‖²̂ = (‖G_B‖²·Σ_p B/(B − B_s,p) − Σ_p u_p)/P and tr Σ̂ = (Σ_p v_p − ‖G_B‖²·Σ_p 1/(1/B_s,p − 1/B))/P.
  With one worker there is no small batch; ``cheap`` then falls back to ``exact``.

Units: G is the gradient of the *mean* loss over the training set, Σ the per-example covariance; the
reported ``batch_bound_est`` is n·Δ̂ = B_simple + 1 and ``diversity_est`` is Δ̂.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from scalesgd.diversity import GhostNormTap, NoiseScaleEMA, per_example_noise_stats
from scalesgd.step import FlatModel


class DiversityTracker:
    """A :class:`scalesgd.step.StatsTap` that estimates ‖G‖², tr Σ and the batch bound every step.

    State (the EMA) is kept on the tracker and exposed as :attr:`ema_state`; it is a pure function of the
    per-step estimates, which are logged too.
    """

    def __init__(self, mode: str, model: torch.nn.Module, *, world_size: int, n_train: int, decay: float):
        if mode == "cheap" and world_size == 1:
            mode = "exact"  # no second batch size to compare with; documented in the option's help
        self.mode = mode
        self.n_train = n_train
        self.ema = NoiseScaleEMA(decay)
        self.ema_state = self.ema.init()
        self.ghost = GhostNormTap(model) if mode == "exact" else None
        self._local_b = 0

    def backward_context(self) -> Any:
        return self.ghost.capture() if self.ghost is not None else contextlib.nullcontext()

    def local_stats(self, flat: FlatModel, local_batch_size: int, global_batch_size: int,
                    loss_scale: float) -> list[float]:
        self._local_b = local_batch_size
        if local_batch_size == 0:
            return [0.0, 0.0]
        if self.mode == "exact":
            return [float(self.ghost.sq_norms(loss_scale).sum())]
        # The buffer holds Σ_{i∈shard} gᵢ / B; the local mean gradient is that times B / B_s.
        bs, bb = local_batch_size, global_batch_size
        if bs >= bb:
            return [0.0, 0.0]
        local_sq = float(torch.dot(flat.grad, flat.grad)) * (bb / bs) ** 2  # ‖G_s,p‖²
        return [bs * local_sq / (bb - bs), local_sq / (1.0 / bs - 1.0 / bb)]

    def after_reduce(self, flat: FlatModel, tap_sums: list[float], shard_sizes: list[int],
                     global_batch_size: int) -> dict[str, float]:
        bb = global_batch_size
        big_sq = float(torch.dot(flat.grad, flat.grad))  # ‖G_B‖² of the reduced mean gradient
        if self.mode == "exact":
            if bb < 2:
                return self._report(None)
            stats = per_example_noise_stats(tap_sums[0], big_sq * bb * bb, bb)
            return self._report((stats.grad_sq_norm, stats.trace_cov))
        ranks = [bs for bs in shard_sizes if 0 < bs < bb]
        if not ranks:
            return self._report(None)
        p = len(ranks)
        coef_g = sum(bb / (bb - bs) for bs in ranks)
        coef_t = sum(1.0 / (1.0 / bs - 1.0 / bb) for bs in ranks)
        g2 = (big_sq * coef_g - tap_sums[0]) / p
        tr = (tap_sums[1] - big_sq * coef_t) / p
        return self._report((g2, tr))

    def _report(self, step_estimate: tuple[float, float] | None) -> dict[str, float]:
        if step_estimate is not None and all(math.isfinite(v) for v in step_estimate):
            self.ema_state = self.ema.update(self.ema_state, *step_estimate)
        est = self.ema.estimate(self.ema_state, self.n_train)
        return {"grad_sq_norm_est": est.grad_sq_norm_est, "trace_cov_est": est.trace_cov_est,
                "batch_bound_est": est.batch_bound_est, "diversity_est": est.diversity_est,
                **({"grad_sq_norm_step": step_estimate[0], "trace_cov_step": step_estimate[1]}
                   if step_estimate is not None else {})}

    def close(self) -> None:
        if self.ghost is not None:
            self.ghost.close()
