"""Wall time to a target test accuracy: ``--batch-policy diversity`` and ``--batch-policy goodput --lr auto``
(defaults, no tuning) against the best fixed-batch plain PyTorch DDP + ``torch.optim.SGD``, P = 2 workers,
several seeds, in the same run.

Tasks: MNIST-1D with the 1-D CNN to 94% test accuracy, scikit-learn digits with the MLP to 97%, and a third
that nothing in either policy was tuned on: digits with the 1-D CNN (the 64 pixels as a sequence) to 96%.

The contestants:

* ``diversity``: ``scalesgd``'s trainer with every default (global batch 128 to start, lr 0.05 of the mean
  loss, momentum 0.9, weight decay 5e-4, lr rule ``constant``, ``--diversity cheap``, δ = 0.5, the
  starting batch as the floor, the policy's own warm-up and hysteresis); nothing tuned. ``--min-batch 1``
  runs it without the floor (it then follows δ·B̂_S + 1 below the start, too).
* ``goodput``: the trainer with ``--batch-policy goodput --lr auto`` and every other default (starting batch
  128; ``--comm auto``, which on these CPU workers is our ``ring-tcp`` all-reduce, while DDP keeps gloo's; the base lr found by the trainer's range test, whose trials continue the training and whose cost, the
  time not spent on kept trials, stays within 5% of the run's estimated time; all of it counts in its clock,
  while the kept trials' examples are not in its epoch count: the seed line prints them; the lr follows the
  AdaScale gain as the batch changes); nothing tuned.
* ``fixed``: DDP + torch.optim.SGD (momentum 0.9, weight decay 5e-4) at every (B, lr) of the declared grid
  B ∈ {32, 64, 128, 256, 512} × lr ∈ {0.025, 0.05, 0.1, 0.2}. The grid is run on seed 0; the TOP_K
  fastest configurations are then run on every seed, and the best fixed baseline is the one with the
  lowest median (selection on the same seeds it is scored on, which can only flatter the baseline).

Shared protocol: the same data, models and seeds; the base learning-rate schedule is ``constant`` for
both (a run stops at the target, so a decaying schedule would make its horizon a hidden knob); the final
phase interleaves the contestants seed by seed, ``--repeats`` rounds per seed (3 by default; a seed's time is
its median run's), so that load from other jobs on this shared machine falls on all of them alike and one stall
does not decide a sub-second run.

Clock: wall time from the start of training to where the test accuracy reaches the target, interpolated
between the last evaluation below it and the first at or above it (``scalesgd.rundata.passes_to_target``,
the sweep's definition), **minus the time spent in evaluations** (excluded for both). Evaluation frequency: every EVAL_EPOCHS of
training data. DDP evaluates after the step that crosses each multiple of EVAL_EPOCHS·n examples;
scalesgd's trainer counts evaluation intervals in steps, so it evaluates every
round(EVAL_EPOCHS·n / 128) steps: every EVAL_EPOCHS at its starting batch of 128, proportionally less
often while the policy holds a larger batch (coarser, a disadvantage of at most a few EVAL_EPOCHS) and
more often below it (finer; only with ``--min-batch``). Evaluation is the test set only for both
(``eval_train_examples=0``).

A "why" line per task fits each contestant's per-step wall time to t0 + c·B and prints the wall-time
optimal batch √(B_h·B_noise), B_h = t0/c, next to the policy's target δ·B̂_S + 1 (see
:func:`goodput_batch`).

Printed, per contestant: the ratio of medians (policy / best fixed; target ≤ 1.0, stretch ≤ 0.8) and whether
the batch the policy settled on (median per-step batch over the last half of its run's examples) lies within
a factor 2 of the best fixed batch; the batch at the moment it reached the target is shown too. For goodput
also: the final test accuracy after a fixed epoch budget (``Task.budget_epochs``, no target stop), median over
seeds, against the best fixed configuration's on the same seeds (target: within 0.5 points), and the whole
cost of tuning (the sum of the grid's run times) beside the one untuned run.

    python bench/time_to_accuracy.py                       # all tasks, full grid, 3 seeds (long: tens of minutes)
    python bench/time_to_accuracy.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalesgd import distributed
from scalesgd.baselines import ddp_worker
from scalesgd.config import RunConfig
from scalesgd.data import Dataset, load_data
from scalesgd.run import train
from scalesgd.rundata import RunData, passes_to_target
from scalesgd.writer import write_json_atomic

GRID_BATCH = (32, 64, 128, 256, 512)
GRID_LR = (0.025, 0.05, 0.1, 0.2)
QUICK_BATCH = (64, 128)
QUICK_LR = (0.05, 0.1)
SEEDS = (0, 1, 2)
# The final phase runs every configuration this many times per seed and keeps the median run: a run to a target
# here takes well under a second on the digits tasks, where one stall of a shared 2-core machine moved a seed's
# time by a third (the same goodput trajectory, 81 steps, took 0.24 s in one full run and 0.32 s in the next).
REPEATS = 3
TOP_K = 3
EVAL_EPOCHS = 0.1
MIN_STEPS_PER_BATCH = 10  # a batch size the policy used for fewer steps (an epoch's tail) is too noisy to time
CAP_FACTOR = 3.0  # a tuning run stops once its wall time passes CAP_FACTOR x the fastest so far
RATIO_TARGET, RATIO_STRETCH, BATCH_FACTOR = 1.0, 0.8, 2.0
ACCURACY_TOLERANCE = 0.005  # goodput's final accuracy after the epoch budget: within 0.5 points of the baseline's
CONTESTANTS = ("diversity", "goodput")


@dataclass(frozen=True)
class Task:
    """One benchmark task: data set, model, target test accuracy, and a cap on the epochs a run may take."""

    dataset: str
    model: str
    target_accuracy: float
    max_epochs: float
    budget_epochs: float = 10.0  # the fixed epoch budget of the final-accuracy comparison


TASKS = {
    "mnist1d": Task("mnist1d", "cnn1d", 0.94, 15.0, 10.0),
    "digits": Task("digits", "mlp", 0.97, 60.0, 30.0),
    "digits-cnn1d": Task("digits", "cnn1d", 0.96, 40.0, 30.0),  # the held-out workload
}


@dataclass
class RunResult:
    """One training run, reduced to what the comparison needs (all times in seconds)."""

    kind: str  # "diversity", "goodput" or "fixed"
    seed: int
    global_batch_size: int  # the starting (diversity) or fixed batch
    lr: float
    evals: list[dict[str, float]]  # step, epoch, test_accuracy, time_s (at the eval's end), eval_s
    batches: list[tuple[float, int]] = field(default_factory=list)  # (epoch after the step, global batch)
    reached: bool = False
    time_to_target_s: float = math.inf  # evaluation excluded
    time_to_target_incl_eval_s: float = math.inf
    epochs_to_target: float = math.inf
    settled_batch: float | None = None
    batch_at_target: int | None = None
    steps: int = 0
    train_wall_s: float = 0.0  # wall time of the whole run, evaluation excluded
    step_wall_by_batch: dict[int, float] = field(default_factory=dict)  # median wall time per step, by batch
    batch_bound_settled: float | None = None  # median online B_S estimate over the last half (policy runs)
    stopped: str | None = None  # why a run ended before its target ("diverged", "time limit"), if it did
    bench_s: float = 0.0  # this run's wall time in the bench, spawn and set-up included
    final_test_accuracy: float | None = None  # at the run's end (the target, or the epoch budget)
    lr_probe_s: float | None = None  # --lr auto: the range test's time (inside every clock above)
    lr_probe_cost_s: float | None = None  # of which not spent on the kept trials' training steps
    lr_probe_epochs: float | None = None  # the kept trials' examples / n_train (not in the run's epoch count)
    comm: str | None = None  # the all-reduce the run used (policy runs: what --comm auto resolved to)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for key in ("time_to_target_s", "time_to_target_incl_eval_s", "epochs_to_target"):
            d[key] = None if math.isinf(d[key]) else d[key]
        return d


def time_to_target(evals: list[dict[str, float]], target: float) -> tuple[float, float, float] | None:
    """(time excluding evaluation, time including it, epoch) where the test accuracy reaches ``target``.

    The crossing is :func:`scalesgd.rundata.passes_to_target`'s (the sweep's and ``predict``'s too): linearly
    interpolated between the last evaluation below the target and the first at or above it, each clock at
    the same fraction. ``time_s`` of an evaluation is the wall time since training started, read at the end
    of that evaluation; ``eval_s`` its own duration. The clock excluding evaluation subtracts the durations
    of every evaluation done by then. None if no evaluation reached the target.
    """
    spent, marked = 0.0, []
    for ev in evals:
        spent += ev["eval_s"]
        marked.append({**ev, "time_excl_eval_s": ev["time_s"] - spent})
    hit = passes_to_target(marked, "test_accuracy", target, clocks=("time_excl_eval_s", "time_s"))
    if hit is None:
        return None
    return hit.clocks["time_excl_eval_s"], hit.clocks["time_s"], hit.passes


def settled_batch(batches: list[tuple[float, int]]) -> float | None:
    """Median per-step global batch over the steps in the last half of the run's examples.

    Args:
        batches: (epoch after the step, global batch of the step) for every step, in order.
    """
    if not batches:
        return None
    half = batches[-1][0] / 2
    tail = [b for epoch, b in batches if epoch > half]
    return float(statistics.median(tail))


def batch_at(batches: list[tuple[float, int]], epoch: float) -> int | None:
    """The global batch of the last step taken at or before ``epoch``."""
    last = None
    for e, b in batches:
        if e > epoch + 1e-9:
            break
        last = b
    return last


def fit_step_time(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares fit of the per-step wall time t(B) = t0 + c·B over (global batch, seconds) points.

    t0 is what every step pays whatever its batch (all-reduce latency, launch and Python overhead), c the
    cost per example. None with fewer than two distinct batch sizes.
    """
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    mb = sum(b for b, _ in points) / n
    mt = sum(t for _, t in points) / n
    c = sum((b - mb) * (t - mt) for b, t in points) / sum((b - mb) ** 2 for b, _ in points)
    return mt - c * mb, c


