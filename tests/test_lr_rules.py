"""Learning-rate rules: each formula on hand-computed values, limits, warm-up and schedule endpoints."""

import math

import pytest

from scalesgd.errors import ConfigError
from scalesgd.lr_rules import (LrConfig, adascale_gain, cosine_factor, learning_rate, linear_scale, lr_terms,
                               sqrt_scale, statistical_efficiency, step_factor, warmup_factor)


def lr(cfg, step=0, epoch=0.0, batch=None, **est):
    return learning_rate(cfg, step=step, epoch=epoch, global_batch_size=batch or cfg.base_batch_size, **est)


# --- rules -------------------------------------------------------------------------------------------

def test_constant_ignores_batch():
    cfg = LrConfig(base_lr=0.1, base_batch_size=32, rule="constant")
    assert lr(cfg, batch=32) == pytest.approx(0.1)
    assert lr(cfg, batch=1024) == pytest.approx(0.1)


def test_linear_rule_formula():
    cfg = LrConfig(base_lr=0.1, base_batch_size=256, rule="linear")
    assert linear_scale(8192, 256) == 32.0
    assert lr(cfg, batch=8192) == pytest.approx(3.2)  # Goyal et al.: 0.1·8192/256
    assert lr(cfg, batch=128) == pytest.approx(0.05)


def test_sqrt_rule_formula():
    cfg = LrConfig(base_lr=0.1, base_batch_size=64, rule="sqrt")
    assert sqrt_scale(256, 64) == 2.0
    assert lr(cfg, batch=256) == pytest.approx(0.2)
    assert lr(cfg, batch=576) == pytest.approx(0.3)


def test_adascale_gain_hand_computed():
    # ‖G‖² = 1, tr Σ = 100 per example, B₀ = 10 -> σ₀² = 10; B = 40 -> S = 4:
    # r = (10 + 1) / (10/4 + 1) = 11/3.5
    r = adascale_gain(1.0, 100.0, 40, 10)
    assert r == pytest.approx(11 / 3.5)
    # same via B_noise = 100: r = S·(B_noise + B₀)/(B_noise + B) = 4·110/140
    assert r == pytest.approx(4 * 110 / 140)
    assert statistical_efficiency(1.0, 100.0, 40, 10) == pytest.approx(110 / 140)
    cfg = LrConfig(base_lr=0.2, base_batch_size=10, rule="adascale")
    terms = lr_terms(cfg, step=5, epoch=0.1, global_batch_size=40, grad_sq_norm_est=1.0, trace_cov_est=100.0)
    assert terms.lr == pytest.approx(0.2 * 11 / 3.5)
    assert terms.gain == pytest.approx(11 / 3.5) and terms.efficiency == pytest.approx(110 / 140)


def test_adascale_limits():
    assert adascale_gain(0.3, 7.0, 64, 64) == pytest.approx(1.0)          # S = 1
    assert adascale_gain(1e-12, 1.0, 512, 32) == pytest.approx(16.0, rel=1e-6)  # tr Σ dominates -> S
    assert adascale_gain(0.0, 1.0, 512, 32) == pytest.approx(16.0)
    assert adascale_gain(1.0, 1e-12, 512, 32) == pytest.approx(1.0, rel=1e-9)  # ‖G‖² dominates -> 1


def test_adascale_gain_in_range_and_monotone_in_batch():
    prev = 1.0
    for b in (32, 64, 128, 256, 1024, 4096):
        r = adascale_gain(0.5, 40.0, b, 32)
        assert 1.0 <= r <= b / 32 + 1e-12
        assert r >= prev - 1e-12
        prev = r
        eff = statistical_efficiency(0.5, 40.0, b, 32)
        assert 0 < eff <= 1.0 + 1e-12


@pytest.mark.parametrize("sqr,var", [(None, 1.0), (1.0, None), (float("nan"), 1.0), (1.0, float("inf")),
                                     (0.0, 0.0)])
def test_adascale_missing_estimates_fall_back_to_one(sqr, var):
    assert adascale_gain(sqr, var, 256, 32) == 1.0
    cfg = LrConfig(base_lr=0.1, base_batch_size=32, rule="adascale")
    assert lr(cfg, batch=256, grad_sq_norm_est=sqr, trace_cov_est=var) == pytest.approx(0.1)


