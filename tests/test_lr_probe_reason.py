"""``--lr auto``'s logged reason says what happened, and the rate it names last is the rate chosen."""

from __future__ import annotations

import re

import pytest

from scalesgd.goodput import LrRangeTest
from scalesgd.lr_probe import LR_PROBE, LR_PROBE_MARGIN, _choose_probe_lr

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
    assert "no rate was unstable, so the base lr is the ramp's start 0.05" in reason
    # not the contradictory "steepest fall among 1 stable trials ... / margin 10 -> 0.005 ... 0.05" of before
    assert "-> 0.005" not in reason and "among 1 stable" not in reason


def test_several_stable_trials_without_instability_name_the_rate_they_did_not_use():
    test, state = _search((0.05, 2.3, 2.0), (0.15, 2.3, 1.6), (0.45, 2.3, 1.7))
    lr, reason = _choose_probe_lr(test, state, BUDGET)
    assert lr == 0.05
    assert reason.startswith("3 trials up to lr 0.45 ran") and "steepest fall was 0.15's" in reason
    assert "-> 0.015" not in reason


def test_an_unstable_rate_bounds_the_pick_and_the_reason_ends_at_the_chosen_rate():
    test, state = _search((0.05, 2.3, 2.0), (0.15, 2.3, 1.5), (0.45, 2.3, 2.6))
    lr, reason = _choose_probe_lr(test, state)
    assert lr == pytest.approx(0.15 / LR_PROBE_MARGIN)
    assert re.findall(r"-> ([0-9.e-]+)", reason)[-1] == f"{lr:.4g}"
    assert "first unstable lr 0.45" in reason and reason.endswith("stopped: the range test finished")
