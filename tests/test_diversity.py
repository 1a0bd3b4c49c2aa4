"""Diversity invariants on models, and the online estimators on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scalesgd.diversity as div
from scalesgd.diversity import (NoiseScaleEMA, batch_bound_over_run, gradient_diversity, per_example_noise_stats,
                                two_batch_noise_stats)
from scalesgd.errors import ConfigError
from scalesgd.models import cnn, cnn1d, mlp

CE = nn.CrossEntropyLoss()


# ---------------------------------------------------------------------------------------------------------
# exact diversity of a data set: invariants


def test_diversity_is_at_least_one_over_n_and_does_not_touch_grad():
    torch.manual_seed(0)
    model = mlp(input_shape=(10,), num_outputs=4, width=12, dropout=0.2)
    x, y = torch.randn(40, 10), torch.randint(0, 4, (40,))
    stats = gradient_diversity(model, CE, x, y, batch_size=16)
    assert stats.n == 40
    assert stats.delta >= 1.0 / stats.n
    assert stats.batch_bound == pytest.approx(stats.n * stats.delta)
    assert all(p.grad is None for p in model.parameters())


def test_identical_gradients_give_one_over_n():
    torch.manual_seed(0)
    model = cnn1d(input_shape=(20,), num_outputs=3, width=4, norm="group")
    n = 12
    x, y = torch.randn(1, 20).repeat(n, 1), torch.full((n,), 2)
    stats = gradient_diversity(model, CE, x, y, batch_size=5)
    assert stats.delta == pytest.approx(1.0 / n, rel=1e-5)
    assert stats.b_simple == pytest.approx(0.0, abs=1e-4)


def test_orthogonal_gradients_give_one():
    # f_i(W) = 1/2 ||W e_i - y_i||^2: g_i = (W e_i - y_i) e_i^T, supported on column i only
    torch.manual_seed(0)
    n = 10
    model = nn.Linear(n, 3, bias=False)
    stats = gradient_diversity(model, nn.MSELoss(), torch.eye(n), torch.randn(n, 3), batch_size=4)
    assert stats.delta == pytest.approx(1.0, rel=1e-5)


def test_batch_bound_equals_b_simple_plus_one_and_matches_explicit_covariance():
    torch.manual_seed(0)
    model = mlp(input_shape=(8,), num_outputs=3, width=6, norm="group").double()
    x, y = torch.randn(30, 8, dtype=torch.float64), torch.randint(0, 3, (30,))
    stats = gradient_diversity(model, CE, x, y, batch_size=7)
    assert stats.n * stats.delta == pytest.approx(stats.b_simple + 1.0, rel=1e-6)
    # independent route: materialise every per-example gradient, take the covariance trace
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(prm, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, prm, (xi[None],)), yi[None], reduction="sum")

    per = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([v.reshape(30, -1) for v in per.values()], 1)  # (n, D)
    mean = g.mean(0)
    trace = (g - mean).square().sum(1).mean()
    assert stats.b_simple == pytest.approx(float(trace / mean.square().sum()), rel=1e-6)
    assert stats.delta == pytest.approx(float(g.square().sum() / g.sum(0).square().sum()), rel=1e-6)


def test_streaming_loader_equals_one_batch():
    torch.manual_seed(0)
    model = cnn(input_shape=(3, 8, 8), num_outputs=4, width=4, norm="group")
    x, y = torch.randn(20, 3, 8, 8), torch.randint(0, 4, (20,))
    whole = gradient_diversity(model, CE, x, y, batch_size=20)
    loader = [(x[i:i + 6], y[i:i + 6]) for i in range(0, 20, 6)]
    streamed = gradient_diversity(model, CE, loader)
    for field in ("sum_sq_norms", "sum_grad_sq_norm", "delta", "b_simple"):
        assert getattr(streamed, field) == pytest.approx(getattr(whole, field), rel=1e-5)
    assert streamed.n == whole.n == 20
    with pytest.raises(ConfigError):
        gradient_diversity(model, CE, x)


# ---------------------------------------------------------------------------------------------------------
# online estimators on synthetic gradients with a known B_simple


def synthetic_problem(d=256, b_simple=400.0, seed=0):
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(d)
    mean /= np.linalg.norm(mean)  # ||G||^2 = 1
    var = rng.uniform(0.2, 1.8, d)
    var *= b_simple / var.sum()  # tr Sigma = b_simple, anisotropic
    return rng, mean, np.sqrt(var)


def test_online_estimators_recover_b_simple_and_plugin_does_not():
    true_b_simple = 400.0
    rng, mean, std = synthetic_problem(b_simple=true_b_simple)
    workers, local_b, steps = 4, 128, 800
    global_b = workers * local_b
    ema = NoiseScaleEMA()  # default decay
    per_example_state = two_batch_state = None
    plugin = []
    for _ in range(steps):
        g = mean + rng.standard_normal((global_b, mean.size)) * std  # per-example gradients, worker-major
        # per-example path on the global batch: S1 and S2 are what the all-reduced tap sums give
        s1, s2 = float((g * g).sum()), float(np.square(g.sum(0)).sum())
        st = per_example_noise_stats(s1, s2, global_b)
        per_example_state = ema.update(per_example_state, st.mean_grad_sq_norm, st.trace_cov)
        # two-batch path: each worker's local mean gradient and the global one
        local_means = g.reshape(workers, local_b, -1).mean(1)  # (P, d)
        small = float(np.square(local_means).sum(1).mean())  # ||G_s||^2 averaged over the P workers
        big = float(np.square(local_means.mean(0)).sum())  # ||G_b||^2
        st = two_batch_noise_stats(small, local_b, big, global_b)
        two_batch_state = ema.update(two_batch_state, st.mean_grad_sq_norm, st.trace_cov)
        g0 = g[:local_b]  # one worker's batch: the plug-in diversity of a single minibatch
        plugin.append(local_b * float((g0 * g0).sum()) / float(np.square(g0.sum(0)).sum()))
    n = 50_000
    for state in (per_example_state, two_batch_state):
        est = ema.estimate(state, n)
        assert est.b_simple_est == pytest.approx(true_b_simple, rel=0.10)
        assert est.batch_bound_est == pytest.approx(est.b_simple_est + 1)
        assert est.diversity_est == pytest.approx(est.batch_bound_est / n)
        assert est.grad_sq_norm_est == pytest.approx(1.0, rel=0.10)
        assert est.trace_cov_est == pytest.approx(true_b_simple, rel=0.10)
    # the plug-in b * Delta_batch saturates near b (E ~ b (trS + |G|^2) / (trS + b |G|^2) = 97 here), far
    # below the truth n Delta = 401, and averaging over steps does not help: that is why it is not reported
    assert np.mean(plugin) < local_b
    assert np.mean(plugin) < 0.3 * (true_b_simple + 1)


def test_per_example_estimates_are_unbiased_on_average():
    rng, mean, std = synthetic_problem(d=64, b_simple=20.0, seed=1)
    g2, tr = [], []
    for _ in range(3000):
        g = mean + rng.standard_normal((8, mean.size)) * std
        st = per_example_noise_stats(float((g * g).sum()), float(np.square(g.sum(0)).sum()), 8)
        g2.append(st.mean_grad_sq_norm)
        tr.append(st.trace_cov)
    assert np.mean(g2) == pytest.approx(1.0, abs=4 * np.std(g2) / math.sqrt(3000))
    assert np.mean(tr) == pytest.approx(20.0, abs=4 * np.std(tr) / math.sqrt(3000))


def test_ema_is_bias_corrected_pure_and_validated():
    ema = NoiseScaleEMA(0.9)
    state = ema.init()
    assert math.isnan(ema.estimate(state, 10).b_simple_est)
    s1 = ema.update(state, 2.0, 6.0)
    assert state.steps == 0 and s1.steps == 1  # state is returned, not mutated
    est = ema.estimate(s1, 10)
    assert (est.grad_sq_norm_est, est.trace_cov_est) == pytest.approx((2.0, 6.0))
    assert (est.b_simple_est, est.batch_bound_est, est.diversity_est) == pytest.approx((3.0, 4.0, 0.4))
    s2 = ema.update(s1, 2.0, 6.0)
    assert ema.estimate(s2, 10).b_simple_est == pytest.approx(3.0)
    assert ema.estimate(ema.update(None, -1.0, 5.0), 10).b_simple_est == math.inf
    with pytest.raises(ConfigError):
        NoiseScaleEMA(1.0)
    with pytest.raises(ConfigError, match="2 workers"):
        two_batch_noise_stats(1.0, 64, 1.0, 64)
    with pytest.raises(ConfigError):
        per_example_noise_stats(1.0, 1.0, 1)


def test_local_grad_sq_norm():
    flat = torch.arange(5.0)
    assert float(div.local_grad_sq_norm(flat)) == 30.0
    assert float(div.local_grad_sq_norm([flat[:2], flat[2:]])) == 30.0


def test_batch_bound_over_run_is_the_ema_with_the_run_as_horizon():
    """1 + Σtr/Σ‖G‖² equals NoiseScaleEMA's estimate as its decay goes to 1 (every step weighted alike)."""
    rng = np.random.default_rng(3)
    g2 = rng.normal(1.0, 3.0, 500)  # per-step ‖G‖² estimates: unbiased, noisy, often negative
    tr = rng.normal(40.0, 10.0, 500)
    ema = NoiseScaleEMA(1.0 - 1e-9)
    state = ema.init()
    for g, t in zip(g2, tr):
        state = ema.update(state, g, t)
    want = ema.estimate(state, 1000).batch_bound_est
    assert batch_bound_over_run(g2, tr) == pytest.approx(want, rel=1e-5)
    assert batch_bound_over_run(list(g2) + [math.nan], list(tr) + [1.0]) == pytest.approx(want, rel=1e-5)
    assert batch_bound_over_run([-1.0, 0.5], [3.0, 3.0]) is None  # summed ‖G‖² <= 0: noise wins
    assert batch_bound_over_run([], []) is None


