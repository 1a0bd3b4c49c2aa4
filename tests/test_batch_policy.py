"""Batch-size policies: limits, rounding, hysteresis, memory cap, warm-up, schedules, purity."""

import math
import random

import pytest

from scalesgd.batch_policy import (BATCH_POLICIES, BatchPolicyState, DiversityPolicy, StepObservation,
                                   legal_batch_size, make_batch_policy, parse_schedule, scheduled_batch_size)
from scalesgd.errors import ConfigError


def obs(step=0, epoch=0.0, batch=64, bound=None, p=4):
    return StepObservation(step=step, epoch=epoch, global_batch_size=batch, batch_bound_est=bound, world_size=p)


def eager(**options):
    """A diversity policy with warm-up, interval and patience off, so one mechanism is tested at a time."""
    return make_batch_policy("diversity", **{"min_steps": 0, "min_interval_steps": 0, "patience_steps": 1,
                                             **options})


def run(policy, estimates, *, batch=64, p=4, state=None):
    """Feed a sequence of estimates as a trainer would; return the batch after each step and the final state."""
    state = state or policy.init_state()
    batches = []
    for step, est in enumerate(estimates):
        decision, state = policy.next(state, obs(step=step, batch=batch, bound=est, p=p))
        assert decision.changed == (decision.global_batch_size != batch)
        batch = decision.global_batch_size
        batches.append(batch)
    return batches, state


# --- legal_batch_size ------------------------------------------------------------------------------------

def test_legal_batch_rounds_to_nearest_multiple_of_p():
    assert legal_batch_size(101, world_size=4) == 100
    assert legal_batch_size(102, world_size=4) == 104  # half rounds up
    assert legal_batch_size(103.9, world_size=4) == 104
    assert legal_batch_size(77, world_size=1) == 77


def test_legal_batch_never_below_p():
    assert legal_batch_size(0.3, world_size=8) == 8
    assert legal_batch_size(-5, world_size=3) == 3
    assert legal_batch_size(1, world_size=8, min_batch=1) == 8


def test_legal_batch_clips_and_rounds_inside_limits():
    assert legal_batch_size(10, world_size=4, min_batch=30) == 32         # min rounded up to a multiple
    assert legal_batch_size(1000, world_size=4, max_batch=130) == 128     # max rounded down
    assert legal_batch_size(1000, world_size=4, max_batch_memory=99) == 96
    assert legal_batch_size(1000, world_size=4, max_batch=200, max_batch_memory=150) == 148
    # memory beats the user's minimum
    assert legal_batch_size(10, world_size=4, min_batch=256, max_batch_memory=100) == 100


def test_legal_batch_results_always_legal():
    rng = random.Random(0)
    for _ in range(2000):
        p = rng.randint(1, 9)
        min_b = rng.randint(1, 300)
        max_b = rng.choice([None, rng.randint(min_b, 2000)])
        mem = rng.choice([None, rng.randint(p, 3000)])
        b = legal_batch_size(rng.uniform(-10, 5000), world_size=p, min_batch=min_b, max_batch=max_b,
                             max_batch_memory=mem)
        assert b % p == 0 and b >= p
        assert legal_batch_size(b, world_size=p, min_batch=min_b, max_batch=max_b, max_batch_memory=mem) == b
        for cap in (max_b, mem):
            if cap is not None:
                assert b <= cap


def test_legal_batch_cap_below_p_is_config_error():
    with pytest.raises(ConfigError, match="fewer workers"):
        legal_batch_size(64, world_size=8, max_batch_memory=4)
    with pytest.raises(ConfigError, match="max_batch"):
        legal_batch_size(64, world_size=8, max_batch=7)


# --- fixed ------------------------------------------------------------------------------------------------

def test_fixed_keeps_configured_batch():
    policy = make_batch_policy("fixed", global_batch_size=128)
    batches, state = run(policy, [None, 1e6, 3.0, float("nan")], batch=128)
    assert batches == [128] * 4 and state.n_changes == 0
    decision, _ = make_batch_policy("fixed").next(BatchPolicyState(), obs(batch=96, bound=5000.0))
    assert decision.global_batch_size == 96 and not decision.changed


def test_fixed_restores_configured_batch():
    decision, state = make_batch_policy("fixed", global_batch_size=128).next(BatchPolicyState(), obs(batch=64))
    assert decision.global_batch_size == 128 and decision.changed and state.n_changes == 1