def goodput_batch(half_throughput_batch: float, noise_scale: float) -> float:
    """The batch that minimises wall time to a target, B* = √(B_h · B_noise).

    Steps to a target follow S = S_min·(1 + B_noise/B) (McCandlish et al. 2018, with B_noise = B_S − 1)
    and a step takes t0 + c·B, so T(B) ∝ (1 + B_noise/B)(t0 + c·B); dT/dB = 0 gives
    B*² = B_noise·t0/c = B_noise·B_h, with B_h = t0/c the batch at which the fixed per-step cost equals
    the per-example cost (throughput is half its asymptote). This is Pollux's goodput
    (throughput × statistical efficiency) maximised over B for this step-time model.
    """
    return math.sqrt(max(half_throughput_batch, 0.0) * max(noise_scale, 0.0))


def finish(result: RunResult, target: float) -> RunResult:
    """Fill the derived fields of ``result`` from its evaluations and batch history."""
    hit = time_to_target(result.evals, target)
    if hit is not None:
        result.reached = True
        result.time_to_target_s, result.time_to_target_incl_eval_s, result.epochs_to_target = hit
    result.settled_batch = settled_batch(result.batches)
    if result.batches:
        result.batch_at_target = batch_at(result.batches, result.epochs_to_target if hit else math.inf)
    return result