# ---------------------------------------------------------------------------------------------------------
# the rank-averaged two-batch form the trainer runs (--diversity cheap)


@pytest.mark.parametrize("shard_sizes", [[4, 4], [5, 4, 4], [1, 9], [3, 0, 3]])
def test_rank_averaged_two_batch_equals_mean_of_per_rank_estimates(shard_sizes):
    """Slow reference: two_batch_noise_stats computed on each rank's explicit gradients, averaged over ranks."""
    rng = np.random.default_rng(len(shard_sizes))
    B = sum(shard_sizes)
    g = rng.standard_normal((B, 30)) + 0.5  # per-example gradients, rank-major
    shards = np.split(g, np.cumsum(shard_sizes)[:-1])
    big = float(np.square(g.mean(0)).sum())
    terms = [div.two_batch_rank_terms(float(np.square(s.mean(0)).sum()) if len(s) else 0.0, len(s), B)
             for s in shards]
    got = div.rank_averaged_two_batch_noise_stats(sum(u for u, _ in terms), sum(v for _, v in terms), big,
                                                  shard_sizes, B)
    per_rank = [two_batch_noise_stats(float(np.square(s.mean(0)).sum()), len(s), big, B) for s in shards if len(s)]
    assert got.mean_grad_sq_norm == pytest.approx(np.mean([r.mean_grad_sq_norm for r in per_rank]), rel=1e-10)
    assert got.trace_cov == pytest.approx(np.mean([r.trace_cov for r in per_rank]), rel=1e-10)


