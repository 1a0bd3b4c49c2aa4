"""Smoke tests of bench/time_to_accuracy.py: its clock, batch summaries and verdicts, and one tiny run of
each contestant (DDP baseline, the diversity policy, goodput with --lr auto) on digits."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "time_to_accuracy.py"


@pytest.fixture(scope="module")
def tta():
    spec = importlib.util.spec_from_file_location("time_to_accuracy", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["time_to_accuracy"] = module  # spawned workers unpickle the bench's job function by name
    sys.path.insert(0, str(BENCH.parent))
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH.parent))
    sys.modules.pop("time_to_accuracy", None)


def _ev(epoch, acc, time_s, eval_s):
    return {"step": 0, "epoch": epoch, "test_accuracy": acc, "time_s": time_s, "eval_s": eval_s}


def test_time_to_target_interpolates_and_excludes_every_evaluation_up_to_the_hit(tta):
    evals = [_ev(0.5, 0.80, 2.0, 0.5), _ev(1.0, 0.93, 4.0, 0.5), _ev(1.5, 0.95, 6.0, 0.5), _ev(2.0, 0.99, 8.0, 0.5)]
    excl, incl, epoch = tta.time_to_target(evals, 0.94)
    # 0.94 lies half-way from the evaluation at epoch 1.0 (0.93) to the one at 1.5 (0.95): every clock is
    # interpolated there (rundata.passes_to_target), the one without evaluation from 4.0 - 1.0 and 6.0 - 1.5
    assert (incl, epoch) == pytest.approx((5.0, 1.25))
    assert excl == pytest.approx(0.5 * (4.0 - 1.0) + 0.5 * (6.0 - 1.5))
    assert tta.time_to_target(evals, 0.995) is None
    assert tta.time_to_target(evals, 0.93)[2] == 1.0  # reaching the target exactly counts


def test_a_seed_is_represented_by_its_median_run(tta):
    def run(t):
        return tta.RunResult("goodput", 0, 128, 0.1, [], time_to_target_s=t)

    assert tta.median_run([run(3.0), run(1.0), run(2.0)]).time_to_target_s == 2.0
    assert tta.median_run([run(1.0), run(math.inf), run(2.0)]).time_to_target_s == 2.0  # one miss is outvoted
    assert math.isinf(tta.median_run([run(math.inf), run(1.0), run(math.inf)]).time_to_target_s)
    assert tta.median_run([run(1.0), run(2.0)]).time_to_target_s == 2.0  # even count: the slower middle one


def test_settled_batch_is_the_median_over_the_last_half_of_the_examples(tta):
    # 1 epoch at 128 (10 steps), then 1 epoch at 32 (40 steps): the last half is all at 32.
    batches = [((i + 1) * 0.1, 128) for i in range(10)] + [(1.0 + (i + 1) * 0.025, 32) for i in range(40)]
    assert tta.settled_batch(batches) == 32
    assert tta.settled_batch([]) is None
    assert tta.batch_at(batches, 0.5) == 128 and tta.batch_at(batches, 1.5) == 32
    assert tta.batch_at(batches, math.inf) == 32


def test_step_time_fit_and_the_wall_time_optimal_batch(tta):
    t0, c = 3e-3, 20e-6
    fit = tta.fit_step_time([(b, t0 + c * b) for b in (32, 64, 128, 512)])
    assert fit == pytest.approx((t0, c))
    assert tta.fit_step_time([(128, 1.0), (128, 2.0)]) is None
    # B* = sqrt(B_h * B_noise) minimises T(B) = (1 + B_noise/B)(t0 + cB) (McCandlish steps x affine step time)
    b_noise = 90.0
    best = tta.goodput_batch(t0 / c, b_noise)
    assert best == pytest.approx(math.sqrt(150 * 90))
    wall = lambda b: (1 + b_noise / b) * (t0 + c * b)
    assert all(wall(best) <= wall(b) for b in (best * 0.8, best * 1.25, 8, 1024))


def _run(tta, kind, seed, batch, time_s, batches=()):
    evals = [_ev(1.0, 0.99 if math.isfinite(time_s) else 0.5, time_s if math.isfinite(time_s) else 9.0, 0.0)]
    return tta.finish(tta.RunResult(kind, seed, batch, 0.05, evals, list(batches)), 0.9)


def test_compare_picks_the_fastest_fixed_median_and_checks_the_batch(tta):
    settled = [(1.0, 100)]
    diversity = [_run(tta, "diversity", s, 128, t, settled) for s, t in enumerate([4.0, 5.0, 6.0])]
    fixed = {
        (64, 0.1): [_run(tta, "fixed", s, 64, t, [(1.0, 64)]) for s, t in enumerate([6.0, 6.0, 7.0])],
        (256, 0.1): [_run(tta, "fixed", s, 256, t, [(1.0, 256)]) for s, t in enumerate([9.0, 10.0, 11.0])],
        (32, 0.2): [_run(tta, "fixed", s, 32, t, [(1.0, 32)]) for s, t in enumerate([1.0, math.inf, math.inf])],
    }
    out = tta.compare(diversity, fixed)
    assert (out["best_fixed_batch"], out["best_fixed_lr"]) == (64, 0.1)  # a config missing on 2/3 seeds loses
    assert out["ratio"] == pytest.approx(5.0 / 6.0)
    assert out["ratio_verdict"] == "MET"
    assert out["settled_batch_median"] == 100 and out["batch_within_factor_2"] and out["batch_verdict"] == "MET"
    assert out["fixed_medians"]["B=32,lr=0.2"] is None

    slow = [_run(tta, "diversity", s, 128, t, [(1.0, 16)]) for s, t in enumerate([7.0, 8.0, math.inf])]
    out = tta.compare(slow, fixed)
    assert out["ratio"] == pytest.approx(8.0 / 6.0) and out["ratio_verdict"] == "MISSED"
    assert out["settled_batch_median"] == 16 and out["batch_verdict"] == "MISSED"  # 16 < 64/2


@pytest.mark.spawn
@pytest.mark.timeout(900)
def test_one_tiny_run_of_each_contestant(tta, tmp_path):
    from scalesgd.config import RunConfig
    from scalesgd.data import load_data

    task = tta.Task("digits", "mlp", target_accuracy=0.5, max_epochs=2.0, budget_epochs=1.0)
    ds = load_data(RunConfig(dataset="digits", model="mlp"))
    fixed = tta.run_fixed(task, ds, 64, 0.1, seed=0)
    assert fixed.reached and 0 < fixed.time_to_target_s <= fixed.time_to_target_incl_eval_s
    assert fixed.stopped is None and fixed.steps == len(fixed.batches) and fixed.step_wall_by_batch[64] > 0
    assert all(b == 64 for _, b in fixed.batches) and fixed.evals[-1]["test_accuracy"] >= 0.5
    # DDP evaluates after the step crossing each EVAL_EPOCHS of data: consecutive evals a tenth of an epoch apart
    gaps = [b["epoch"] - a["epoch"] for a, b in zip(fixed.evals, fixed.evals[1:])]
    assert all(abs(g - tta.EVAL_EPOCHS) < 64 / ds.n_train + 1e-9 for g in gaps)

    policy = tta.run_policy(task, ds, seed=0, workdir=tmp_path)
    assert policy.kind == "diversity" and policy.global_batch_size == RunConfig.global_batch_size
    assert policy.reached and policy.time_to_target_s <= policy.time_to_target_incl_eval_s
    assert policy.batches and policy.settled_batch is not None and policy.batch_at_target is not None
    assert set(policy.to_dict()) >= {"time_to_target_s", "settled_batch", "evals", "batches"}

    # goodput: defaults only, --lr auto; the lr it reports is the one the range test found, and the probe's
    # time is inside its clock (the first evaluation comes after it)
    goodput = tta.run_policy(task, ds, seed=0, workdir=tmp_path, kind="goodput")
    assert goodput.kind == "goodput" and goodput.global_batch_size == RunConfig.global_batch_size
    assert goodput.reached and goodput.lr_probe_s is not None and 0 < goodput.lr_probe_s < goodput.evals[0]["time_s"]
    assert isinstance(goodput.lr, float) and goodput.lr > 0 and goodput.final_test_accuracy >= 0.5
    budget = tta.run_policy(task, ds, seed=0, workdir=tmp_path, kind="goodput", budget=True)
    assert budget.batches[-1][0] == pytest.approx(task.budget_epochs)  # trained the whole budget, no target stop
    fixed_budget = tta.run_fixed(task, ds, 64, 0.1, seed=0, budget=True)
    assert fixed_budget.batches[-1][0] == pytest.approx(task.budget_epochs, abs=64 / ds.n_train)
    acc = tta.accuracy_at_budget([budget], [fixed_budget])
    assert acc["difference"] == pytest.approx(budget.final_test_accuracy - fixed_budget.final_test_accuracy)


def test_accuracy_at_budget_is_met_within_half_a_point(tta):
    def runs(accs):
        return [tta.RunResult("x", s, 128, 0.1, [], final_test_accuracy=a) for s, a in enumerate(accs)]

    out = tta.accuracy_at_budget(runs([0.950, 0.960, 0.940]), runs([0.954, 0.951, 0.956]))
    assert out["goodput_accuracy_median"] == 0.950 and out["fixed_accuracy_median"] == 0.954
    assert out["difference"] == pytest.approx(-0.004) and out["accuracy_verdict"] == "MET"
    assert tta.accuracy_at_budget(runs([0.94]), runs([0.946]))["accuracy_verdict"] == "MISSED"
    assert tta.accuracy_at_budget(runs([None]), runs([0.5]))["accuracy_verdict"] == "MISSED"  # none counts as 0


@pytest.mark.spawn
def test_hopeless_baseline_runs_stop_on_every_rank(tta):
    """A run past its time limit, or one whose loss blew up, stops at the next evaluation (no hang)."""
    from scalesgd.config import RunConfig
    from scalesgd.data import load_data

    task = tta.Task("digits", "mlp", target_accuracy=0.999, max_epochs=5.0)
    ds = load_data(RunConfig(dataset="digits", model="mlp"))
    late = tta.run_fixed(task, ds, 64, 0.05, seed=0, max_wall_s=0.0)
    assert not late.reached and late.stopped == "time limit" and len(late.evals) == 1
    assert math.isinf(late.time_to_target_s) and late.to_dict()["time_to_target_s"] is None
    blown = tta.run_fixed(task, ds, 64, 1e8, seed=0)
    assert not blown.reached and blown.stopped == "diverged" and len(blown.evals) == 1


def test_trainer_diversity_policy_floors_at_the_starting_batch_unless_told():
    """The default the bench justified: no shrinking below the starting batch without --min-batch."""
    from scalesgd.config import RunConfig
    from scalesgd.batch_policy import run_batch_policy

    def batch_policy(cfg, n_train):
        return run_batch_policy(cfg.batch_policy, global_batch_size=cfg.global_batch_size, n_train=n_train,
                                delta=cfg.delta, min_batch=cfg.min_batch, max_batch=cfg.max_batch)

    cfg = RunConfig(batch_policy="diversity", global_batch_size=128)
    assert batch_policy(cfg, 20000).min_batch == 128 and batch_policy(cfg, 20000).max_batch == 20000
    assert batch_policy(cfg.replace(min_batch=1), 20000).min_batch == 1
    capped = batch_policy(cfg.replace(max_batch=64), 20000)  # a user's max below the start wins
    assert (capped.min_batch, capped.max_batch) == (64, 64)
    assert batch_policy(cfg, 100).min_batch == 100  # never above the data set
