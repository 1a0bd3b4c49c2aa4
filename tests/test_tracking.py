"""The trainer's in-step diversity tap agrees with the estimators it is built from (the slow references):
cheap = the average over ranks of the per-rank two-batch estimates; exact = the per-example estimate."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from scalesgd.diversity import per_example_noise_stats, two_batch_noise_stats
from scalesgd.models import mlp
from scalesgd.tracking import DiversityTracker


@pytest.mark.parametrize("shard_sizes", [[5, 5], [4, 3, 3], [7, 6, 6, 6]])
def test_cheap_tap_equals_mean_of_per_rank_two_batch_estimates(shard_sizes):
    g = torch.Generator().manual_seed(len(shard_sizes))
    B, dim = sum(shard_sizes), 50
    per_example = torch.randn(B, dim, generator=g, dtype=torch.float64) + 0.3  # (B, dim)
    shards = torch.split(per_example, shard_sizes)
    model = mlp(input_shape=(4,), num_outputs=2, width=3)
    taps = [DiversityTracker("cheap", model, world_size=len(shard_sizes), n_train=1000, decay=0.5)
            for _ in shard_sizes]
    # Each rank's buffer holds Σ_{i∈shard} gᵢ / B; the all-reduce sums the buffers and the tap slots.
    sums = [0.0, 0.0]
    for tap, shard in zip(taps, shards):
        values = tap.local_stats(SimpleNamespace(grad=shard.sum(0) / B), len(shard), B, 1.0 / B)
        sums = [a + b for a, b in zip(sums, values)]
    reduced = SimpleNamespace(grad=per_example.sum(0) / B)
    out = taps[0].after_reduce(reduced, sums, shard_sizes, B)

    big_sq = float(reduced.grad.square().sum())
    reference = [two_batch_noise_stats(float((s.mean(0)).square().sum()), len(s), big_sq, B) for s in shards]
    g2 = sum(r.grad_sq_norm for r in reference) / len(reference)
    tr = sum(r.trace_cov for r in reference) / len(reference)
    assert out["grad_sq_norm_step"] == pytest.approx(g2, rel=1e-9)
    assert out["trace_cov_step"] == pytest.approx(tr, rel=1e-9)
    assert out["batch_bound_est"] == pytest.approx(tr / g2 + 1, rel=1e-9)  # first EMA step: the step's own


def test_exact_tap_equals_per_example_estimate():
    torch.manual_seed(0)
    model = mlp(input_shape=(6,), num_outputs=3, width=8)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    tap = DiversityTracker("exact", model, world_size=1, n_train=100, decay=0.9)
    B = 10
    loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum") / B
    with tap.backward_context():
        loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    s1 = tap.local_stats(SimpleNamespace(grad=grad), B, B, 1.0 / B)
    out = tap.after_reduce(SimpleNamespace(grad=grad), s1, [B], B)
    ref = per_example_noise_stats(s1[0], float(grad.square().sum()) * B * B, B)
    assert out["grad_sq_norm_step"] == pytest.approx(ref.grad_sq_norm, rel=1e-6)
    assert out["trace_cov_step"] == pytest.approx(ref.trace_cov, rel=1e-6)
    tap.close()


def test_cheap_on_one_worker_uses_the_exact_path():
    assert DiversityTracker("cheap", mlp(input_shape=(2,), num_outputs=2, width=2), world_size=1, n_train=10,
                            decay=0.9).mode == "exact"