def test_adascale_negative_estimates_clamped():
    # unbiased estimators can go negative: ‖G‖² < 0 reads as 0 (pure noise -> r = S), tr Σ < 0 as 0 (r = 1)
    assert adascale_gain(-0.5, 10.0, 128, 32) == pytest.approx(4.0)
    assert adascale_gain(1.0, -3.0, 128, 32) == pytest.approx(1.0)


def test_adascale_below_base_batch_stays_in_range():
    r = adascale_gain(1.0, 100.0, 16, 32)  # S = 1/2
    assert 0.5 <= r <= 1.0


# --- warm-up -------------------------------------------------------------------------------------------

def test_linear_warmup_endpoints_steps():
    cfg = LrConfig(base_lr=0.1, base_batch_size=256, rule="linear", warmup_steps=100)
    b = 1024  # target 0.4
    assert lr(cfg, step=0, batch=b) == pytest.approx(0.04)         # starts at a tenth of the target (< η₀)
    assert lr(cfg, step=50, batch=b) == pytest.approx(0.22)        # halfway: 0.04 + 0.36/2
    assert lr(cfg, step=100, batch=b) == pytest.approx(0.4)        # reaches η₀·B/B₀
    assert lr(cfg, step=10_000, batch=b) == pytest.approx(0.4)
    values = [lr(cfg, step=s, batch=b) for s in range(0, 120)]
    assert all(b2 >= a for a, b2 in zip(values, values[1:]))


def test_warmup_in_epochs():
    cfg = LrConfig(base_lr=0.1, base_batch_size=32, rule="linear", warmup_epochs=5)
    assert lr(cfg, epoch=0.0, batch=256) == pytest.approx(0.08)
    assert lr(cfg, epoch=2.5, batch=256) == pytest.approx(0.08 + 0.72 / 2)
    assert lr(cfg, epoch=5.0, batch=256) == pytest.approx(0.8)


def test_warmup_ramps_for_constant_and_base_batch():
    # Issue 17: a ramp from 1 to 1 (constant rule, or linear at B = B0) was no warm-up at all.
    assert warmup_factor(1.0, 0.0) == pytest.approx(0.1) and warmup_factor(1.0, 0.5) == pytest.approx(0.55)
    assert warmup_factor(1.0, 1.0) == 1.0
    for rule in ("constant", "linear"):
        cfg = LrConfig(base_lr=0.1, base_batch_size=32, rule=rule, warmup_steps=10)
        ramp = [lr(cfg, step=s, batch=32) for s in range(12)]
        assert ramp[0] == pytest.approx(0.01) and ramp[10] == ramp[11] == pytest.approx(0.1)
        assert all(b > a for a, b in zip(ramp[:10], ramp[1:11]))


def test_warmup_from_base_rate_for_large_scale():
    # k >= 10: Goyal et al.'s ramp from eta_0 to k*eta_0 exactly (B0 = 256, B = 8192: k = 32)
    cfg = LrConfig(base_lr=0.1, base_batch_size=256, rule="linear", warmup_steps=100)
    assert lr(cfg, step=0, batch=8192) == pytest.approx(0.1)
    assert lr(cfg, step=50, batch=8192) == pytest.approx(0.1 + 3.1 / 2)
    assert lr(cfg, step=100, batch=8192) == pytest.approx(3.2)


# --- base schedules ------------------------------------------------------------------------------------

def test_cosine_endpoints_and_floor():
    assert cosine_factor(0.0) == pytest.approx(1.0)
    assert cosine_factor(0.5) == pytest.approx(0.5)
    assert cosine_factor(1.0) == pytest.approx(0.0, abs=1e-15)
    assert cosine_factor(2.0) == pytest.approx(0.0, abs=1e-15)
    assert cosine_factor(1.0, 0.1) == pytest.approx(0.1)
    assert cosine_factor(0.5, 0.1) == pytest.approx(0.55)
    cfg = LrConfig(base_lr=0.2, base_batch_size=32, rule="constant", schedule="cosine", total_epochs=10,
                   final_lr_fraction=0.05)
    assert lr(cfg, epoch=0.0) == pytest.approx(0.2)
    assert lr(cfg, epoch=10.0) == pytest.approx(0.01)
    assert lr(cfg, epoch=12.0) == pytest.approx(0.01)
    cfg_steps = LrConfig(base_lr=0.2, base_batch_size=32, rule="constant", schedule="cosine", total_steps=1000)
    assert lr(cfg_steps, step=500, epoch=99.0) == pytest.approx(0.1)  # steps axis ignores epoch