def policy_config(task: Task, ds: Dataset, seed: int, run_dir: Path, min_batch: int | None = None,
                  kind: str = "diversity", budget: bool = False) -> RunConfig:
    """A policy run: RunConfig defaults except the task, the stop rule and the shared protocol. ``kind``
    ``diversity`` (``min_batch``: None keeps the trainer's default floor, the starting batch; 1 lets the policy
    shrink) or ``goodput`` (``--batch-policy goodput --lr auto``). ``budget``: train the task's epoch budget
    with no target stop (the final-accuracy comparison) instead of stopping at the target."""
    start_batch = RunConfig.global_batch_size
    policy = dict(batch_policy="diversity", min_batch=min_batch) if kind == "diversity" else dict(
        batch_policy="goodput", lr="auto", min_batch=min_batch)
    return RunConfig(dataset=task.dataset, model=task.model, lr_schedule="constant", **policy,
                     epochs=task.budget_epochs if budget else task.max_epochs,
                     target_accuracy=None if budget else task.target_accuracy,
                     eval_every=max(1, round(EVAL_EPOCHS * ds.n_train / start_batch)), eval_train_examples=0,
                     workers=2, threads_per_worker=1, progress=False, seed=seed, run_dir=str(run_dir))


def fixed_config(task: Task, batch: int, lr: float, seed: int, budget: bool = False) -> RunConfig:
    """The DDP baseline's config: the same defaults, a fixed batch and lr from the grid, constant lr (``budget``:
    the task's epoch budget, no target stop)."""
    return RunConfig(dataset=task.dataset, model=task.model, global_batch_size=batch, lr=lr,
                     lr_schedule="constant", epochs=task.budget_epochs if budget else task.max_epochs,
                     target_accuracy=None if budget else task.target_accuracy,
                     diversity="off", workers=2, threads_per_worker=1, progress=False, seed=seed)


