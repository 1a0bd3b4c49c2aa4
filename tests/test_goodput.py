"""Goodput: formulas against hand computation, the online step-time fit, the chooser, the policy's hysteresis and
limits, state round-trips, and the learning-rate range test on a quadratic with a known stable range."""

import json
import math
import random

import numpy as np
import pytest

from scalesgd.batch_policy import legal_batch_size
from scalesgd.errors import ConfigError
from scalesgd.goodput import (GoodputObservation, GoodputPolicy, GoodputState, LrRangeTest, StepTimeModel,
                              StepTimeState, choose_global_batch, combine_times, efficiency, fit_step_time, goodput,
                              make_goodput_policy, noise_scale, optimal_batch_closed_form, update_step_times)
from scalesgd.lr_rules import adascale_gain, statistical_efficiency

# --- formulas ------------------------------------------------------------------------------------------------


def test_combine_times_sum_pnorm_and_max():
    assert combine_times(0.003, 0.004, 1.0) == pytest.approx(0.007)
    assert combine_times(0.003, 0.004, 2.0) == pytest.approx(0.005)  # 3-4-5
    assert combine_times(0.003, 0.004, 200.0) == pytest.approx(0.004, rel=1e-2)  # → max: perfect overlap
    assert combine_times(1e-3, 0.0, 10.0) == pytest.approx(1e-3)
    with pytest.raises(ValueError):
        combine_times(1.0, 1.0, 0.5)


def test_efficiency_by_hand_and_one_definition():
    # E(B) = (B_noise + B0)/(B_noise + B): B_noise 100, B0 10, B 50 -> 110/150
    assert efficiency(50, 10, 100.0) == pytest.approx(110 / 150)
    assert efficiency(10, 10, 100.0) == pytest.approx(1.0)
    assert efficiency(5, 10, 100.0) == pytest.approx(110 / 105)  # smaller than base: more efficient
    # the same number as the lr rule's r/S for any ‖G‖², tr Σ with the same ratio
    for b in (8, 64, 1000):
        assert efficiency(b, 16, 40.0) == pytest.approx(statistical_efficiency(0.5, 20.0, b, 16))
        assert efficiency(b, 16, 40.0) == pytest.approx(adascale_gain(0.5, 20.0, b, 16) / (b / 16))
    np.testing.assert_allclose(efficiency(np.array([10, 50]), 10, 100.0), [1.0, 110 / 150])
    # an array of batches (the chooser's candidates) gives exactly the lr rule's number, element by element,
    # across the clip at S = 1, no noise, tiny and huge noise
    batches = np.array([1, 2, 3, 7, 16, 17, 100, 128, 999, 4096, 10**6])
    for b_noise in (0.0, 1e-9, 0.7, 40.0, 3e3, 1e12):
        for base in (1, 16, 128):
            got = efficiency(batches, base, b_noise)
            want = [statistical_efficiency(1.0, b_noise, int(b), base) for b in batches]
            assert got.shape == batches.shape and got.tolist() == want
    assert efficiency(np.array([[16, 32]]), 16, 8.0).shape == (1, 2)


def test_noise_scale_sources():
    assert noise_scale(0.5, 20.0) == pytest.approx(40.0)
    assert noise_scale(0.5, -3.0) == 0.0                  # negative tr Σ estimate: no noise
    assert noise_scale(None, None, batch_bound_est=181.0) == pytest.approx(180.0)  # B_S − 1
    assert noise_scale(0.0, 5.0, batch_bound_est=11.0) == pytest.approx(10.0)      # ‖G‖² 0: fall back
    assert noise_scale(None, None, None) is None
    assert noise_scale(float("nan"), 1.0, float("nan")) is None


def test_goodput_by_hand():
    m = StepTimeModel(alpha_c_s=0.010, beta_c_s=0.001, alpha_n_s=0.002)
    # P = 2, B = 64: local 32, T = 0.010 + 0.032 + 0.002 = 0.044 s; E = (100 + 32)/(100 + 64)
    want = 64 / 0.044 * (132 / 164)
    assert goodput(64, model=m, world_size=2, base_batch_size=32, b_noise=100.0) == pytest.approx(want)
    np.testing.assert_allclose(goodput(np.array([64, 32]), model=m, world_size=2, base_batch_size=32, b_noise=100.0),
                               [want, 32 / 0.028])
    with pytest.raises(ValueError, match="multiples"):
        goodput(63, model=m, world_size=2, base_batch_size=32, b_noise=100.0)


