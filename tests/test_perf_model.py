"""Invariants of the step-time and time-to-accuracy model, over seeded random parameters.

(`hypothesis` is not installed; each property loops over parameters drawn from a seeded numpy generator.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import scalesgd.perf_model as pm
from scalesgd.errors import ConfigError
from scalesgd.perf_model import (
    ComputeFit,
    Network,
    allreduce_time,
    batch_crit_from_bound,
    efficiency,
    fit_alpha_beta,
    fit_compute,
    fit_passes_min,
    format_recommendation,
    format_table,
    parse_network,
    passes_min_from_measurement,
    passes_to_accuracy,
    predict_grid,
    recommend,
    step_time,
    time_per_pass,
    time_to_accuracy,
)

CASES = 50


def random_setup(rng: np.random.Generator):
    compute = ComputeFit(t0_s=float(10 ** rng.uniform(-5, -1)), t1_s=float(10 ** rng.uniform(-7, -3)))
    network = Network(alpha_s=float(10 ** rng.uniform(-7, -3)), beta_s_per_byte=float(10 ** rng.uniform(-11, -8)))
    grad_bytes = float(10 ** rng.uniform(3, 9))
    return compute, network, grad_bytes


def test_efficiency_in_unit_interval():
    rng = np.random.default_rng(0)
    for _ in range(CASES):
        compute, network, grad_bytes = random_setup(rng)
        overhead = float(rng.uniform(0, 1e-3))
        batch = np.array([1, 3, 64, 100, 1000, 4096, 65536])
        for p in (1, 2, 3, 7, 64, 1024):
            b = batch[batch >= p]
            e = efficiency(b, p, compute=compute, network=network, grad_bytes=grad_bytes, overhead_s=overhead)
            assert np.all(e >= 0) and np.all(e <= 1 + 1e-12), (p, e)
        assert float(efficiency(512, 1, compute=compute, network=network, grad_bytes=grad_bytes)) == \
            pytest.approx(1.0)


def test_step_time_non_decreasing_in_message_size():
    rng = np.random.default_rng(1)
    for _ in range(CASES):
        compute, network, _ = random_setup(rng)
        sizes = np.sort(10 ** rng.uniform(0, 10, size=20))
        for p in (1, 2, 8, 1024):
            t = step_time(4096, p, compute=compute, network=network, grad_bytes=sizes)
            assert np.all(np.diff(t) >= 0)


def test_allreduce_matches_ring_formula_and_is_free_on_one_worker():
    net = Network(alpha_s=1e-5, beta_s_per_byte=1e-9)
    assert allreduce_time(1e6, 1, net) == 0.0
    # P = 4: 2·3·α + 2·3/4·N·β
    assert allreduce_time(1e6, 4, net) == pytest.approx(6e-5 + 1.5e6 * 1e-9)
    # bandwidth term approaches 2·N·β from below as P grows (bandwidth-optimal)
    t = allreduce_time(1e8, np.array([2, 16, 1024]), Network(alpha_s=0.0, beta_s_per_byte=1e-9))
    assert np.all(np.diff(t) > 0) and t[-1] < 2 * 1e8 * 1e-9


def test_allreduce_models_recursive_doubling_where_the_strategy_runs_it():
    # alpha/beta = 10 kB; doubling up to 256 KB at P = 2, up to the crossover of the two costs above
    net = Network(alpha_s=1e-5, beta_s_per_byte=1e-9, doubling_max_bytes=1 << 18)
    ring = Network(alpha_s=1e-5, beta_s_per_byte=1e-9)
    assert net.latency_bytes == pytest.approx(1e4)
    assert allreduce_time(1e5, 1, net) == 0.0
    assert allreduce_time(1e5, 2, net) == pytest.approx(1e-5 + 1e5 * 1e-9)  # one exchange of the whole message
    assert allreduce_time(1e6, 2, net) == allreduce_time(1e6, 2, ring)  # above 256 KB at P = 2: the ring
    # P = 8: the costs cross at (α/β)·(14 − 3)/(3 − 1.75) = 88 kB
    assert float(pm.doubling_crossover_bytes(8, net.latency_bytes)) == pytest.approx(88e3)
    assert allreduce_time(5e4, 8, net) == pytest.approx(3 * (1e-5 + 5e4 * 1e-9))  # log2(8) exchanges
    assert allreduce_time(1e5, 8, net) == allreduce_time(1e5, 8, ring)
    # P = 1024: the ring's 2046 latencies make doubling cheaper up to (α/β)·2036/(10 − 2046/1024) ≈ 2.54 MB
    assert allreduce_time(1e6, 1024, net) == pytest.approx(10 * (1e-5 + 1e6 * 1e-9))
    assert allreduce_time(1e6, 1024, net) < allreduce_time(1e6, 1024, ring) / 2
    assert allreduce_time(1e5, 6, net) == allreduce_time(1e5, 6, ring)  # P not a power of two: the ring
    t = allreduce_time(np.array([5e4, 1e6]), np.array([[4], [5]]), net)  # broadcasts like the ring formula
    assert t.shape == (2, 2) and t[0, 0] == pytest.approx(2 * (1e-5 + 5e4 * 1e-9))
    assert t[1, 0] == allreduce_time(5e4, 5, ring)
    assert t[0, 1] == allreduce_time(1e6, 4, ring)  # above 8·α/β = 80 kB at P = 4
    assert "recursive doubling up to 262144 B at P=2" in net.describe()
    assert [pm.allreduce_algorithm(n, p, net) for n, p in ((1e9, 1), (1e5, 2), (1e6, 2), (5e4, 8), (1e5, 8),
                                                           (1e6, 1024), (1e5, 6))] == [
        "none", "recursive doubling", "ring", "recursive doubling", "ring", "recursive doubling", "ring"]
    assert pm.allreduce_algorithm(1e5, 2, ring) == "ring"


def test_above_two_workers_the_model_prices_the_cheaper_of_doubling_and_the_ring():
    """Written out: min(log2(P)(α + Nβ), 2(P−1)α + 2(P−1)/P·Nβ) at every power of two P ≥ 4."""
    rng = np.random.default_rng(5)
    for _ in range(CASES):
        alpha, beta = float(10 ** rng.uniform(-7, -3)), float(10 ** rng.uniform(-11, -8))
        net = Network(alpha, beta, doubling_max_bytes=int(rng.integers(1, 1 << 22)))
        n = 10 ** rng.uniform(0, 10, size=50)
        for p in (4, 8, 64, 1024):
            lp = np.log2(p)
            written = np.minimum(lp * (alpha + n * beta), 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta)
            np.testing.assert_allclose(allreduce_time(n, p, net), written, rtol=1e-12)


def test_runtime_and_model_switch_at_the_same_size():
    import torch

    from scalesgd.comm import RingAllReduce
    from scalesgd.distributed import World

    def world(p):
        return World(rank=0, size=p, local_rank=0, device=torch.device("cpu"), backend="gloo")

    for p in (2, 3, 4, 8, 1024):
        ring = RingAllReduce(world(p), small_bytes=256 << 10, latency_bytes=80 << 10)
        expected = float(pm.doubling_threshold_bytes(p, 256 << 10, 80 << 10))
        assert ring.doubling_max_bytes == int(expected)
    assert RingAllReduce(world(4), latency_bytes=80 << 10).doubling_max_bytes == 8 * (80 << 10)
    assert RingAllReduce(world(4), small_bytes=0).doubling_max_bytes == 0  # turned off
    assert RingAllReduce(world(6)).doubling_max_bytes == 0
    with pytest.raises(ConfigError, match="latency_bytes"):
        RingAllReduce(world(4), latency_bytes=-1)


def test_step_time_non_decreasing_in_message_size_with_the_doubling_switch():
    # at P = 2 the switch only adds a message (α + Nβ → 2α + Nβ); at larger powers of two it sits where
    # the two costs cross, so the curve is the lower envelope of two increasing lines: monotone everywhere
    rng = np.random.default_rng(2)
    for _ in range(CASES):
        compute, network, _ = random_setup(rng)
        net = Network(network.alpha_s, network.beta_s_per_byte, doubling_max_bytes=int(rng.integers(0, 1 << 22)))
        sizes = np.sort(10 ** rng.uniform(0, 10, size=200))
        for p in (2, 3, 4, 8, 12, 64, 1024):
            t = step_time(4096, p, compute=compute, network=net, grad_bytes=sizes)
            assert np.all(np.diff(t) >= -1e-15 * t[1:])


def test_compute_fit_recovers_parameters_from_noisy_timings():
    rng = np.random.default_rng(2)
    for _ in range(CASES):
        t0, t1 = float(10 ** rng.uniform(-5, -2)), float(10 ** rng.uniform(-7, -4))
        b = np.array([8, 16, 32, 64, 128, 256, 512])
        t = (t0 + t1 * b) * (1 + rng.normal(0, 0.002, size=b.size))
        fit = fit_compute(b, t)
        assert fit.max_rel_err < 0.02
        # recover parameters to within what the noise allows at these sizes
        assert fit.t1_s == pytest.approx(t1, rel=0.05 + 0.05 * t0 / (t1 * 512))
        assert fit(256) == pytest.approx(t0 + t1 * 256, rel=0.01)


def test_compute_fit_exact_and_nonnegative():
    fit = fit_compute([1, 2, 4], [3e-3 + 1e-4, 3e-3 + 2e-4, 3e-3 + 4e-4])
    assert fit.t0_s == pytest.approx(3e-3) and fit.t1_s == pytest.approx(1e-4)
    assert fit.max_rel_err < 1e-9
    # timings that decrease with b (noise) must not give a negative per-example cost
    fit = fit_compute([8, 16, 32], [1.0e-3, 0.99e-3, 0.98e-3])
    assert fit.t1_s >= 0 and fit.t0_s > 0
    with pytest.raises(ConfigError):
        fit_compute([8, 8], [1e-3, 1e-3])
    with pytest.raises(ConfigError):
        fit_compute([8, 16], [1e-3])
    with pytest.raises(ConfigError):
        fit_compute([8, 16], [1e-3, -1.0])


def random_piecewise(rng: np.random.Generator) -> ComputeFit:
    """A profile with saturating throughput (per-example cost never rises with b), fitted piecewise."""
    b = np.array([1, 4, 16, 64, 256, 1024])
    per_example = np.sort(10 ** rng.uniform(-7, -4, size=b.size))[::-1]  # non-increasing in b
    t = float(10 ** rng.uniform(-5, -2)) + b * per_example
    t = np.maximum.accumulate(t)
    return fit_compute(b, t, kind="piecewise")


def test_piecewise_curve_passes_through_the_profile_and_extends_linearly():
    b = [8, 32, 128, 512, 2048]
    t = [1.0e-3, 1.1e-3, 1.8e-3, 5.0e-3, 21e-3]  # a kink an affine curve misses by > 5%
    fit = fit_compute(b, t)
    assert fit.kind == "piecewise" and fit.max_rel_err > 0.05
    assert np.allclose(fit(np.array(b)), t)
    assert float(fit(1024)) == pytest.approx(5.0e-3 + (21e-3 - 5.0e-3) / 3)
    assert float(fit(4096)) == pytest.approx(21e-3 + 2048 * (21e-3 - 5.0e-3) / 1536)
    assert 0 < float(fit(1)) <= 1.0e-3
    assert "piecewise" in fit.describe()
    # a noisy dip is flattened: the curve never decreases in b
    fit = fit_compute([8, 16, 32, 64], [1e-3, 0.5e-3, 2e-3, 4e-3], kind="piecewise")
    assert np.all(np.diff(fit(np.arange(1, 200))) >= 0)
    assert fit_compute(b, t, kind="affine").kind == "affine"
    with pytest.raises(ConfigError):
        fit_compute(b, t, kind="spline")
    with pytest.raises(ConfigError):
        ComputeFit(t0_s=0.0, t1_s=0.0, knots_b=(8.0, 4.0), knots_s=(1.0, 2.0))


def test_piecewise_curves_keep_the_invariants():
    rng = np.random.default_rng(6)
    ps = np.arange(1, 1025)
    zero_net = Network(alpha_s=0.0, beta_s_per_byte=0.0)
    for _ in range(CASES):
        compute = random_piecewise(rng)
        _, network, grad_bytes = random_setup(rng)
        b = int(rng.integers(1, 100000))
        assert np.all(np.diff(step_time(b, ps, compute=compute, network=zero_net, grad_bytes=0.0)) <= 1e-15)
        bs = np.array([1, 5, 64, 1000, 5000, 65536])
        for p in (1, 2, 7, 64, 1024):
            e = efficiency(bs[bs >= p], p, compute=compute, network=network, grad_bytes=grad_bytes)
            assert np.all(e >= 0) and np.all(e <= 1 + 1e-9), (p, e)


def test_alpha_beta_fit_recovers_parameters():
    rng = np.random.default_rng(3)
    for _ in range(CASES):
        alpha, beta = float(10 ** rng.uniform(-6, -3)), float(10 ** rng.uniform(-11, -8))
        sizes = np.repeat(2.0 ** np.arange(4, 26, 2), 3)
        ps = np.tile([2, 3, 4], sizes.size // 3)
        exact = allreduce_time(sizes, ps, Network(alpha_s=alpha, beta_s_per_byte=beta))
        t = exact * (1 + rng.normal(0, 0.001, size=sizes.size))
        a_hat, b_hat = fit_alpha_beta(sizes, ps, t)
        assert a_hat == pytest.approx(alpha, rel=0.05)
        assert b_hat == pytest.approx(beta, rel=0.05)


def test_alpha_beta_fit_rejects_unidentifiable_input():
    with pytest.raises(ConfigError):
        fit_alpha_beta([1024, 1024], [2, 2], [1e-4, 1e-4])
    with pytest.raises(ConfigError):
        fit_alpha_beta([1024, 4096], [1, 1], [1e-4, 2e-4])  # one worker: no communication at all
    a, b = fit_alpha_beta([1024, 4096, 8], [2, 2, 1], [2e-5 + 1024e-9, 2e-5 + 4096e-9, 1e-3])
    assert a == pytest.approx(1e-5) and b == pytest.approx(1e-9)


def test_more_workers_never_increase_compute_per_step():
    rng = np.random.default_rng(4)
    ps = np.arange(1, 1025)
    for _ in range(CASES):
        compute, _, _ = random_setup(rng)
        b = int(rng.integers(1, 100000))
        zero_net = Network(alpha_s=0.0, beta_s_per_byte=0.0)
        t = step_time(b, ps, compute=compute, network=zero_net, grad_bytes=0.0)
        assert np.all(np.diff(t) <= 1e-15)


def test_time_per_pass_decreases_then_flattens_in_batch_size():
    rng = np.random.default_rng(5)
    n = 60000
    for _ in range(CASES):
        compute, network, grad_bytes = random_setup(rng)
        for p in (1, 4, 64):
            bs = p * 2.0 ** np.arange(0, 16)
            tpp = time_per_pass(n, bs, p, compute=compute, network=network, grad_bytes=grad_bytes)
            assert np.all(np.diff(tpp) <= 1e-12 * tpp[0])
            # flattens: the successive ratios rise towards 1, and the tail sits at the compute floor n·t1/P
            ratios = tpp[1:] / tpp[:-1]
            assert np.all(np.diff(ratios) >= -1e-9)
            floor = n * compute.t1_s / p
            assert tpp[-1] >= floor
            gap0 = tpp[0] - floor
            assert tpp[-1] - floor <= gap0 / 2 ** 14 * 1.0001


def test_passes_model_and_its_inverse():
    bc = batch_crit_from_bound(257.0)
    assert bc == 256.0
    # at B = B_crit the passes double
    assert passes_to_accuracy(256, passes_min=3.0, batch_crit=bc) == pytest.approx(6.0)
    pm = passes_min_from_measurement(10.0, 32, bc)
    assert passes_to_accuracy(32, passes_min=pm, batch_crit=bc) == pytest.approx(10.0)
    # the Yin et al. form: passes(B)/passes(1) = 1 + (B-1)/B_S
    b_s = 257.0
    ratio = passes_to_accuracy(100, passes_min=1, batch_crit=bc) / passes_to_accuracy(1, passes_min=1, batch_crit=bc)
    assert ratio == pytest.approx(1 + 99 / b_s)
    bs = np.array([16, 64, 256, 1024])
    assert fit_passes_min(bs, passes_to_accuracy(bs, passes_min=4.2, batch_crit=bc), bc) == pytest.approx(4.2)
    with pytest.raises(ConfigError):
        batch_crit_from_bound(1.0)
    with pytest.raises(ConfigError):
        batch_crit_from_bound(float("nan"))


def test_time_to_accuracy_optimum_on_one_worker_is_sqrt_t0_bcrit_over_t1():
    # P = 1, no comm: TTA ∝ (t0/B + t1)(1 + B/Bc), minimised at B* = sqrt(t0·Bc/t1)
    compute = ComputeFit(t0_s=2e-3, t1_s=2e-5)
    bc = 400.0
    bs = np.arange(1, 5000)
    tta = time_to_accuracy(10000, bs, 1, compute=compute, network=Network(1e-5, 1e-9), grad_bytes=1e6,
                           passes_min=3.0, batch_crit=bc)
    assert bs[np.argmin(tta)] == pytest.approx(math.sqrt(2e-3 * bc / 2e-5), abs=1)


def test_predict_grid_and_recommend():
    compute = ComputeFit(t0_s=1e-3, t1_s=1e-5)
    net = parse_network("10 Gbit/s, 20 us")
    table = predict_grid([32, 256, 2048, 16384], [1, 2, 8, 64, 1024], n_train=50000, compute=compute,
                         network=net, grad_bytes=4e5, passes_min=5.0, batch_crit=500.0)
    assert all(r.workers <= r.global_batch_size for r in table)
    assert {(r.global_batch_size, r.workers) for r in table} >= {(32, 1), (16384, 1024)}
    for r in table:
        assert r.step_time_s == pytest.approx(r.compute_s + r.comm_s)
        assert r.time_to_accuracy_s == pytest.approx(r.time_per_pass_s * r.passes)
        assert 0 <= r.efficiency <= 1
    rec = recommend(table)
    assert rec.fastest.time_to_accuracy_s == min(r.time_to_accuracy_s for r in table)
    assert rec.cheapest.time_to_accuracy_s <= 1.1 * rec.fastest.time_to_accuracy_s
    assert rec.cheapest.worker_seconds <= rec.fastest.worker_seconds
    for r in table:
        if r.time_to_accuracy_s <= 1.1 * rec.fastest.time_to_accuracy_s:
            assert rec.cheapest.worker_seconds <= r.worker_seconds
    assert "B=" in format_recommendation(rec)
    assert len(format_table(table).splitlines()) == len(table) + 2
    with pytest.raises(ConfigError):
        predict_grid([4], [8], n_train=100, compute=compute, network=net, grad_bytes=1.0, passes_min=1,
                     batch_crit=10)


def test_recommend_with_zero_tolerance_picks_fastest():
    compute = ComputeFit(t0_s=1e-3, t1_s=1e-5)
    table = predict_grid([64, 512], [1, 4], n_train=1000, compute=compute, network=Network(1e-5, 1e-9),
                         grad_bytes=1e4, passes_min=2, batch_crit=100)
    rec = recommend(table, tolerance=0.0)
    assert rec.cheapest.time_to_accuracy_s == rec.fastest.time_to_accuracy_s


@pytest.mark.parametrize("spec, alpha, bandwidth", [
    ("25 Gbit/s, 10 us", 10e-6, 25e9 / 8),
    ("10 us, 25 Gbit/s", 10e-6, 25e9 / 8),
    ("100Gbps,2us", 2e-6, 100e9 / 8),
    ("12.5 GB/s, 1.5 µs", 1.5e-6, 12.5e9),
    ("1 GiB/s, 0.1 ms", 1e-4, 2.0 ** 30),
    ("800 Mbit/s, 1e-3 s", 1e-3, 800e6 / 8),
    ("1 Gb/s, 50 ns", 50e-9, 1e9 / 8),
])
def test_parse_network(spec, alpha, bandwidth):
    net = parse_network(spec)
    assert net.alpha_s == pytest.approx(alpha)
    assert net.bandwidth_bytes_per_s == pytest.approx(bandwidth)
    assert "Gbit/s" in net.describe()


@pytest.mark.parametrize("spec", ["", "fast", "25 Gbit/s", "25 Gbit/s, 10 furlongs", "10 us, 5 ms",
                                  "1 GB/s, 2 GB/s", "0 Gbit/s, 1 us", "25 Gbit/s, 10 us, 3 us", "x Gbit/s, 1 us"])
def test_parse_network_rejects_garbage(spec):
    with pytest.raises(ConfigError, match="network"):
        parse_network(spec)


def test_constructors_validate():
    with pytest.raises(ConfigError):
        ComputeFit(t0_s=-1.0, t1_s=0.0)
    with pytest.raises(ConfigError):
        Network(alpha_s=float("nan"), beta_s_per_byte=0.0)


# ------------------------------------------------------------------------------------------------------------
# The α–β fit on synthetic timings (as allreduce-bench and predict use it), and the best any fit could do
# ------------------------------------------------------------------------------------------------------------

ALPHA, BETA = 60e-6, 1.25e-9  # 60 us per message, 0.8 GB/s


def _ring_time_s(sizes, ps, alpha, beta):
    """T = 2(P−1)α + 2(P−1)/P·N·β written out, broadcasting over arrays of α and β too (the grid search)."""
    n, p = np.asarray(sizes, dtype=float), np.asarray(ps, dtype=float)
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta


def _grid():
    sizes = np.array([4096 << k for k in range(15)] * 2, dtype=float)
    ps = np.array([2] * 15 + [4] * 15, dtype=float)
    return sizes, ps


@pytest.mark.parametrize("relative", [True, False])
def test_fit_recovers_alpha_beta_from_noise_free_timings(relative):
    sizes, ps = _grid()
    times = _ring_time_s(sizes, ps, ALPHA, BETA)
    alpha, beta = pm.fit_alpha_beta(sizes, ps, times, relative=relative)
    assert alpha == pytest.approx(ALPHA, rel=1e-9)
    assert beta == pytest.approx(BETA, rel=1e-9)


def test_fit_recovers_alpha_beta_when_small_messages_went_by_recursive_doubling():
    sizes, ps = _grid()
    net = pm.Network(ALPHA, BETA, doubling_max_bytes=256 << 10)
    times = pm.allreduce_time(sizes, ps, net)
    assert times[0] == pytest.approx(ALPHA + 4096 * BETA)  # P = 2, 4 KB: one exchange
    assert pm.fit_alpha_beta(sizes, ps, times, doubling_max_bytes=256 << 10) == pytest.approx((ALPHA, BETA), rel=1e-9)
    assert pm.best_max_rel_error(sizes, ps, times, doubling_max_bytes=256 << 10) < 1e-9
    # the plain ring model cannot describe both algorithms' rows at once
    assert pm.best_max_rel_error(sizes, ps, times) > 0.1
    # the threshold may also be given per row (each P's own, as allreduce-bench records it), but not half-way
    per_row = np.full(len(sizes), 256 << 10)
    assert pm.fit_alpha_beta(sizes, ps, times, doubling_max_bytes=per_row) == pytest.approx((ALPHA, BETA), rel=1e-9)
    with pytest.raises(ConfigError, match="one per timing"):
        pm.fit_alpha_beta(sizes, ps, times, doubling_max_bytes=per_row[:3])


def test_fit_with_multiplicative_noise_and_a_single_world_size():
    rng = np.random.default_rng(0)
    sizes = np.array([4096 << k for k in range(15)], dtype=float)
    times = _ring_time_s(sizes, 2, ALPHA, BETA) * np.exp(rng.normal(0, 0.05, sizes.size))
    alpha, beta = pm.fit_alpha_beta(sizes, 2, times)
    assert alpha == pytest.approx(ALPHA, rel=0.1)
    assert beta == pytest.approx(BETA, rel=0.1)


def test_fit_is_non_negative_and_validates_input():
    sizes = np.array([1e3, 1e6, 1e7])
    # times that fall with size would need a negative β: the fit keeps β = 0 and explains them by α
    alpha, beta = pm.fit_alpha_beta(sizes, 2, [3e-3, 2e-3, 1e-3])
    assert beta == 0.0 and alpha > 0
    with pytest.raises(ConfigError):
        pm.fit_alpha_beta([1e3], 2, [1e-3])
    with pytest.raises(ConfigError):
        pm.fit_alpha_beta(sizes, 1, [1e-3, 2e-3, 3e-3])
    with pytest.raises(ConfigError):
        pm.fit_alpha_beta(sizes, 2, [1e-3, 0.0, 3e-3])


def _doubling_or_ring_time_s(sizes, ps, alpha, beta, threshold=256 << 10):
    """Written out: log2(P)·(α + N·β) for N ≤ threshold at P a power of two, else the ring."""
    n, p = np.broadcast_arrays(np.asarray(sizes, dtype=float), np.asarray(ps, dtype=float))
    doubling = (n <= threshold) & (p > 1) & (np.log2(p) % 1 == 0)
    return np.where(doubling, np.log2(p) * (alpha + n * beta), _ring_time_s(n, p, alpha, beta))


def _grid_search_max_rel_error(sizes, ps, times, alpha_hi, beta_hi, k=400, cost=_ring_time_s):
    """Slow reference: the best max relative error over a fine (α, β) grid."""
    alphas = np.concatenate([[0.0], np.geomspace(alpha_hi * 1e-4, alpha_hi, k)])
    betas = np.concatenate([[0.0], np.geomspace(beta_hi * 1e-4, beta_hi, k)])
    model = cost(np.asarray(sizes)[None, None, :], np.asarray(ps, dtype=float)[None, None, :],
                 alphas[:, None, None], betas[None, :, None])  # (k+1, k+1, m)
    return float(np.abs(model / np.asarray(times) - 1).max(axis=2).min())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_max_rel_error_is_the_minimax_fit(seed):
    rng = np.random.default_rng(seed)
    sizes = np.array([65536 << k for k in range(11)], dtype=float)
    times = _ring_time_s(sizes, 2, ALPHA, BETA) * np.exp(rng.normal(0, 0.15, sizes.size))
    best = pm.best_max_rel_error(sizes, 2, times)
    grid = _grid_search_max_rel_error(sizes, [2] * sizes.size, times, 20 * ALPHA, 5 * BETA)
    assert best <= grid + 1e-9  # never worse than any grid point
    assert best >= grid - 0.01  # and the grid gets within a point of it
    # never worse than the least-squares fit, and zero on noise-free timings
    alpha, beta = pm.fit_alpha_beta(sizes, 2, times)
    assert best <= np.abs(_ring_time_s(sizes, 2, alpha, beta) / times - 1).max() + 1e-12
    assert pm.best_max_rel_error(sizes, 2, _ring_time_s(sizes, 2, ALPHA, BETA)) < 1e-9


@pytest.mark.parametrize("seed", [0, 1])
def test_best_max_rel_error_with_recursive_doubling_rows_matches_a_grid_search(seed):
    rng = np.random.default_rng(seed)
    sizes = np.array([16384 << k for k in range(9)] * 2, dtype=float)  # 16 KB … 4 MB: both algorithms
    ps = np.array([2] * 9 + [4] * 9, dtype=float)
    times = _doubling_or_ring_time_s(sizes, ps, ALPHA, BETA) * np.exp(rng.normal(0, 0.15, sizes.size))
    best = pm.best_max_rel_error(sizes, ps, times, doubling_max_bytes=256 << 10)
    grid = _grid_search_max_rel_error(sizes, ps, times, 20 * ALPHA, 5 * BETA, cost=_doubling_or_ring_time_s)
    assert grid - 0.01 <= best <= grid + 1e-9
    # and the performance model's own cost is the written-out one
    net = pm.Network(ALPHA, BETA, doubling_max_bytes=256 << 10)
    np.testing.assert_allclose(pm.allreduce_time(sizes, ps, net), _doubling_or_ring_time_s(sizes, ps, ALPHA, BETA))


def test_best_max_rel_error_of_a_cache_cliff():
    """Per-byte cost 1.75x higher past a cache size: no line fits both sides within (1.75 - 1)/(1.75 + 1)."""
    sizes = np.array([1 << 20, 2 << 20, 16 << 20, 64 << 20], dtype=float)
    times = sizes * BETA * np.array([1.0, 1.0, 1.75, 1.75])
    assert pm.best_max_rel_error(sizes, 2, times) == pytest.approx(0.75 / 2.75, rel=1e-6)


def test_step_time_prices_injected_delays_and_local_sgd():
    from scalesgd.stragglers import harmonic, parse_straggler

    compute, network, grad_bytes = ComputeFit(t0_s=0.01, t1_s=0.0), Network(alpha_s=1e-4, beta_s_per_byte=1e-9), 4e6
    base = step_time(64, 4, compute=compute, network=network, grad_bytes=grad_bytes)
    comm = float(allreduce_time(grad_bytes, 4, network))
    exp = parse_straggler("exp:mean=5ms")
    # i.i.d. exponential delays: a synchronous step waits for the largest of P, mu*H_P on top of compute
    assert step_time(64, 4, compute=compute, network=network, grad_bytes=grad_bytes, straggler=exp) == (
        pytest.approx(base + 0.005 * harmonic(4)))
    # a slow rank multiplies the compute it sets; communication is untouched
    slow = parse_straggler("rank1x3")
    assert step_time(64, 4, compute=compute, network=network, grad_bytes=grad_bytes, straggler=slow) == (
        pytest.approx(0.03 + comm))
    assert step_time(64, 1, compute=compute, network=network, grad_bytes=grad_bytes, straggler=slow) == (
        pytest.approx(0.01))
    # local SGD: communication over H, delays absorbed over the period (between mu and mu*H_P per step)
    local = step_time(64, 4, compute=compute, network=network, grad_bytes=grad_bytes, straggler=exp, sync_every=8)
    assert 0.01 + 0.005 + comm / 8 < local < 0.01 + 0.005 * harmonic(4) + comm / 8
    assert step_time(64, 4, compute=compute, network=network, grad_bytes=grad_bytes, sync_every=8) == (
        pytest.approx(0.01 + comm / 8))
    # arrays broadcast as before
    arr = step_time(np.array([64, 128]), np.array([2, 4]), compute=compute, network=network, grad_bytes=grad_bytes,
                    straggler=exp)
    assert arr.shape == (2,) and arr[0] == pytest.approx(0.01 + 0.005 * 1.5 + float(allreduce_time(grad_bytes, 2,
                                                                                                    network)))
    rows = predict_grid([64], [1, 4], n_train=1000, compute=compute, network=network, grad_bytes=grad_bytes,
                        passes_min=1.0, batch_crit=100.0, straggler=exp, sync_every=2)
    assert rows[1].comm_s == pytest.approx(comm / 2)
    assert rows[1].step_time_s == pytest.approx(rows[1].compute_s + rows[1].comm_s)
    with pytest.raises(ConfigError):
        step_time(64, 4, compute=compute, network=network, grad_bytes=grad_bytes, sync_every=0)


def test_local_sgd_passes_factor_interpolates_the_measured_curve_in_log2_h():
    from scalesgd.perf_model import local_sgd_passes_factor, parse_passes_curve

    curve = parse_passes_curve("1:4.0, 4:5.0,16:8.0")
    assert curve == {1: 4.0, 4: 5.0, 16: 8.0}
    assert local_sgd_passes_factor(1, curve) == 1.0
    assert local_sgd_passes_factor(4, curve) == pytest.approx(1.25)
    # halfway between H = 1 and 4 in log2 H is H = 2: passes 4.5
    assert local_sgd_passes_factor(2, curve) == pytest.approx(4.5 / 4.0)
    # H = 8 is 1/2 of the way from 4 to 16 in log2: 5 + (8 - 5)/2
    assert local_sgd_passes_factor(8, curve) == pytest.approx(6.5 / 4.0)
    with pytest.raises(ConfigError, match="outside the measured"):
        local_sgd_passes_factor(32, curve)
    with pytest.raises(ConfigError, match="H = 1"):
        local_sgd_passes_factor(4, {4: 5.0, 16: 8.0})
    for bad in ("1:4,1:5", "0:4", "1:-2", "4", "a:b", "1:nan"):
        with pytest.raises(ConfigError, match="--passes-vs-h"):
            parse_passes_curve(bad)


def test_recommend_sync_every_trades_communication_against_passes():
    from scalesgd.perf_model import recommend_sync_every

    # compute 1 ms a step, all-reduce 4 ms: averaging less often saves up to 4 ms of a 5 ms step
    compute, network = ComputeFit(t0_s=0.001, t1_s=0.0), Network(alpha_s=0.002, beta_s_per_byte=0.0)
    comm = float(allreduce_time(4.0, 2, network))
    assert comm == pytest.approx(0.004)
    kw = dict(n_train=1000, compute=compute, network=network, grad_bytes=4.0, passes=10.0)
    rows = recommend_sync_every(100, 2, curve={1: 10.0, 4: 11.0, 16: 40.0}, **kw)
    by_h = {h: (tpp, passes, tta) for h, tpp, passes, tta in rows}
    # time per pass = (n/B)·(compute + comm/H); passes = 10·passes(H)/passes(1); time = their product
    for h, passes in ((1, 10.0), (4, 11.0), (16, 40.0)):
        assert by_h[h][0] == pytest.approx(10 * (0.001 + 0.004 / h))
        assert by_h[h][1] == pytest.approx(passes)
        assert by_h[h][2] == pytest.approx(by_h[h][0] * passes)
    # H = 4: 0.02 s/pass x 11 passes = 0.22 s beats sync (0.5 s) and H = 16 (0.0125 x 40 = 0.5 s)
    assert rows[0][0] == 4 and [r[0] for r in rows[1:]] == [1, 16]  # a tie goes to the smaller H
    # when local SGD costs no passes, the largest measured H wins
    assert recommend_sync_every(100, 2, curve={1: 10.0, 4: 10.0, 16: 10.0}, **kw)[0][0] == 16
    # and the grid's passes scale by the factor
    plain = predict_grid([100], [2], compute=compute, network=network, grad_bytes=4.0, n_train=1000, passes_min=1.0,
                         batch_crit=100.0)[0]
    scaled = predict_grid([100], [2], compute=compute, network=network, grad_bytes=4.0, n_train=1000, passes_min=1.0,
                          batch_crit=100.0, passes_factor=1.1)[0]
    assert scaled.passes == pytest.approx(1.1 * plain.passes)
    assert scaled.time_to_accuracy_s == pytest.approx(1.1 * plain.time_to_accuracy_s)
    # one worker's local SGD is synchronous SGD: neither the grid nor the H recommendation scales its passes
    one, one_scaled = (predict_grid([100], [1], compute=compute, network=network, grad_bytes=4.0, n_train=1000,
                                    passes_min=1.0, batch_crit=100.0, passes_factor=f)[0] for f in (1.0, 1.1))
    assert one_scaled.passes == one.passes == plain.passes
    rows = recommend_sync_every(100, 1, curve={1: 10.0, 4: 11.0, 16: 40.0}, **kw)
    assert [r[0] for r in rows] == [1, 4, 16] and all(r[2] == pytest.approx(10.0) for r in rows)