# --- diversity ---------------------------------------------------------------------------------------------

def test_diversity_target_formula():
    policy = eager(delta=0.5)
    decision, state = policy.next(policy.init_state(), obs(batch=64, bound=413.0, p=4))
    # 0.5·413 + 1 = 207.5 -> nearest multiple of 4 = 208
    assert decision.global_batch_size == 208 and decision.changed
    assert decision.reason.startswith("grow") and state.n_changes == 1 and state.last_change_step == 0
    decision, _ = policy.next(policy.init_state(), obs(batch=256, bound=100.0, p=4))  # 51 -> 52
    assert decision.global_batch_size == 52 and decision.reason.startswith("shrink")


def test_diversity_default_delta_is_half():
    assert DiversityPolicy().delta == 0.5 and DiversityPolicy().target(100.0) == 51.0


def test_diversity_clips_to_min_and_max():
    policy = eager(min_batch=32, max_batch=500)
    assert policy.next(policy.init_state(), obs(batch=128, bound=2.0, p=3))[0].global_batch_size == 33
    assert policy.next(policy.init_state(), obs(batch=129, bound=1e9, p=3))[0].global_batch_size == 498


def test_diversity_never_below_p():
    policy = eager()
    decision, _ = policy.next(policy.init_state(), obs(batch=64, bound=1.0, p=16))  # target 1.5
    assert decision.global_batch_size == 16


def test_diversity_max_batch_cap_honoured():
    # (the never-supplied per-observation memory cap is gone; max_batch is the hard cap the trainer passes)
    policy = eager(max_batch=1000)
    batches, _ = run(policy, [1e5] * 50, batch=64, p=4)
    assert max(batches) <= 1000 and batches[-1] == 1000
    # a current batch above the cap is cut at once, even during warm-up and without an estimate
    cold = make_batch_policy("diversity", min_steps=100, min_interval_steps=100, max_batch=1002)
    decision, _ = cold.next(cold.init_state(), obs(batch=2048, bound=None, p=4))
    assert decision.global_batch_size == 1000 and decision.changed and decision.reason.startswith("forced")


def test_diversity_illegal_current_batch_is_corrected():
    # resumed on 3 workers with a batch of 64: not a multiple of P
    policy = make_batch_policy("diversity")
    decision, _ = policy.next(policy.init_state(), obs(batch=64, bound=None, p=3))
    assert decision.global_batch_size == 63 and decision.changed


def test_diversity_holds_without_estimate():
    policy = eager()
    for bad in (None, float("nan"), float("inf"), 0.0, -3.0):
        decision, state = policy.next(policy.init_state(), obs(batch=64, bound=bad))
        assert decision.global_batch_size == 64 and not decision.changed
        assert state.n_estimates == 0


def test_diversity_warmup():
    policy = eager(min_steps=10)
    batches, state = run(policy, [None] * 5 + [1000.0] * 20, batch=64)
    # estimates arrive at step 5; the 10th usable one is step 14
    assert batches[:14] == [64] * 14 and batches[14] == 500
    assert state.n_estimates == 20 and state.n_changes == 1


def test_diversity_small_moves_do_not_change():
    policy = eager(rel_threshold=0.25)
    # targets 0.5·B + 1 within ±25% of 200 in log scale: 161 … 249
    for bound in (330.0, 398.0, 440.0, 490.0):
        decision, _ = policy.next(policy.init_state(), obs(batch=200, bound=bound))
        assert not decision.changed, (bound, decision)
        assert decision.reason.startswith("hold")
    assert policy.next(policy.init_state(), obs(batch=200, bound=520.0))[0].changed  # 261 > 250
    assert policy.next(policy.init_state(), obs(batch=200, bound=300.0))[0].changed  # 151 < 160


def test_diversity_min_interval():
    policy = eager(min_interval_steps=50)
    estimates = [400.0] * 10 + [2000.0] * 100
    batches, state = run(policy, estimates, batch=64)
    assert batches[0] == 200                       # first change at step 0
    assert batches[49] == 200 and batches[50] == 1000  # next change no earlier than step 50
    assert state.n_changes == 2


def noisy_bound(n, sigma, seed, true_bound=400.0):
    """i.i.d. log-normal noise around a constant bound (target 0.5·400 + 1 = 201)."""
    rng = random.Random(seed)
    return [true_bound * math.exp(rng.gauss(0.0, sigma)) for _ in range(n)]