def test_step_time_model_rejects_nonsense():
    with pytest.raises(ValueError):
        StepTimeModel(alpha_c_s=-1e-3, beta_c_s=1e-4)
    with pytest.raises(ValueError):
        StepTimeModel(alpha_c_s=0.0, beta_c_s=0.0, alpha_n_s=0.0)


# --- the online step-time fit ---------------------------------------------------------------------------------


def feed(state, times, *, p=4):
    for step, (b, tc, tn) in enumerate(times):
        state = update_step_times(state, local_batch_size=b, world_size=p, compute_s=tc, comm_s=tn, step=step)
    return state


def test_fit_recovers_alpha_beta_and_comm_from_noisy_steps_with_outliers():
    rng = random.Random(0)
    alpha_c, beta_c, alpha_n = 0.012, 0.0004, 0.003
    times = []
    for i in range(800):
        b = (8, 16, 32, 64)[(i // 50) % 4]
        tc = (alpha_c + beta_c * b) * math.exp(rng.gauss(0, 0.03))
        tn = alpha_n * math.exp(rng.gauss(0, 0.05))
        if rng.random() < 0.05:  # stalls: another process took the core
            tc, tn = tc * 6, tn * 10
        times.append((b, tc, tn))
    model = fit_step_time(feed(StepTimeState(), times))
    assert model.how == "fit" and model.n_sizes == 4
    assert model.alpha_c_s == pytest.approx(alpha_c, rel=0.1)
    assert model.beta_c_s == pytest.approx(beta_c, rel=0.1)
    assert model.alpha_n_s == pytest.approx(alpha_n, rel=0.1)


def test_one_outlier_does_not_move_a_bin():
    state = feed(StepTimeState(), [(16, 0.010, 0.001)] * 5)
    before = fit_step_time(state)
    state = update_step_times(state, local_batch_size=16, world_size=4, compute_s=1.0, comm_s=0.5, step=6)
    after = fit_step_time(state)
    assert after.alpha_c_s + 16 * after.beta_c_s == pytest.approx(before.alpha_c_s + 16 * before.beta_c_s)
    assert after.alpha_n_s == pytest.approx(before.alpha_n_s)


def test_one_batch_size_uses_the_documented_prior():
    state = feed(StepTimeState(), [(32, 0.020, 0.004)] * 10)
    m = fit_step_time(state)  # AdaptDL's equal split
    assert m.how == "prior" and m.n_sizes == 1
    assert m.alpha_c_s == pytest.approx(0.010) and m.beta_c_s == pytest.approx(0.010 / 32)
    assert m(32) == pytest.approx(0.024)  # reproduces the measured step
    prop = fit_step_time(state, single_size_slope_share=1.0)  # through the origin
    assert prop.alpha_c_s == 0.0 and prop.beta_c_s == pytest.approx(0.020 / 32)
    assert "one batch size" in m.describe()


def test_decreasing_times_give_a_zero_slope_not_a_negative_one():
    state = feed(StepTimeState(), [(8, 0.020, 0.0)] * 5 + [(32, 0.015, 0.0)] * 5)
    m = fit_step_time(state)
    assert m.beta_c_s == 0.0 and m.alpha_c_s > 0


def test_world_size_change_restarts_and_bins_are_bounded():
    state = feed(StepTimeState(), [(8, 0.01, 0.002)] * 3, p=2)
    state = update_step_times(state, local_batch_size=8, world_size=4, compute_s=0.01, comm_s=0.005, step=10)
    assert state.world_size == 4 and state.n_observations == 1
    for i, b in enumerate(range(1, 20)):
        state = update_step_times(state, local_batch_size=b, world_size=4, compute_s=0.01, comm_s=0.0,
                                  step=20 + i, max_bins=4)
    assert [x.local_batch_size for x in state.bins] == [16, 17, 18, 19]  # the most recently seen


def test_update_rejects_bad_timings():
    with pytest.raises(ValueError, match="compute_s"):
        update_step_times(StepTimeState(), local_batch_size=8, world_size=1, compute_s=float("nan"), comm_s=0.0,
                          step=0)
    with pytest.raises(ValueError):
        update_step_times(StepTimeState(), local_batch_size=0, world_size=1, compute_s=0.1, comm_s=0.0, step=0)


# --- the chooser --------------------------------------------------------------------------------------------


def brute_force(model, b_noise, p, b0, lo, hi):
    cand = np.arange(legal_batch_size(lo, world_size=p, min_batch=lo), hi // p * p + 1, p)
    return int(cand[np.argmax(goodput(cand, model=model, world_size=p, base_batch_size=b0, b_noise=b_noise))])


@pytest.mark.parametrize("max_candidates", [512, 16])  # exhaustive, and geometric grid + local refinement
def test_chooser_finds_the_wall_time_optimum(max_candidates):
    # T_step(B) = t0 + c·B with B the global batch: α_c = t0, β_c = c·P per local example.
    p, t0, c, b_noise = 4, 0.02, 1e-4, 400.0
    model = StepTimeModel(alpha_c_s=t0, beta_c_s=c * p)
    b_star = optimal_batch_closed_form(b_noise, t0, c)
    assert b_star == pytest.approx(math.sqrt(80000))
    choice = choose_global_batch(model=model, b_noise=b_noise, world_size=p, base_batch_size=32, max_batch=100000,
                                 max_candidates=max_candidates)
    assert choice.global_batch_size % p == 0
    assert abs(choice.global_batch_size - b_star) <= p
    assert choice.global_batch_size == brute_force(model, b_noise, p, 32, 1, 100000)
    assert choice.n_candidates < 2000  # never the 25000 multiples of P


def test_chooser_moves_the_right_way():
    p, b0 = 2, 32
    base = StepTimeModel(alpha_c_s=0.010, beta_c_s=2e-4, alpha_n_s=0.002)

    def best(model, b_noise=300.0):
        return choose_global_batch(model=model, b_noise=b_noise, world_size=p, base_batch_size=b0,
                                   max_batch=1 << 16).global_batch_size

    b = best(base)
    assert best(StepTimeModel(alpha_c_s=0.040, beta_c_s=2e-4, alpha_n_s=0.002)) > b     # per-step overhead up
    assert best(StepTimeModel(alpha_c_s=0.010, beta_c_s=2e-4, alpha_n_s=0.020)) > b     # all-reduce up
    assert best(StepTimeModel(alpha_c_s=0.010, beta_c_s=8e-4, alpha_n_s=0.002)) < b     # per-example cost up
    assert best(base, b_noise=3000.0) > b                                               # noise scale up
    assert best(base, b_noise=30.0) < b


def test_chooser_respects_multiples_and_limits():
    model = StepTimeModel(alpha_c_s=0.05, beta_c_s=1e-6)  # wants a huge batch
    c = choose_global_batch(model=model, b_noise=1e6, world_size=6, base_batch_size=12, max_batch=1000)
    assert c.global_batch_size == 996
    model = StepTimeModel(alpha_c_s=0.0, beta_c_s=1e-3)  # wants the smallest
    c = choose_global_batch(model=model, b_noise=1.0, world_size=6, base_batch_size=12, min_batch=40, max_batch=1000)
    assert c.global_batch_size == 42
    with pytest.raises(ConfigError, match="below the worker count"):
        choose_global_batch(model=model, b_noise=1.0, world_size=8, base_batch_size=8, max_batch=5)


# --- the policy ------------------------------------------------------------------------------------------------


TRUE = StepTimeModel(alpha_c_s=0.020, beta_c_s=4e-4, alpha_n_s=0.004)  # the "machine" of the simulations


def simulate(policy, b_noises, *, batch=32, p=4, true=TRUE, noise=0.03, seed=0, state=None, mem=None):
    """A trainer: run a step at the current batch, time it on ``true`` with noise, ask the policy."""
    rng = random.Random(seed)
    state = state or policy.init_state()
    batches, reasons = [], []
    for step, bn in enumerate(b_noises, start=1):
        tc = float(true.compute_s(batch // p)) * math.exp(rng.gauss(0, noise))
        tn = true.alpha_n_s * math.exp(rng.gauss(0, noise))
        obs = GoodputObservation(step=step, epoch=0.0, global_batch_size=batch, world_size=p, compute_s=tc,
                                 comm_s=tn, grad_sq_norm_est=1.0, trace_cov_est=bn, max_batch_memory=mem)
        decision, state = policy.next(state, obs)
        assert decision.changed == (decision.global_batch_size != batch)
        if decision.changed:
            reasons.append(decision.reason)
        batch = decision.global_batch_size
        batches.append(batch)
    return batches, state, reasons


def true_goodput(b, b_noise, p=4, b0=32):
    return goodput(b, model=TRUE, world_size=p, base_batch_size=b0, b_noise=b_noise)


def test_policy_reaches_near_optimal_goodput():
    policy = GoodputPolicy(min_interval_steps=20, min_estimates=5, max_batch=4096)
    batches, state, reasons = simulate(policy, [500.0] * 600)
    best = choose_global_batch(model=TRUE, b_noise=500.0, world_size=4, base_batch_size=32, max_batch=4096)
    assert true_goodput(batches[-1], 500.0) >= 0.93 * best.goodput
    assert all(b % 4 == 0 for b in batches)
    assert state.n_changes >= 2  # explored from 32 in bounded steps: it could not jump straight there
    assert all(later <= 2 * earlier for earlier, later in zip(batches, batches[1:]))
    assert "goodput" in reasons[0] and "B_noise 500" in reasons[0] and "ms/example" in reasons[0]


def test_policy_follows_the_noise_scale():
    policy = GoodputPolicy(min_interval_steps=20, min_estimates=5, max_batch=8192)
    batches, _, _ = simulate(policy, [50.0] * 400 + [5000.0] * 400)
    assert batches[399] < batches[-1]


def test_hysteresis_never_thrashes_on_oscillating_estimates():
    # B_noise flips ±25% every step around a value: the best batch flips, the goodput at either barely differs
    # (a decision at every step: with one every decide_every steps an even period would hide the oscillation)
    osc = [800.0 * (1.25 if i % 2 else 0.8) for i in range(1200)]
    policy = GoodputPolicy(min_interval_steps=0, min_estimates=5, max_batch=4096, decide_every=1)
    batches, _, _ = simulate(policy, osc)
    changes = [i for i in range(1, len(batches)) if batches[i] != batches[i - 1]]
    assert not [i for i in changes if i >= 400]  # settled: no change in the last 800 steps
    # without the threshold the same estimates do flip it back and forth
    eager = GoodputPolicy(min_interval_steps=0, min_estimates=5, max_batch=4096, rel_gain=0.0, decide_every=1)
    batches, _, _ = simulate(eager, osc)
    assert sum(batches[i] != batches[i - 1] for i in range(400, len(batches))) > 20


def test_decisions_only_every_decide_every_steps_reach_the_same_batch():
    every, each = (GoodputPolicy(min_interval_steps=20, min_estimates=5, max_batch=4096, decide_every=k)
                   for k in (10, 1))
    batches, _, reasons = simulate(every, [500.0] * 600)
    changed_at = [i + 1 for i in range(1, len(batches)) if batches[i] != batches[i - 1]]  # the steps (from 1)
    assert changed_at and all(step % 10 == 0 for step in changed_at)
    reference, _, _ = simulate(each, [500.0] * 600)
    assert true_goodput(batches[-1], 500.0) >= 0.97 * true_goodput(reference[-1], 500.0)
    d, _ = every.next(every.init_state(), GoodputObservation(step=3, epoch=0.0, global_batch_size=30, world_size=4,
                                                             compute_s=None))
    assert d.changed and d.reason.startswith("forced")  # an illegal batch is corrected at once, due or not
    with pytest.raises(ConfigError, match="decide_every"):
        GoodputPolicy(decide_every=0)


def test_min_interval_between_changes():
    policy = GoodputPolicy(min_interval_steps=60, min_estimates=1, min_timed_steps=1, max_batch=4096)
    batches, _, _ = simulate(policy, [5000.0] * 400)
    changes = [i for i in range(1, len(batches)) if batches[i] != batches[i - 1]]
    assert len(changes) >= 2
    assert all(b - a >= 60 for a, b in zip(changes, changes[1:]))


def test_with_one_batch_size_measured_the_policy_explores_by_the_extrapolation_limit():
    policy = GoodputPolicy(min_interval_steps=0, min_estimates=1, min_timed_steps=5, max_batch=1 << 16,
                           decide_every=1)
    batches, state, reasons = simulate(policy, [1e5] * 6)  # a huge noise scale: it wants a huge batch
    assert fit_step_time(StepTimeState(4, state.times.bins[:1])).how == "prior"
    assert batches[:4] == [32] * 4 and batches[4] == 64  # local 8 -> 16: max_extrapolation 2
    assert "one batch size measured" in reasons[0]


def test_limits_memory_cap_and_training_set_size():
    policy = GoodputPolicy(min_interval_steps=0, min_estimates=1, n_train=300, max_batch=4096)
    batches, _, _ = simulate(policy, [1e6] * 300)
    assert max(batches) == 300 and all(b % 4 == 0 for b in batches)
    policy = GoodputPolicy(min_interval_steps=0, min_estimates=1, max_batch=4096)
    batches, _, _ = simulate(policy, [1e6] * 300, mem=200)
    assert max(batches) == 200


def test_illegal_current_batch_is_corrected_at_once():
    policy = GoodputPolicy()
    d, state = policy.next(policy.init_state(), GoodputObservation(step=0, epoch=0.0, global_batch_size=30,
                                                                   world_size=4, compute_s=None))
    assert d.changed and d.global_batch_size == 32 and d.reason.startswith("forced")
    assert state.n_changes == 1


def test_warm_up_holds_and_skips_the_step_after_a_change():
    policy = GoodputPolicy(min_timed_steps=3)
    state = policy.init_state()
    d, state = policy.next(state, GoodputObservation(step=1, epoch=0.0, global_batch_size=32, world_size=4,
                                                     compute_s=0.01, comm_s=0.001))
    assert not d.changed and "warm-up" in d.reason and state.n_timings == 1 and state.base_batch_size == 32
    from dataclasses import replace
    state = replace(state, last_change_step=5)
    _, s2 = policy.next(state, GoodputObservation(step=6, epoch=0.0, global_batch_size=32, world_size=4,
                                                  compute_s=0.5, comm_s=0.001))
    assert s2.n_timings == 1  # the first step at the new size is not timed into the fit
    _, s3 = policy.next(state, GoodputObservation(step=7, epoch=0.0, global_batch_size=32, world_size=4,
                                                  compute_s=0.01, comm_s=0.001))
    assert s3.n_timings == 2


def test_timings_that_arrive_a_step_late_are_fitted_to_the_batch_they_were_measured_at():
    # The trainer learns step k's agreed times with step k + 1, so at the decision for step k + 2: a timing from
    # before the last change (the old batch) or of the first step at the new batch must stay out of the fit.
    policy = GoodputPolicy(min_timed_steps=1, min_estimates=1, min_interval_steps=0, max_batch=4096)
    from dataclasses import replace
    state = replace(policy.init_state(), last_change_step=10)
    late = dict(epoch=0.0, global_batch_size=64, world_size=4, compute_s=0.5, comm_s=0.001)
    _, s = policy.next(state, GoodputObservation(step=11, timed_step=9, **late))  # measured at the old batch
    assert s.n_timings == 0
    _, s = policy.next(state, GoodputObservation(step=12, timed_step=10, **late))  # the first step at the new one
    assert s.n_timings == 0
    _, s = policy.next(state, GoodputObservation(step=13, timed_step=11, **late))
    assert s.n_timings == 1 and s.times.bins[0].local_batch_size == 16
    with pytest.raises(ValueError, match="timed_step"):
        GoodputObservation(step=5, timed_step=5, **late)

    # A simulated trainer with exact step times, each learned one step late, where the first step at a new batch
    # is 3x slow (allocator warm-up): every bin holds exactly the steady time of its own local batch, and the
    # policy still finds the optimum.
    state, batch, ran = policy.init_state(), 32, {}
    timed: dict[int, float] = {}
    for step in range(1, 600):
        ran[step - 1] = batch  # step - 1 ran at `batch`
        first = step == 1 or ran[step - 2] != batch
        timed[step - 1] = float(TRUE.compute_s(batch // 4)) * (3.0 if first else 1.0)
        k = step - 2  # the trainer's own warm-up leaves out the first steps (k < 2)
        obs = GoodputObservation(step=step, epoch=0.0, global_batch_size=batch, world_size=4,
                                 compute_s=timed[k] if k >= 2 else None, comm_s=TRUE.alpha_n_s if k >= 2 else None,
                                 timed_step=k if k >= 2 else None, grad_sq_norm_est=1.0, trace_cov_est=500.0)
        decision, state = policy.next(state, obs)
        batch = decision.global_batch_size
    assert state.n_changes >= 2
    for b in state.times.bins:
        assert b.compute_s == pytest.approx(float(TRUE.compute_s(b.local_batch_size)), rel=1e-12)
    best = choose_global_batch(model=TRUE, b_noise=500.0, world_size=4, base_batch_size=32, max_batch=4096)
    assert true_goodput(batch, 500.0) >= 0.93 * best.goodput


def test_state_round_trips_through_plain_dict_and_policy_is_pure():
    policy = GoodputPolicy(min_interval_steps=10, min_estimates=5, max_batch=4096)
    _, state, _ = simulate(policy, [500.0] * 120)
    d = state.to_dict()
    text = json.dumps(d)  # plain numbers, lists, dicts, None
    back = GoodputState.from_dict(json.loads(text))
    assert back == state
    # continuing from the restored state gives exactly what continuing from the original gives
    a, _, _ = simulate(policy, [900.0] * 100, batch=64, state=state, seed=3)
    b, _, _ = simulate(policy, [900.0] * 100, batch=64, state=back, seed=3)
    assert a == b
    with pytest.raises(ValueError, match="not a goodput policy state"):
        GoodputState.from_dict({"times": {}})


def test_options_are_checked():
    with pytest.raises(ConfigError, match="no option"):
        make_goodput_policy(delta=0.5)
    with pytest.raises(ConfigError, match="rel_gain"):
        make_goodput_policy(rel_gain=-0.1)
    with pytest.raises(ConfigError, match="max_batch"):
        make_goodput_policy(min_batch=64, max_batch=32)
    assert make_goodput_policy(max_batch=1024).name == "goodput"


# --- --lr auto: range test on a quadratic -------------------------------------------------------------------


def gd_quadratic(h, lr, k=5, w0=1.0):
    """Loss ½·h·w² before and after k gradient-descent steps: w ← (1 − lr·h)·w."""
    w = w0
    for _ in range(k):
        w = w - lr * h * w
    return 0.5 * h * w0 ** 2, 0.5 * h * w ** 2 if math.isfinite(w) else math.inf


def run_range_test(test, h, k=5):
    state = test.init_state()
    while (lr := test.propose(state)) is not None:
        before, after = gd_quadratic(h, lr, k)
        state = test.observe(state, lr, before, after)
    return test.result(state), state


@pytest.mark.parametrize("h", [0.3, 5.0, 1234.0])
@pytest.mark.parametrize("start_lr", [1e-5, 1.0])  # from below, and (for h > 2) from inside the unstable range
@pytest.mark.parametrize("pick", ["stable", "steepest"])
def test_range_test_picks_a_stable_lr_near_the_optimum(h, start_lr, pick):
    test = LrRangeTest(start_lr=start_lr, pick=pick)
    result, state = run_range_test(test, h)
    assert 0 < result.lr < 2 / h                        # GD on ½hw² is stable exactly for lr < 2/h
    assert 0.5 / h <= result.lr <= 2 / h                # within a factor 2 of the optimal 1/h
    assert len(result.log) == len(state.trials) <= test.max_trials
    assert any(t.verdict in ("rose", "diverged") for t in state.trials)  # it found the edge
    assert "lr" in result.reason


def run_kept_range_test(test, h, k=5):
    """The trainer's way (``scalesgd.lr_probe``): a stable or flat trial is kept (the next starts where it ended),
    a trial that rose or diverged is undone."""
    state, w = test.init_state(), 1.0
    while (lr := test.propose(state)) is not None:
        before, after = gd_quadratic(h, lr, k, w0=w)
        state = test.observe(state, lr, before, after)
        if state.trials[-1].verdict in ("stable", "flat"):
            w = w * (1 - lr * h) ** k
    return test.result(state), state


@pytest.mark.parametrize("h", [0.3, 5.0, 1234.0])
@pytest.mark.parametrize("start_lr", [1e-3, 1.0])  # from below (within 10 trials), and from above the edge
def test_kept_trials_search_as_undone_ones_where_the_stable_range_does_not_move(h, start_lr):
    """On ½hw² the stable range (0, 2/h) is the same from every point and the relative fall (1 − lr·h)^(2k) too,
    so keeping the stable trials must not change the rates tried nor the choice: the trainer's continuing ramp
    is the range test, only cheaper. With the trainer's settings (×3, one refinement, a quarter of the largest
    stable rate) the choice is within [1/(4·√3), 1/4] of the edge 2/h."""
    from scalesgd.lr_probe import LR_PROBE

    test = LrRangeTest(**{**LR_PROBE, "start_lr": start_lr})
    kept, kept_state = run_kept_range_test(test, h)
    undone, undone_state = run_range_test(test, h)
    assert [t.lr for t in kept_state.trials] == pytest.approx([t.lr for t in undone_state.trials])
    assert kept.lr == pytest.approx(undone.lr)
    largest = max(t.lr for t in kept_state.trials if t.verdict == "stable")
    assert largest < 2 / h and kept.lr == pytest.approx(largest / LR_PROBE["safety_factor"])
    assert 2 / h / (4 * 3 ** 0.5) <= kept.lr < 2 / h / 4


def test_range_test_detects_divergence_and_refines():
    test = LrRangeTest(start_lr=1e-3, factor=10 ** 0.5, refine_trials=3)
    state = test.init_state()
    state = test.observe(state, 1e-3, 2.3, 2.2)
    assert state.trials[-1].verdict == "stable" and test.propose(state) == pytest.approx(1e-3 * 10 ** 0.5)
    state = test.observe(state, test.propose(state), 2.3, float("nan"))
    assert state.trials[-1].verdict == "diverged" and state.phase == "refine"
    assert test.propose(state) == pytest.approx(1e-3 * 10 ** 0.25)  # geometric midpoint
    state = test.observe(state, test.propose(state), 2.3, 50.0)     # > 4 × start: diverged
    assert state.trials[-1].verdict == "diverged"
    assert test.observe(state, 1e-3, 2.3, 2.29).trials[-1].verdict == "flat"  # < 1% fall


def test_range_test_refinement_narrows_on_flat_trials_too():
    test = LrRangeTest(start_lr=1.0, refine_trials=3)
    state = test.init_state()
    state = test.observe(state, 1.0, 1.0, 0.5)            # stable
    state = test.observe(state, 2.0, 1.0, 1.5)            # rose -> refine between 1 and 2
    proposals = []
    while (lr := test.propose(state)) is not None:
        proposals.append(lr)
        state = test.observe(state, lr, 1.0, 0.995)       # flat: < 1% fall, near the edge
    assert len(proposals) == 3 and len(set(proposals)) == 3  # never the same rate twice
    assert proposals == sorted(proposals, reverse=True) and all(1.0 < p < 2.0 for p in proposals)
    assert test.result(state).lr == pytest.approx(0.5)   # largest stable 1.0 / 2


def test_range_test_without_a_stable_lr_says_so():
    test = LrRangeTest(start_lr=1.0, min_lr=0.1)
    state = test.init_state()
    while (lr := test.propose(state)) is not None:
        state = test.observe(state, lr, 1.0, 1.5)  # every rate makes it worse
    assert state.phase == "done" and len(state.trials) <= 5
    with pytest.raises(ConfigError, match="give --lr explicitly"):
        test.result(state)


def test_range_test_stops_at_max_trials_and_max_lr():
    # h = 1e-3: stable up to lr 2000; from lr 10 every trial is stable and falls by more than 1%
    test = LrRangeTest(start_lr=10.0, max_trials=4)
    result, state = run_range_test(test, 1e-3)  # the ramp ends by the trial count
    assert len(state.trials) == 4 and "no instability" in result.reason
    assert result.lr == pytest.approx(80.0 / 2)
    test = LrRangeTest(start_lr=10.0, max_lr=100.0)
    _, state = run_range_test(test, 1e-3)
    assert [t.lr for t in state.trials] == [10.0, 20.0, 40.0, 80.0]


def test_range_test_options_are_checked():
    with pytest.raises(ConfigError, match="factor"):
        LrRangeTest(factor=1.0)
    with pytest.raises(ConfigError, match="pick"):
        LrRangeTest(pick="best")
    with pytest.raises(ValueError, match="saved state"):
        LrRangeTest().observe(LrRangeTest().init_state(), 0.1, float("nan"), 1.0)


def test_window_median_is_numpys():
    from scalesgd.goodput import _median

    rng = random.Random(3)
    for n in range(1, 9):
        for _ in range(200):
            values = [rng.choice([rng.random(), rng.expovariate(1e3), 0.0, 1e300]) for _ in range(n)]
            assert _median(values) == float(np.median(np.asarray(values, dtype=np.float64)))
