"""Running a sweep: every grid point into its own run directory, resumable, and what each run measured.

A point whose ``summary.json`` (or :data:`STATUS_FILE`, for a diverged run) exists is skipped; a partial
one is deleted and re-run. The runs are read back through :class:`scalesgd.rundata.RunData` only.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from scalesgd.config import RunConfig
from scalesgd.errors import ConfigError, DataError, DivergedError
from scalesgd.rundata import RunData, passes_to_target
from scalesgd.sweep.spec import (STATUS_FILE, Group, Point, SweepSpec, plan, point_config, runs_in_sweep,
                                 tuning_group_key)
from scalesgd.writer import write_json_atomic

# ---------------------------------------------------------------------------------------------------------
# Reading a run


@dataclass(frozen=True)
class Outcome:
    """What a sweep needs from one run directory."""

    point: Point
    status: str  # "done", "diverged" or "missing"
    reached: bool = False
    passes_to_target: float = math.nan  # epochs at the target (interpolated between evaluations)
    time_to_target_s: float = math.nan  # training time (evaluation excluded) at the target, interpolated
    time_per_pass_s: float = math.nan  # train_time_s / epochs
    epochs: float = math.nan  # passes actually trained
    train_time_s: float = math.nan
    best_metric: float = math.nan  # highest value of the target metric over the evaluations
    final_test_accuracy: float = math.nan
    bound_first: tuple[float, ...] = ()  # online batch_bound_est of the steps in the first bound_epochs
    bound_to_target: tuple[float, ...] = ()  # the same up to the target (or the end)
    lr_at_b: float = math.nan  # the lr the trainer used at this B (after warm-up, at the start of the schedule;
    # under the adascale rule, whose gain follows the noise estimates, the median over the steps after warm-up)
    message: str = ""


def measure(run: RunData, point: Point, spec: SweepSpec) -> Outcome:
    """The sweep's figures for one finished (or diverged) run directory."""
    evals = run.evals
    summary = run.summary
    hit = passes_to_target(evals, spec.target_metric, spec.target, clocks=("train_time_s",))
    values = [e[spec.target_metric] for e in evals if e.get(spec.target_metric) is not None]
    until = hit.passes if hit else math.inf
    bounds = [(s["epoch"], s.get("batch_bound_est")) for s in run.steps]
    bounds = [(e, v) for e, v in bounds if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    cfg = spec.config_for(point.variant)
    after_warmup = [s for s in run.steps if s["epoch"] >= cfg.warmup_epochs and s.get("lr") is not None]
    if cfg.effective_lr_rule == "adascale":
        lr_at_b = float(statistics.median(s["lr"] for s in after_warmup)) if after_warmup else math.nan
    else:
        lr_at_b = float(after_warmup[0]["lr"]) if after_warmup else math.nan
    common = dict(best_metric=max(values) if values else math.nan,
                  lr_at_b=lr_at_b,
                  bound_first=tuple(v for e, v in bounds if e <= spec.bound_epochs),
                  bound_to_target=tuple(v for e, v in bounds if e <= until))
    if summary is None:
        return Outcome(point, "diverged", message=_read_status(run.path), **common)
    epochs, train_s = float(summary["epochs"]), float(summary["train_time_s"])
    return Outcome(point, "done", reached=hit is not None, passes_to_target=hit.passes if hit else math.nan,
                   time_to_target_s=hit.clocks["train_time_s"] if hit else math.nan,
                   time_per_pass_s=train_s / epochs if epochs > 0 else math.nan, epochs=epochs,
                   train_time_s=train_s, final_test_accuracy=_num(summary.get("final_test_accuracy")), **common)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _read_status(path: Path) -> str:
    """The message of a point's status file; "" when there is none or it is damaged (it only says why)."""
    try:
        status = json.loads((path / STATUS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return ""
    return str(status.get("message", "")) if isinstance(status, dict) else ""


# ---------------------------------------------------------------------------------------------------------
# Choosing the learning rate


def choose_lr(outcomes: dict[float, list[Outcome]]) -> tuple[float, str]:
    """The lr with the fewest mean passes to the target over its tuning runs, ties broken by time.

    An lr that missed the target on some tuning seed ranks behind every lr that missed on fewer; when no lr
    reached it at all, the one with the highest best metric wins. Returns (lr, one-line reason).
    """
    def key(lr: float):
        runs = outcomes[lr]
        reached = [o for o in runs if o.reached]
        missed = len(runs) - len(reached)
        passes = statistics.fmean(o.passes_to_target for o in reached) if reached else math.inf
        secs = statistics.fmean(o.time_to_target_s for o in reached) if reached else math.inf
        best = max((o.best_metric for o in runs if math.isfinite(o.best_metric)), default=-math.inf)
        return (missed, passes, secs, -best)

    ranked = sorted(outcomes, key=key)
    parts = []
    for lr in sorted(outcomes):
        missed, passes, secs, neg_best = key(lr)
        n = len(outcomes[lr])
        if missed == n:
            diverged = sum(o.status == "diverged" for o in outcomes[lr])
            parts.append(f"{lr:g}: " + ("diverged" if diverged == n else f"missed (best {-neg_best:.4f})"))
        else:
            parts.append(f"{lr:g}: {passes:.2f} passes" + (f" ({n - missed}/{n} reached)" if missed else ""))
    return ranked[0], "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Running


@dataclass
class SweepResult:
    """Outcomes of every run, the lr chosen per group and the exact B_S at init (if measured)."""

    spec: SweepSpec
    groups: list[Group]
    outcomes: dict[Point, Outcome] = field(default_factory=dict)
    chosen_lr: dict[tuple[int, int, int, str], float] = field(default_factory=dict)  # Group.key -> lr
    tuning_notes: dict[tuple[int, int, int, str], str] = field(default_factory=dict)  # Group.key -> note
    init_bounds: dict[tuple[int, int], float] = field(default_factory=dict)  # (r, seed) -> exact B_S at init
    n_train: int | None = None

    def final(self, g: Group) -> list[Outcome]:
        """The runs of ``g`` at its chosen lr, one per seed (missing ones as status "missing")."""
        lr = self.chosen_lr.get(g.key)
        if lr is None:
            return []
        return [self.outcomes.get(g.at(lr, s), Outcome(g.at(lr, s), "missing")) for s in g.seeds]


class _Runner:
    def __init__(self, spec: SweepSpec, out: Path, log: Callable[[str], None], train_missing: bool):
        self.spec, self.out, self.log, self.train_missing = spec, out, log, train_missing
        self.run_root = out / "runs"
        self.total = runs_in_sweep(spec)
        self.count = 0
        self._data: dict[int, Any] = {}

    def data(self, r: int):
        if r not in self._data:
            from scalesgd.data import load_data

            # One data set at a time: groups come ordered by r, and a replicated set is as large as the original.
            self._data = {r: load_data(self.spec.base.replace(replicate=r, global_batch_size=1, workers=1))}
        return self._data[r]

    def ensure(self, point: Point) -> Outcome:
        """Run ``point`` unless its directory holds a finished (or diverged) run; return its outcome."""
        self.count += 1
        tag = f"[{self.count}/{self.total}] {point.name}"
        run_dir = self.run_root / point.name
        ds = self.data(point.replicate)
        cfg = point_config(self.spec, point, n_train=ds.n_train, run_root=self.run_root)
        if (run_dir / "summary.json").exists() or (run_dir / STATUS_FILE).exists():
            # --report-only may re-read the runs against another target; runs stopped at their own target
            # then count as misses for a higher one.
            run = RunData.open(run_dir)
            _check_same_config(run, cfg, ignore_target=not self.train_missing)
            outcome = measure(run, point, self.spec)
            self.log(f"{tag}: finished earlier, skipped — {describe(outcome, self.spec)}")
            return outcome
        if not self.train_missing:
            return Outcome(point, "missing")
        if run_dir.exists():
            self.log(f"{tag}: partial run directory (no summary.json), re-running it")
            shutil.rmtree(run_dir)
        from scalesgd.config import check_against_data
        from scalesgd.run import train

        check_against_data(cfg, ds.n_train)
        t0 = time.perf_counter()
        try:
            train(cfg, ds)
        except DivergedError as e:
            write_json_atomic(run_dir / STATUS_FILE, {"status": "diverged", "message": str(e)})
        outcome = measure(RunData.open(run_dir), point, self.spec)
        self.log(f"{tag}: {describe(outcome, self.spec)}, wall {time.perf_counter() - t0:.1f} s")
        return outcome

    def init_bound(self, r: int, seed: int) -> float:
        """Exact B_S = n·Δ_S over the whole training set at the initial weights of (r, seed); cached."""
        path = self.out / "bounds" / f"init-r{r:g}-s{seed}.json"
        if path.exists():
            try:
                return float(json.loads(path.read_text(encoding="utf-8"))["batch_bound"])
            except (ValueError, KeyError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise DataError(f"{path} is damaged (no number under 'batch_bound'); delete it and the sweep "
                                "measures it again") from None
        if not self.train_missing:
            return math.nan
        import torch

        from scalesgd.diversity import measure_exact_diversity
        from scalesgd.user_code import build_run_model, loss_for

        ds = self.data(r)
        base = self.spec.base
        if base.threads_per_worker:
            torch.set_num_threads(base.threads_per_worker)
        # the base's own model and loss (a built-in name or an import string)
        model = build_run_model(base.replace(seed=seed), input_shape=ds.input_shape, num_outputs=ds.num_outputs)
        model.train()
        stats = measure_exact_diversity(model, loss_for(base.loss, ds.task, "none"), ds.x_train, ds.y_train,
                                        dataset=ds)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"replicate": r, "seed": seed, **stats})
        self.log(f"exact B_S at init, r={r:g} seed={seed}: {stats['batch_bound']:.1f}")
        return float(stats["batch_bound"])


def _check_same_config(run: RunData, cfg: RunConfig, *, ignore_target: bool = False) -> None:
    """Refuse to reuse a run directory written under different options (the spec changed)."""
    old, run_dir = run.config, run.path
    new = cfg.to_dict()
    skip = {"run_dir", "progress", "extra"} | ({"n_train"} if cfg.n_train is None else set())
    if ignore_target:
        skip |= {"target_accuracy", "target_metric"}
    for key, value in new.items():
        if key in skip or key not in old:
            continue
        if old[key] != value:
            raise ConfigError(f"{run_dir} was run with {key}={old[key]!r} but the sweep now asks for {value!r}; "
                              "point --out at a new directory, or delete that run directory to re-run it")


def describe(o: Outcome, spec: SweepSpec) -> str:
    """One line with the run's key figures."""
    if o.status == "diverged":
        return "diverged"
    if o.status == "missing":
        return "not run"
    figures = f"{o.time_per_pass_s:.3g} s/pass, final test acc {o.final_test_accuracy:.4f}"
    if o.reached:
        return (f"{spec.target_metric} {spec.target:g} after {o.passes_to_target:.2f} passes "
                f"({o.time_to_target_s:.2f} s training), {figures}")
    return f"missed {spec.target_metric} {spec.target:g} in {o.epochs:.1f} passes (best {o.best_metric:.4f}), {figures}"


def run_points(spec: SweepSpec, out: Path, *, train_missing: bool = True,
               log: Callable[[str], None] = print) -> SweepResult:
    """Run (or resume) every point of ``spec`` under ``out/runs``, tuning the lr per group where asked.

    Args:
        spec: the sweep.
        out: directory of the sweep; runs go to ``out/runs/<point name>``.
        train_missing: False only reads what is there (``--report-only``).
        log: where the one-line progress messages go.
    Returns:
        The :class:`SweepResult`: every outcome, the chosen lr per group and the exact B_S at init.
    """
    out = Path(out)
    runner = _Runner(spec, out, log, train_missing)
    groups = plan(spec)
    result = SweepResult(spec, groups)
    if not spec.tuned:
        lr_how = f"{spec.lrs[0]:g}"
    else:
        where = (f"once per (P, r) at B={spec.tune_batch} on [base]" if spec.tune_batch is not None
                 else "per (B, P, r" + (", variant)" if spec.variants else ")"))
        lr_how = (f"tuned {where} over {', '.join(f'{v:g}' for v in spec.lrs)} on "
                  f"{'seed ' + str(spec.seeds[0]) if spec.tune == 'first-seed' else 'all seeds'}")
    rules = ", ".join(f"{v.name}: {v.base.effective_lr_rule}" for v in spec.variants) or spec.base.effective_lr_rule
    log(f"sweep {spec.name}: {runs_in_sweep(spec)} runs in {out / 'runs'}; lr {lr_how}, lr rule "
        f"{rules}; target {spec.target_metric} {spec.target:g} within {spec.base.epochs:g} passes")
    for g in groups:
        if g.tuning:
            by_lr: dict[float, list[Outcome]] = {}
            for p in g.tuning:
                result.outcomes[p] = runner.ensure(p)
                by_lr.setdefault(p.lr, []).append(result.outcomes[p])
            if any(o.status == "missing" for os_ in by_lr.values() for o in os_):
                continue  # report-only on an unfinished sweep: no winner yet
            lr, note = choose_lr(by_lr)
            result.tuning_notes[g.key] = note
            label = f" {g.variant}" if g.variant else ""
            log(f"B={g.global_batch_size} P={g.workers} r={g.replicate:g}{label}: lr {lr:g} won ({note})")
        elif spec.tuned:  # tuned at tune_batch, in a group that came first
            lr = result.chosen_lr.get(tuning_group_key(spec, g))
            if lr is None:
                continue
        else:
            lr = spec.lrs[0]
        result.chosen_lr[g.key] = lr
        for s in g.seeds:
            p = g.at(lr, s)
            if p not in result.outcomes:
                result.outcomes[p] = runner.ensure(p)
    if spec.bound == "init" or spec.measure_init_bound:
        for r in sorted(spec.replicates):
            for s in spec.seeds:
                result.init_bounds[(r, s)] = runner.init_bound(r, s)
    result.n_train = runner.data(sorted(spec.replicates)[0]).n_train
    return result