def test_diversity_noisy_estimates_do_not_thrash():
    noisy = noisy_bound(5000, 0.12, seed=1)
    # band and patience together (interval and warm-up off): one or two changes, then it stays put
    policy = eager(rel_threshold=0.25, patience_steps=10)
    batches, state = run(policy, noisy, batch=64, p=4)
    assert state.n_changes <= 2
    assert all(150 <= b <= 260 for b in batches[10:])
    # the band alone is not enough: after a change the batch sits at a noisy target and the next
    # estimate on the other side of the truth leaves the band again
    _, band_only = run(eager(rel_threshold=0.25), noisy, batch=64, p=4)
    assert band_only.n_changes > 200
    _, no_band = run(eager(rel_threshold=0.0), noisy, batch=64, p=4)
    assert no_band.n_changes > 2000
    # the defaults on noisier (20%) estimates: a few changes early on, then none over thousands of steps
    for seed in range(5):
        batches, default = run(make_batch_policy("diversity"), noisy_bound(5000, 0.2, seed=seed), batch=64, p=4)
        assert 1 <= default.n_changes <= 5 and default.last_change_step < 1000
        assert all(140 <= b <= 280 for b in batches[1000:])


def test_diversity_estimate_oscillating_across_band_edge_never_changes():
    # targets alternate 191 (inside the 25% band around 200) and 261 (outside): never 10 in a row outside
    edge = [(520.0 if i % 2 else 380.0) for i in range(5000)]
    _, state = run(eager(patience_steps=10), edge, batch=200, p=4)
    assert state.n_changes == 0
    _, state = run(make_batch_policy("diversity"), edge, batch=200, p=4)
    assert state.n_changes == 0


def test_diversity_patience():
    policy = eager(patience_steps=5)
    # out-of-band four times, back inside (resets), then five in a row
    estimates = [1000.0] * 4 + [400.0] + [1000.0] * 5
    batches, state = run(policy, estimates, batch=200, p=4)
    assert batches[:9] == [200] * 9 and batches[9] == 500 and state.n_changes == 1
    # a switch of side also resets the count
    estimates = [1000.0] * 4 + [100.0] * 4 + [1000.0] * 4
    _, state = run(policy, estimates, batch=200, p=4)
    assert state.n_changes == 0 and state.pending_direction == 1 and state.pending_count == 4
    # a missing estimate neither counts nor resets
    estimates = [1000.0] * 4 + [None] + [1000.0]
    batches, _ = run(policy, estimates, batch=200, p=4)
    assert batches[-1] == 500


def test_diversity_follows_a_falling_then_rising_bound():
    # B_S ≈ 265 at start, ≈ 30 mid-training, ≈ 90 late (REFERENCES §5)
    policy = make_batch_policy("diversity", min_steps=20, min_interval_steps=50)
    estimates = [265.0] * 300 + [30.0] * 300 + [90.0] * 300
    batches, _ = run(policy, estimates, batch=32, p=2)
    assert batches[299] == 134 and batches[599] == 16 and batches[-1] == 46


def test_diversity_is_pure():
    policy = make_batch_policy("diversity", min_steps=3, min_interval_steps=2)
    state = BatchPolicyState(n_estimates=7, last_change_step=3, n_changes=1)
    o = obs(step=9, batch=64, bound=900.0)
    assert policy.next(state, o) == policy.next(state, o)
    assert state == BatchPolicyState(n_estimates=7, last_change_step=3, n_changes=1)
    rng = random.Random(3)
    estimates = [rng.choice([None, rng.uniform(10, 3000)]) for _ in range(500)]
    assert run(policy, estimates) == run(policy, estimates)


@pytest.mark.parametrize("kwargs,match", [
    (dict(delta=0), "delta"),
    (dict(delta=float("inf")), "delta"),
    (dict(min_batch=0), "min_batch"),
    (dict(min_batch=64, max_batch=32), "max_batch"),
    (dict(rel_threshold=-0.1), "rel_threshold"),
    (dict(min_interval_steps=-1), "min_interval_steps"),
    (dict(min_steps=-1), "min_steps"),
    (dict(patience_steps=0), "patience_steps"),
])
def test_diversity_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_batch_policy("diversity", **kwargs)


# --- schedule ----------------------------------------------------------------------------------------------