def run_policy(task: Task, ds: Dataset, seed: int, workdir: Path, min_batch: int | None = None,
               kind: str = "diversity", budget: bool = False) -> RunResult:
    """Train with the policy ``kind`` (see :func:`policy_config`) and read its evaluations and batches from the
    run directory."""
    run_dir = workdir / f"{task.dataset}-{task.model}-{kind}-seed{seed}-{time.monotonic_ns()}"
    cfg = policy_config(task, ds, seed, run_dir, min_batch, kind, budget)
    t0 = time.perf_counter()
    summary = train(cfg, ds)
    bench_s = time.perf_counter() - t0
    rows = RunData.open(run_dir).records
    evals = [{k: r[k] for k in ("step", "epoch", "test_accuracy", "time_s", "eval_s")}
             for r in rows if r["kind"] == "eval"]
    steps = [r for r in rows if r["kind"] == "step"]
    batches = [(r["epoch"], r["global_batch_size"]) for r in steps]
    walls: dict[int, list[float]] = {}
    previous, eval_between = None, 0.0  # the last step record, and evaluation time spent since it
    for r in rows:
        if r["kind"] == "step":
            if previous is not None:
                walls.setdefault(r["global_batch_size"], []).append(r["time_s"] - previous["time_s"] - eval_between)
            previous, eval_between = r, 0.0
        elif r["kind"] == "eval":
            eval_between += r["eval_s"]
    half = batches[-1][0] / 2 if batches else 0.0
    bounds = [r["batch_bound_est"] for r in steps if r["epoch"] > half and r.get("batch_bound_est") is not None
              and math.isfinite(r["batch_bound_est"])]
    auto = [r for r in rows if r["kind"] == "lr_auto"]
    result = RunResult(kind, seed, cfg.global_batch_size, auto[0]["lr"] if auto else cfg.lr, evals, batches,
                       steps=len(steps), final_test_accuracy=summary["final_test_accuracy"],
                       lr_probe_s=auto[0]["probe_s"] if auto else None,
                       lr_probe_cost_s=auto[0].get("cost_s") if auto else None,
                       lr_probe_epochs=auto[0]["kept_examples"] / ds.n_train if auto and "kept_examples" in auto[0]
                       else None,
                       train_wall_s=(evals[-1]["time_s"] if evals else 0.0) - sum(e["eval_s"] for e in evals),
                       step_wall_by_batch={b: statistics.median(w) for b, w in sorted(walls.items())
                                           if len(w) >= MIN_STEPS_PER_BATCH},
                       batch_bound_settled=statistics.median(bounds) if bounds else None, bench_s=bench_s,
                       comm=RunData.open(run_dir).config.get("comm_used"))
    return finish(result, task.target_accuracy)


def run_fixed(task: Task, ds: Dataset, batch: int, lr: float, seed: int,
              max_wall_s: float | None = None, budget: bool = False) -> RunResult:
    """Train DDP + torch.optim.SGD at a fixed (batch, lr), evaluating every EVAL_EPOCHS; give up when the
    loss diverges or the wall time passes ``max_wall_s`` (``budget``: the epoch budget, no target stop)."""
    cfg = fixed_config(task, batch, lr, seed, budget)
    t0 = time.perf_counter()
    out = distributed.spawn(_ddp_job, 2, (cfg, ds, max_wall_s), timeout_s=1200)[0]
    bench_s = time.perf_counter() - t0
    batches = []
    examples = 0
    for _ in range(out["steps"]):  # fixed batch: every step takes `batch` examples (the last may be short)
        examples += batch
        batches.append((examples / ds.n_train, batch))
    train_wall_s = out["wall_s"] - sum(e["eval_s"] for e in out["evals"])
    result = RunResult("fixed", seed, batch, lr, out["evals"], batches, steps=out["steps"],
                       train_wall_s=train_wall_s, step_wall_by_batch={batch: train_wall_s / max(out["steps"], 1)},
                       stopped=out["stopped"], bench_s=bench_s, final_test_accuracy=out["final_test_accuracy"])
    return finish(result, task.target_accuracy)