def test_step_decay():
    assert step_factor(29.9, (30, 60), 0.1) == 1.0
    assert step_factor(30, (30, 60), 0.1) == pytest.approx(0.1)
    assert step_factor(75, (30, 60), 0.1) == pytest.approx(0.01)
    cfg = LrConfig(base_lr=0.1, base_batch_size=32, rule="linear", schedule="step", milestone_epochs=(3, 6),
                   gamma=0.5)
    assert lr(cfg, epoch=2.9, batch=64) == pytest.approx(0.2)
    assert lr(cfg, epoch=3.0, batch=64) == pytest.approx(0.1)
    assert lr(cfg, epoch=7.0, batch=64) == pytest.approx(0.05)
    cfg_steps = LrConfig(base_lr=0.1, base_batch_size=32, rule="constant", schedule="step",
                         milestone_steps=[100])
    assert lr(cfg_steps, step=99) == pytest.approx(0.1) and lr(cfg_steps, step=100) == pytest.approx(0.01)


def test_rule_warmup_and_schedule_multiply():
    cfg = LrConfig(base_lr=0.1, base_batch_size=32, rule="sqrt", schedule="cosine", total_steps=200,
                   warmup_steps=50)
    t = lr_terms(cfg, step=25, epoch=0.0, global_batch_size=128)
    assert t.rule_factor == pytest.approx(2.0)
    assert t.warmed_factor == pytest.approx(0.2 + (2.0 - 0.2) / 2)
    assert t.schedule_factor == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 200)))
    assert t.lr == pytest.approx(0.1 * 1.1 * t.schedule_factor)


def test_pure_same_inputs_same_outputs():
    cfg = LrConfig(base_lr=0.1, base_batch_size=32, rule="adascale", schedule="cosine", total_epochs=3)
    kw = dict(step=17, epoch=1.3, global_batch_size=96, grad_sq_norm_est=0.2, trace_cov_est=9.0)
    assert lr_terms(cfg, **kw) == lr_terms(cfg, **kw)


# --- validation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(base_lr=0.0), "base_lr"),
    (dict(base_lr=float("nan")), "base_lr"),
    (dict(base_batch_size=0), "base_batch_size"),
    (dict(rule="cubic"), "choose one of"),
    (dict(schedule="poly"), "choose one of"),
    (dict(warmup_steps=-1), "warm-up"),
    (dict(warmup_steps=5, warmup_epochs=1.0), "not both"),
    (dict(schedule="cosine"), "total_steps or total_epochs"),
    (dict(schedule="cosine", total_steps=10, total_epochs=1.0), "exactly one"),
    (dict(schedule="cosine", total_epochs=0.0), "total_epochs"),
    (dict(schedule="cosine", total_epochs=1.0, final_lr_fraction=1.5), "final_lr_fraction"),
    (dict(final_lr_fraction=0.1), "cosine"),
    (dict(schedule="step"), "milestone"),
    (dict(schedule="step", milestone_epochs=(5, 3)), "strictly increasing"),
    (dict(schedule="step", milestone_epochs=(0, 3)), "> 0"),
    (dict(schedule="step", milestone_epochs=(3,), milestone_steps=(10,)), "exactly one"),
    (dict(schedule="step", milestone_epochs=(3,), gamma=0.0), "gamma"),
    (dict(milestone_epochs=(3,)), "schedule='step'"),
])
def test_bad_options_raise_config_error(kwargs, match):
    base = dict(base_lr=0.1, base_batch_size=32)
    with pytest.raises(ConfigError, match=match):
        LrConfig(**{**base, **kwargs})


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        LrConfig(base_lr=-1, base_batch_size=32)