def test_parse_schedule():
    assert parse_schedule("0:128,5:256,10:512") == ((0.0, 128), (5.0, 256), (10.0, 512))
    assert parse_schedule(" 0 : 64 , 2.5:128 ") == ((0.0, 64), (2.5, 128))
    assert parse_schedule("3:1024") == ((3.0, 1024),)


@pytest.mark.parametrize("text,match", [
    ("", "empty"),
    ("   ", "empty"),
    ("0:128,0:256", "strictly increasing"),
    ("5:128,2:256", "strictly increasing"),
    ("0:0", "integer >= 1"),
    ("0:-5", "integer >= 1"),
    ("0:128.5", "not an integer"),
    ("zero:128", "not a number"),
    ("0-128", "epoch:batch"),
    ("0:128:3", "epoch:batch"),
    ("0:128,", "epoch:batch"),
    ("-1:128", ">= 0"),
    ("nan:128", ">= 0"),
])
def test_parse_schedule_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_schedule(text)


def test_scheduled_batch_lookup():
    sched = parse_schedule("1:128,5:256,10.5:512")
    assert scheduled_batch_size(sched, 0.99) is None
    assert scheduled_batch_size(sched, 1.0) == 128
    assert scheduled_batch_size(sched, 4.999) == 128
    assert scheduled_batch_size(sched, 5.0) == 256
    assert scheduled_batch_size(sched, 10.49) == 256
    assert scheduled_batch_size(sched, 10.5) == 512
    assert scheduled_batch_size(sched, 1e6) == 512


def test_schedule_policy_steps_through_epochs():
    policy = make_batch_policy("schedule", schedule="0:128,5:256,10:512")
    state, batch, seen = policy.init_state(), 128, []
    for step, epoch in enumerate([0.0, 1.0, 4.9, 5.0, 7.0, 10.0, 12.0]):
        decision, state = policy.next(state, StepObservation(step, epoch, batch, None, 4))
        batch = decision.global_batch_size
        seen.append((batch, decision.changed))
    assert seen == [(128, False), (128, False), (128, False), (256, True), (256, False), (512, True),
                    (512, False)]
    assert state.n_changes == 2 and state.last_change_step == 5


def test_schedule_policy_before_first_key_keeps_batch():
    policy = make_batch_policy("schedule", schedule=[(2, 256)])
    decision, _ = policy.next(policy.init_state(), obs(epoch=1.0, batch=96))
    assert decision.global_batch_size == 96 and not decision.changed


def test_schedule_policy_rounds_to_p():
    policy = make_batch_policy("schedule", schedule="0:100,1:1000")
    decision, _ = policy.next(policy.init_state(), obs(epoch=0.5, batch=64, p=3))
    assert decision.global_batch_size == 99 and "legalised" in decision.reason
    decision, _ = policy.next(policy.init_state(), obs(epoch=1.5, batch=99, p=3))
    assert decision.global_batch_size == 999 and "legalised to 999" in decision.reason


def test_schedule_policy_pure():
    policy = make_batch_policy("schedule", schedule="0:128,5:256")
    o = obs(step=3, epoch=6.0, batch=128)
    assert policy.next(BatchPolicyState(), o) == policy.next(BatchPolicyState(), o)


# --- factory -----------------------------------------------------------------------------------------------

def test_make_batch_policy_errors():
    with pytest.raises(ConfigError, match="choose one of diversity, fixed, goodput, schedule"):
        make_batch_policy("adaptive")
    with pytest.raises(ConfigError, match="goodput.*no option.*dleta"):  # built through the deferred import
        make_batch_policy("goodput", dleta=0.5)
    assert make_batch_policy("goodput", max_batch=512).name == "goodput"
    with pytest.raises(ConfigError, match="no option.*dleta.*delta"):
        make_batch_policy("diversity", dleta=0.5)
    with pytest.raises(ConfigError, match="needs schedule="):
        make_batch_policy("schedule")
    with pytest.raises(ConfigError, match="global_batch_size"):
        make_batch_policy("fixed", global_batch_size=0)


def test_every_policy_has_a_name_and_initial_state():
    options = {"schedule": dict(schedule="0:32")}
    for name in BATCH_POLICIES:
        policy = make_batch_policy(name, **options.get(name, {}))
        assert policy.name == name and policy.init_state() == BatchPolicyState()


def test_observation_validation():
    with pytest.raises(ValueError):
        obs(p=0)
    with pytest.raises(ValueError):
        obs(batch=0)
    with pytest.raises(ValueError):
        obs(epoch=-1.0)