def _ddp_job(rdv, cfg: RunConfig, ds: Dataset, max_wall_s: float | None) -> dict[str, Any]:
    return ddp_worker(rdv, cfg, ds, eval_every_epochs=EVAL_EPOCHS, max_wall_s=max_wall_s)


def median_run(tries: list[RunResult]) -> RunResult:
    """Of repeated runs of one configuration and seed, the one with the median time to target (a missed target
    counts as infinite; with an even count, the slower of the middle two): the seed's representative, so that
    one stall of the machine in one run does not decide a ratio."""
    ordered = sorted(tries, key=lambda r: r.time_to_target_s)
    return ordered[len(ordered) // 2]


def median_time(results: list[RunResult]) -> float:
    """Median time to target (evaluation excluded); a run that missed the target counts as infinite."""
    return statistics.median(r.time_to_target_s for r in results)


def compare(diversity: list[RunResult], fixed: dict[tuple[int, float], list[RunResult]]) -> dict[str, Any]:
    """Ratio of medians against the best fixed configuration and the batch check.

    Args:
        diversity: the policy's runs, one per seed.
        fixed: (batch, lr) → that configuration's runs on the same seeds.
    Returns:
        A dict with the best fixed (batch, lr), both medians, the ratio, the policy's settled batch
        (median over seeds of each run's settled batch) and batch at target, and the verdicts.
    """
    (best_b, best_lr), best_runs = min(fixed.items(), key=lambda kv: (median_time(kv[1]), kv[0]))
    div_med, fix_med = median_time(diversity), median_time(best_runs)  # `diversity`: the policy's runs
    ratio = div_med / fix_med if math.isfinite(fix_med) and fix_med > 0 else math.nan
    settled = [r.settled_batch for r in diversity if r.settled_batch is not None]
    at_target = [r.batch_at_target for r in diversity if r.reached and r.batch_at_target is not None]
    settled_med = statistics.median(settled) if settled else None
    within = settled_med is not None and best_b / BATCH_FACTOR <= settled_med <= best_b * BATCH_FACTOR
    if not math.isfinite(ratio):
        ratio_verdict = "MISSED (a median run did not reach the target)"
    elif ratio <= RATIO_STRETCH:
        ratio_verdict = "MET (stretch met)"
    elif ratio <= RATIO_TARGET:
        ratio_verdict = "MET"
    else:
        ratio_verdict = "MISSED"
    return {
        "best_fixed_batch": best_b, "best_fixed_lr": best_lr,
        "policy_median_s": div_med if math.isfinite(div_med) else None,
        "fixed_median_s": fix_med if math.isfinite(fix_med) else None,
        "ratio": ratio if math.isfinite(ratio) else None,
        "ratio_verdict": ratio_verdict,
        "policy_epochs_median": statistics.median(r.epochs_to_target for r in diversity),
        "fixed_epochs_median": statistics.median(r.epochs_to_target for r in best_runs),
        "settled_batch_median": settled_med,
        "batch_at_target_median": statistics.median(at_target) if at_target else None,
        "batch_within_factor_2": within,
        "batch_verdict": "MET" if within else "MISSED",
        "fixed_medians": {f"B={b},lr={lr:g}": (median_time(rs) if math.isfinite(median_time(rs)) else None)
                          for (b, lr), rs in fixed.items()},
    }


def _fmt_s(x: float) -> str:
    return f"{x:7.2f}s" if math.isfinite(x) else "  missed"


def _fmt_run(r: RunResult) -> str:
    if r.reached:
        return f"{r.time_to_target_s:7.2f}s ({r.epochs_to_target:5.2f} epochs, {r.steps:5d} steps)"
    return f"  missed ({r.stopped or 'epoch cap'} after {r.batches[-1][0] if r.batches else 0:.2f} epochs)"


def explain(diversity: list[RunResult], tuning: list[RunResult], delta: float) -> dict[str, Any]:
    """Why the wall times come out as they do: the per-step cost model t0 + c·B of each contestant, fitted
    to its own runs (DDP: one mean per tuning run; the policy: the median per batch it used), and the
    wall-time-optimal batch √(B_h·B_noise) at the B_S the policy estimated over the last half of its runs,
    next to the policy's target δ·B_S + 1."""
    ddp_fit = fit_step_time([(b, t) for r in tuning if r.steps for b, t in r.step_wall_by_batch.items()])
    ours_fit = fit_step_time([(b, t) for r in diversity for b, t in r.step_wall_by_batch.items()])
    bounds = [r.batch_bound_settled for r in diversity if r.batch_bound_settled is not None]
    b_s = statistics.median(bounds) if bounds else None
    out: dict[str, Any] = {"batch_bound_settled": b_s}
    for name, fit in (("ddp", ddp_fit), ("scalesgd", ours_fit)):
        if fit is not None and fit[1] > 0:
            out[name] = {"t0_s": fit[0], "c_s_per_example": fit[1], "half_throughput_batch": fit[0] / fit[1]}
    for name, runs in (("ddp", tuning), ("scalesgd", diversity)):
        out[f"{name}_step_wall_by_batch"] = {
            b: statistics.median([r.step_wall_by_batch[b] for r in runs if b in r.step_wall_by_batch])
            for b in sorted({b for r in runs for b in r.step_wall_by_batch})}
    if b_s is not None:
        out["policy_target"] = delta * b_s + 1
        if "ddp" in out:
            out["goodput_batch_ddp"] = goodput_batch(out["ddp"]["half_throughput_batch"], b_s - 1)
    return out


def _print_explanation(name: str, why: dict[str, Any]) -> None:
    parts = []
    for who in ("ddp", "scalesgd"):
        if who in why:
            f = why[who]
            parts.append(f"{who} {f['t0_s'] * 1e3:.2f} ms + {f['c_s_per_example'] * 1e6:.1f} us x B "
                         f"(B_h = t0/c = {f['half_throughput_batch']:.0f})")
    for who, by_batch in (("ddp", why["ddp_step_wall_by_batch"]), ("scalesgd", why["scalesgd_step_wall_by_batch"])):
        if who not in why and by_batch:  # no increasing fit (noise, or one batch size): show the medians
            parts.append(f"{who} " + ", ".join(f"B={b}: {t * 1e3:.2f} ms" for b, t in by_batch.items()))
    print(f"why {name}: per-step wall time (eval excluded) " + "; ".join(parts), flush=True)
    if why.get("batch_bound_settled") is not None:
        line = (f"why {name}: policy's B_S estimate over the last half {why['batch_bound_settled']:.0f}: "
                f"target delta*B_S+1 = {why['policy_target']:.0f}")
        if "goodput_batch_ddp" in why:
            line += (f"; wall-time optimum sqrt(B_h*B_noise) with DDP's B_h = {why['goodput_batch_ddp']:.0f} "
                     f"(T ~ (1 + B_noise/B)(t0 + cB))")
        print(line, flush=True)


def accuracy_at_budget(goodput: list[RunResult], fixed: list[RunResult]) -> dict[str, Any]:
    """Final test accuracy after the same epoch budget: goodput's median over seeds against the best fixed
    configuration's median (on the same seeds); met when goodput is at most ACCURACY_TOLERANCE below."""
    ours = statistics.median(r.final_test_accuracy if r.final_test_accuracy is not None else 0.0 for r in goodput)
    theirs = statistics.median(r.final_test_accuracy if r.final_test_accuracy is not None else 0.0 for r in fixed)
    return {"goodput_accuracy_median": ours, "fixed_accuracy_median": theirs, "difference": ours - theirs,
            "accuracy_verdict": "MET" if ours >= theirs - ACCURACY_TOLERANCE else "MISSED"}


def bench_task(name: str, task: Task, grid: list[tuple[int, float]], seeds: tuple[int, ...], top_k: int,
               workdir: Path, min_batch: int | None = None,
               contestants: tuple[str, ...] = CONTESTANTS, repeats: int = 1) -> dict[str, Any]:
    """Tune the fixed baseline on seed ``seeds[0]``, then run the policies and the top-k baselines on all seeds,
    each ``repeats`` times in rotation, a seed's time being its median run's (:func:`median_run`); with goodput,
    then the epoch-budget accuracy runs of goodput and the best fixed configuration."""
    ds = load_data(RunConfig(dataset=task.dataset, model=task.model))
    print(f"\n== {name}: {task.model} on {task.dataset} to {task.target_accuracy:.0%} test accuracy, P=2, "
          f"n_train={ds.n_train}, eval every {EVAL_EPOCHS:g} epoch (excluded from the clock), load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    tuning: dict[tuple[int, float], RunResult] = {}
    best = math.inf
    for b, lr in grid:
        cap = CAP_FACTOR * best if math.isfinite(best) else None
        r = run_fixed(task, ds, b, lr, seeds[0], max_wall_s=cap)
        tuning[(b, lr)] = r
        best = min(best, r.time_to_target_s)
        print(f"  tune  fixed     B={b:<4d} lr={lr:<6g} seed {seeds[0]}: {_fmt_run(r)}", flush=True)
    ranked = sorted(tuning, key=lambda k: (tuning[k].time_to_target_s, k))
    candidates = [k for k in ranked[:top_k] if math.isfinite(tuning[k].time_to_target_s)] or ranked[:1]
    policies: dict[str, list[RunResult]] = {kind: [] for kind in contestants}
    fixed: dict[tuple[int, float], list[RunResult]] = {k: [] for k in candidates}
    for seed in seeds:
        tries: dict[Any, list[RunResult]] = {}
        for rep in range(repeats):  # every contestant once per round: load from other jobs falls on all alike
            for kind in contestants:
                r = run_policy(task, ds, seed, workdir, min_batch if kind == "diversity" else None, kind)
                tries.setdefault(kind, []).append(r)
                probe = f", lr probe {r.lr_probe_s:.2f}s" if r.lr_probe_s is not None else ""
                if r.lr_probe_cost_s is not None and r.lr_probe_epochs is not None:
                    probe += (f" (cost {r.lr_probe_cost_s:.2f}s; its kept trials trained {r.lr_probe_epochs:.2f} "
                              f"epochs more)")
                print(f"  seed {seed} {kind:<9s} B0={r.global_batch_size:<4d} lr={r.lr:<6.3g}: {_fmt_run(r)}  batch "
                      f"at target {r.batch_at_target}, settled {r.settled_batch:g}{probe}; --comm {r.comm}; "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
            for b, lr in candidates:
                f = run_fixed(task, ds, b, lr, seed)
                tries.setdefault((b, lr), []).append(f)
                print(f"  seed {seed} fixed     B={b:<4d} lr={lr:<6g}: {_fmt_run(f)}", flush=True)
        for kind in contestants:
            policies[kind].append(median_run(tries[kind]))
        for key in candidates:
            fixed[key].append(median_run(tries[key]))
    summaries = {kind: compare(runs, fixed) for kind, runs in policies.items()}
    first = summaries[contestants[0]]
    best_key = (first["best_fixed_batch"], first["best_fixed_lr"])
    best_runs = fixed[best_key]
    grid_cost = sum(r.bench_s for r in tuning.values()) + sum(r.bench_s for rs in fixed.values() for r in rs)
    for kind, summary in summaries.items():
        ratio = summary["ratio"]
        runs = policies[kind]
        print(f"time-to-accuracy {name}: {kind} median {_fmt_s(median_time(runs)).strip()} "
              f"({summary['policy_epochs_median']:.2f} epochs) vs best fixed DDP B={summary['best_fixed_batch']} "
              f"lr={summary['best_fixed_lr']:g} median {_fmt_s(median_time(best_runs)).strip()} "
              f"({summary['fixed_epochs_median']:.2f} epochs): ratio "
              f"{'n/a' if ratio is None else f'{ratio:.3f}'} (target <= {RATIO_TARGET}, stretch <= {RATIO_STRETCH}: "
              f"{summary['ratio_verdict']})", flush=True)
        print(f"batch {name}: {kind} settled at {summary['settled_batch_median']:g} (median over the last half of "
              f"its run; {summary['batch_at_target_median']} at the target) vs fastest fixed "
              f"{summary['best_fixed_batch']}: within 2x: {summary['batch_verdict']}", flush=True)
        untuned = statistics.median(r.bench_s for r in runs)
        summary["grid_cost_s"], summary["untuned_run_s"] = grid_cost, untuned
        print(f"cost {name}: tuning the fixed baseline took {grid_cost:.0f} s ({len(tuning)} grid runs + "
              f"{sum(len(rs) for rs in fixed.values())} re-runs, spawn included) vs one untuned {kind} run "
              f"{untuned:.1f} s (median)", flush=True)
    if "goodput" in policies:
        budget_goodput, budget_fixed = [], []
        for seed in seeds:
            budget_goodput.append(run_policy(task, ds, seed, workdir, None, "goodput", budget=True))
            budget_fixed.append(run_fixed(task, ds, *best_key, seed, budget=True))
            print(f"  seed {seed} {task.budget_epochs:g}-epoch budget: goodput test accuracy "
                  f"{budget_goodput[-1].final_test_accuracy:.4f} (lr {budget_goodput[-1].lr:.3g}), fixed B={best_key[0]} "
                  f"lr={best_key[1]:g} {budget_fixed[-1].final_test_accuracy:.4f}", flush=True)
        acc = accuracy_at_budget(budget_goodput, budget_fixed)
        summaries["goodput"].update(acc)
        print(f"accuracy {name}: after {task.budget_epochs:g} epochs goodput median {acc['goodput_accuracy_median']:.4f} "
              f"vs best fixed {acc['fixed_accuracy_median']:.4f} ({100 * acc['difference']:+.2f} points; target "
              f">= -{100 * ACCURACY_TOLERANCE:g}: {acc['accuracy_verdict']})", flush=True)
    for kind in ("diversity",) if "diversity" in policies else ():
        _print_explanation(name, explain(policies[kind], list(tuning.values()), RunConfig.delta))
    return {"task": task.__dict__, "n_train": ds.n_train, "seeds": list(seeds), "eval_every_epochs": EVAL_EPOCHS,
            "clock": "wall time to the first evaluation reaching the target, evaluation time excluded",
            "tuning": [r.to_dict() for r in tuning.values()],
            **{kind: [r.to_dict() for r in runs] for kind, runs in policies.items()},
            "fixed": {f"B={b},lr={lr:g}": [r.to_dict() for r in rs] for (b, lr), rs in fixed.items()},
            "summary": summaries}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=sorted(TASKS))
    p.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds 0..N-1 (default 3)")
    p.add_argument("--top-k", type=int, default=TOP_K, help="grid configurations re-run on every seed")
    p.add_argument("--quick", action="store_true", help="tiny grid (B {64,128} x lr {0.05,0.1}), 1 seed, top 1")
    p.add_argument("--min-batch", type=int, default=None,
                   help="the policy's --min-batch (default: the trainer's, the starting batch; 1 lets it shrink)")
    p.add_argument("--contestants", nargs="+", default=list(CONTESTANTS), choices=CONTESTANTS)
    p.add_argument("--repeats", type=int, default=REPEATS,
                   help=f"runs of every final configuration per seed, in rotation; a seed's time is its median run's "
                        f"(default {REPEATS}; 1 with --quick)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    batches, lrs = (QUICK_BATCH, QUICK_LR) if args.quick else (GRID_BATCH, GRID_LR)
    seeds = (0,) if args.quick else tuple(range(args.seeds))
    top_k = 1 if args.quick else args.top_k
    grid = [(b, lr) for b in batches for lr in lrs]
    print(f"grid: B in {list(batches)} x lr in {list(lrs)} (momentum 0.9, weight decay 5e-4, constant lr), "
          f"seeds {list(seeds)}, top {top_k} re-run on every seed, {1 if args.quick else args.repeats} time(s) each "
          f"(a seed's time: its median run's); {os.cpu_count()} cores", flush=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        for name in args.tasks:
            results[name] = bench_task(name, TASKS[name], grid, seeds, top_k, Path(tmp), args.min_batch,
                                       tuple(args.contestants), 1 if args.quick else args.repeats)
    print(f"\nbench wall time {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        write_json_atomic(Path(args.json), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
