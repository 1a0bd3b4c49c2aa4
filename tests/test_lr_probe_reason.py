"""``--lr auto``'s logged reason says what happened, and the rate it names last is the rate chosen."""

from __future__ import annotations

import re

import pytest

from scalesgd.goodput import LrRangeTest
from scalesgd.lr_probe import LR_PROBE, LR_PROBE_COLD_MARGIN, LR_PROBE_MARGIN, _choose_probe_lr

BUDGET = "the time budget 0.2 s would be passed by the next trial"


def _search(*trials):
    test = LrRangeTest(**LR_PROBE)
    state = test.init_state()
    for lr, before, after in trials:
        assert test.propose(state) == pytest.approx(lr)
        state = test.observe(state, lr, before, after)
    return test, state


def test_one_stable_trial_stopped_by_the_budget_keeps_the_start_and_says_so():
    test, state = _search((0.05, 2.3, 1.9))  # one stable trial, then the budget stopped the ramp
    lr, reason = _choose_probe_lr(test, state, BUDGET)
    assert lr == test.start_lr == 0.05
    assert reason.startswith("one trial ran (lr 0.05: loss 2.3 -> 1.9") and BUDGET in reason
    assert "no rate was unstable and the pick / margin" in reason
    assert reason.endswith("so the base lr is the start 0.05 (the trainer's default --lr)")
    # not the contradictory "... / margin -> 0.0125 ... 0.05" of a pick it did not use
    pick = 0.05 / LR_PROBE["safety_factor"] / LR_PROBE_MARGIN
    assert f"-> {pick:.4g}" not in reason and "among 1 stable" not in reason


def test_several_stable_trials_without_instability_use_a_pick_above_the_start():
    """The kept trials trained at up to 0.45: the largest stable rate / safety / margin is above the start, so it
    is used although nothing above it was unstable (the data bound the rate from below only)."""
    test, state = _search((0.05, 2.3, 2.0), (0.15, 2.0, 1.6), (0.45, 1.6, 1.2))
    lr, reason = _choose_probe_lr(test, state, BUDGET)
    assert lr == pytest.approx(0.45 / LR_PROBE["safety_factor"] / LR_PROBE_MARGIN) and lr > test.start_lr
    assert "largest stable lr 0.45" in reason and "no instability up to lr 0.45" in reason and BUDGET in reason
    assert re.findall(r"-> ([0-9.e-]+)", reason)[-1] == f"{lr:.4g}"


def test_several_stable_trials_below_the_start_keep_the_start_and_name_the_pick():
    test, state = _search((0.05, 2.3, 2.0), (0.15, 2.0, 1.6))
    lr, reason = _choose_probe_lr(test, state, BUDGET)
    pick = 0.15 / LR_PROBE["safety_factor"]
    assert pick / LR_PROBE_MARGIN < test.start_lr and lr == test.start_lr
    assert reason.startswith("2 trials up to lr 0.15 ran") and f"the pick was {pick:.4g}" in reason


def test_an_unstable_rate_bounds_the_pick_and_the_reason_ends_at_the_chosen_rate():
    test, state = _search((0.05, 2.3, 2.0), (0.15, 2.3, 1.5), (0.45, 2.3, 2.6))
    lr, reason = _choose_probe_lr(test, state)
    # an unstable rate bounds it from above: the pick is used even below the start
    assert lr == pytest.approx(0.15 / LR_PROBE["safety_factor"] / LR_PROBE_MARGIN) and lr < test.start_lr
    assert re.findall(r"-> ([0-9.e-]+)", reason)[-1] == f"{lr:.4g}"
    assert "first unstable lr 0.45" in reason and reason.endswith("stopped: the range test finished")


def test_a_start_that_was_unstable_divides_the_pick_by_the_cold_margin_too():
    """Backing off from an unstable start finds the edge of the barely trained model: the pick is divided by
    LR_PROBE_COLD_MARGIN as well, and the reason says why."""
    test, state = _search((0.05, 2.3, 2.5), (0.05 / 3, 2.3, 2.0))
    lr, reason = _choose_probe_lr(test, state)
    assert lr == pytest.approx(0.05 / 3 / LR_PROBE["safety_factor"] / LR_PROBE_MARGIN / LR_PROBE_COLD_MARGIN)
    assert "the start was unstable" in reason and re.findall(r"-> ([0-9.e-]+)", reason)[-1] == f"{lr:.4g}"
    # a start that was stable is not divided by it
    test, state = _search((0.05, 2.3, 2.0), (0.15, 2.0, 2.5))
    assert _choose_probe_lr(test, state)[0] == pytest.approx(0.05 / LR_PROBE["safety_factor"] / LR_PROBE_MARGIN)


def test_flat_trials_below_an_unstable_rate_are_divided_like_a_stable_pick():
    """At a small batch (digits, B=8: 40 examples a trial) no rate lowers the probe loss by 1%: 0.05 and 0.15 are
    flat and 0.45 rose. The rose trial puts the edge within a factor 3 above 0.15, so 0.15 is no "safe, merely
    slow" rate: used as is it trained mnist1d/cnn1d at B=8 to chance accuracy. The largest flat rate below an
    unstable one is divided by the safety factor and margin, as the largest stable one is."""
    test, state = _search((0.05, 2.3076, 2.3045), (0.15, 2.3045, 2.3000), (0.45, 2.3000, 2.4347))
    assert [t.verdict for t in state.trials] == ["flat", "flat", "rose"] and test.propose(state) is None
    lr, reason = _choose_probe_lr(test, state)
    assert lr == pytest.approx(0.15 / LR_PROBE["safety_factor"] / LR_PROBE_MARGIN) and lr < 0.15
    assert "largest flat" in reason and "first unstable lr 0.45" in reason
    assert re.findall(r"-> ([0-9.e-]+)", reason)[-1] == f"{lr:.4g}"
    # without an unstable rate above, the largest flat rate is still taken as it is (nothing bounds it above)
    test, state = _search((0.05, 2.3076, 2.3045), (0.15, 2.3045, 2.3000))
    assert _choose_probe_lr(test, state, BUDGET)[0] == pytest.approx(0.15)