def test_rank_averaged_two_batch_is_unbiased_and_none_without_a_smaller_batch():
    rng, mean, std = synthetic_problem(d=64, b_simple=30.0, seed=2)  # ||G||^2 = 1, tr Sigma = 30
    shard_sizes, trials = [6, 5, 5], 4000
    B = sum(shard_sizes)
    g2, tr = [], []
    for _ in range(trials):
        g = mean + rng.standard_normal((B, mean.size)) * std
        shards = np.split(g, np.cumsum(shard_sizes)[:-1])
        terms = [div.two_batch_rank_terms(float(np.square(s.mean(0)).sum()), len(s), B) for s in shards]
        st = div.rank_averaged_two_batch_noise_stats(sum(u for u, _ in terms), sum(v for _, v in terms),
                                                     float(np.square(g.mean(0)).sum()), shard_sizes, B)
        g2.append(st.mean_grad_sq_norm)
        tr.append(st.trace_cov)
    assert np.mean(g2) == pytest.approx(1.0, abs=4 * np.std(g2) / math.sqrt(trials))
    assert np.mean(tr) == pytest.approx(30.0, abs=4 * np.std(tr) / math.sqrt(trials))
    assert div.rank_averaged_two_batch_noise_stats(0.0, 0.0, 1.0, [8], 8) is None  # one worker: no small batch
    assert div.two_batch_rank_terms(2.0, 8, 8) == (0.0, 0.0)


def test_fold_skips_non_finite_steps_and_reports_both_estimates():
    ema = NoiseScaleEMA(0.9)
    state, noise = ema.fold(ema.init(), div.NoiseStats(2.0, 6.0), 10)
    assert state.steps == 1 and noise.metrics() == pytest.approx(
        {"grad_sq_norm_est": 2.0, "trace_cov_est": 6.0, "batch_bound_est": 4.0, "diversity_est": 0.4,
         "grad_sq_norm_step": 2.0, "trace_cov_step": 6.0})
    same, noise = ema.fold(state, div.NoiseStats(math.inf, 1.0), 10)
    assert same == state and noise.step is None and "grad_sq_norm_step" not in noise.metrics()
    _, noise = ema.fold(state, None, 10)
    assert noise.smoothed.batch_bound_est == pytest.approx(4.0)
