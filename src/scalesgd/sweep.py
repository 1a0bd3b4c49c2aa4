"""``scalesgd sweep``: a resumable grid of training runs over the global batch size, and its report.

Time to accuracy = (time per pass) × (passes to accuracy) (REFERENCES §2). A sweep measures both factors
and their product against the global batch size B — optionally also against the worker count P, the
data replication r (which lowers gradient diversity, REFERENCES §5), the learning rate and the seed — and
marks the measured diversity bound B_S = n·Δ_S on the curves.

A sweep is a TOML file with two tables (keys of ``[base]`` mirror ``scalesgd train``'s options)::

    [sweep]
    batch_sizes = [16, 32, 64, 128]   # the x axis
    seeds = [0, 1, 2]                 # mean ± std over these
    workers = [1]                     # one series per P
    lrs = [0.02, 0.05, 0.1]           # several: tuned per (B, P, r); one: used as given (or by lr_rule)
    replicates = [1]                  # one series per r
    target_metric = "test_accuracy"   # or "train_accuracy"
    target = 0.9
    evals_per_epoch = 4               # resolution of "passes to target" (unless base sets eval_every)
    tune = "first-seed"               # lr tuned on the first seed, or "all-seeds" (mean over all)
    bound = "online"                  # B_S marked on the plots: the runs' online estimate over the first
                                      # bound_epochs ("online") or until the target ("online-to-target"),
                                      # or "init" (exact, whole data set, initial weights)
    bound_epochs = 1.0

    [base]
    dataset = "digits"
    model = "mlp"
    epochs = 30                       # the budget, in passes, the same for every B

Every grid point (B, P, lr, seed, r) runs in ``OUT/runs/B{B}-P{P}-lr{lr}-s{seed}-r{r}``; a point whose
``summary.json`` exists is skipped, a partial one is deleted and re-run, so an interrupted sweep resumes
where it stopped. The report (``report.md`` and PNGs) reads only those run directories.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from scalesgd.config import FIELDS, RunConfig, config_from_mapping
from scalesgd.errors import ConfigError, DivergedError
from scalesgd.rundata import RunData

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

TARGET_METRICS = ("test_accuracy", "train_accuracy")
TUNE_MODES = ("first-seed", "all-seeds")
BOUND_MODES = ("online", "online-to-target", "init")
# RunConfig fields the grid owns: they may not be set in [base] (and are not base options on the CLI).
GRID_OWNED = {"global_batch_size": "batch_sizes", "seed": "seeds", "workers": "workers", "lr": "lrs",
              "replicate": "replicates", "run_dir": None}
STATUS_FILE = "sweep_status.json"  # written into a run directory whose run diverged


# ---------------------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: the base run configuration and the grid axes.

    ``base.global_batch_size``, ``lr``, ``seed``, ``workers`` and ``replicate`` are replaced at every grid
    point; ``base.epochs`` is the budget in passes, the same for every batch size.
    """

    base: RunConfig
    batch_sizes: tuple[int, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    workers: tuple[int, ...] = (1,)
    lrs: tuple[float, ...] = (0.05,)
    replicates: tuple[int, ...] = (1,)
    target_metric: str = "test_accuracy"
    target: float = 0.9
    evals_per_epoch: float = 4.0
    tune: str = "first-seed"
    bound: str = "online"
    bound_epochs: float = 1.0
    measure_init_bound: bool = False
    name: str = "sweep"

    def __post_init__(self) -> None:
        for option, values, minimum in (("batch_sizes", self.batch_sizes, 1), ("seeds", self.seeds, 0),
                                        ("workers", self.workers, 1), ("replicates", self.replicates, 1)):
            if not values:
                raise ConfigError(f"sweep {option} is empty; give at least one value, e.g. {option} = [1]")
            bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v < minimum]
            if bad:
                raise ConfigError(f"sweep {option} must be integers >= {minimum}, got {bad[0]!r}")
            if len(set(values)) != len(values):
                raise ConfigError(f"sweep {option} lists a value twice: {list(values)}")
        if not self.lrs or any(not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)
                               for v in self.lrs):
            raise ConfigError(f"sweep lrs must be positive numbers, got {list(self.lrs)}; e.g. lrs = [0.05, 0.1]")
        if len(set(self.lrs)) != len(self.lrs):
            raise ConfigError(f"sweep lrs lists a value twice: {list(self.lrs)}")
        too_small = [b for b in self.batch_sizes if b < max(self.workers)]
        if too_small:
            raise ConfigError(f"batch size {too_small[0]} is smaller than {max(self.workers)} workers: every "
                              "worker needs an example; drop it or the larger worker counts")
        _choice("target_metric", self.target_metric, TARGET_METRICS)
        _choice("tune", self.tune, TUNE_MODES)
        _choice("bound", self.bound, BOUND_MODES)
        if not (isinstance(self.target, (int, float)) and 0 < self.target <= 1):
            raise ConfigError(f"sweep target is an accuracy in (0, 1], got {self.target!r}; e.g. target = 0.9")
        if not self.evals_per_epoch > 0:
            raise ConfigError(f"sweep evals_per_epoch must be positive, got {self.evals_per_epoch}")
        if not self.bound_epochs > 0:
            raise ConfigError(f"sweep bound_epochs must be positive, got {self.bound_epochs}")
        if self.bound != "init" and self.base.diversity == "off":
            raise ConfigError(f"bound = \"{self.bound}\" reads the trainer's online B_S estimate, but [base] sets "
                              "diversity = \"off\"; set diversity = \"exact\" (or \"cheap\" with workers > 1) "
                              "or use bound = \"init\" (exact B_S at initialisation)")
        if self.base.steps is not None:
            raise ConfigError("a sweep's budget is epochs (passes over the data, the same for every batch size); "
                              "remove steps from [base] and set epochs")
        if self.base.batch_policy != "fixed":
            raise ConfigError(f"a sweep over the batch size needs batch_policy = \"fixed\", [base] sets "
                              f"{self.base.batch_policy!r}")

    @property
    def tuned(self) -> bool:
        """Whether the lr is tuned per (B, P, r) over :attr:`lrs`."""
        return len(self.lrs) > 1

    @property
    def tune_seeds(self) -> tuple[int, ...]:
        return self.seeds if self.tune == "all-seeds" else self.seeds[:1]


def _choice(option: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"sweep {option}: unknown value {value!r}; choose one of {', '.join(choices)}")


SWEEP_KEYS = {f for f in SweepSpec.__dataclass_fields__ if f != "base"}
_LIST_KEYS = {"batch_sizes": int, "seeds": int, "workers": int, "lrs": float, "replicates": int}


def spec_from_mappings(sweep: dict[str, Any], base: dict[str, Any], *, source: str) -> SweepSpec:
    """Build a :class:`SweepSpec` from a ``[sweep]`` and a ``[base]`` mapping (keys may use ``-``).

    Raises :class:`ConfigError` naming ``source`` and the key when something is unknown or misplaced.
    """
    values: dict[str, Any] = {}
    for key, value in sweep.items():
        name = key.replace("-", "_")
        if name not in SWEEP_KEYS:
            hint = " (it is a run option: put it in [base])" if name in FIELDS else ""
            raise ConfigError(f"{source}: unknown [sweep] key {key!r}{hint}; known keys: "
                              f"{', '.join(sorted(SWEEP_KEYS))}")
        if name in _LIST_KEYS:
            typ = _LIST_KEYS[name]
            items = value if isinstance(value, (list, tuple)) else [value]
            try:
                value = tuple(typ(v) if typ is float else v for v in items)
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: [sweep] {key} must be a list of numbers, got {value!r}") from None
        values[name] = value
    base_values = config_from_mapping(base, source=f"{source} [base]")
    for name in base_values:
        if name in GRID_OWNED:
            axis = GRID_OWNED[name]
            fix = f"list it in [sweep] as {axis} = [...]" if axis else "the sweep sets it for every run"
            raise ConfigError(f"{source}: [base] sets {name!r}, which the sweep varies; {fix}")
    if "batch_sizes" not in values:
        raise ConfigError(f"{source}: no batch sizes; add batch_sizes = [16, 32, 64] to [sweep] "
                          "(or --batch-sizes 16,32,64)")
    target_accuracy = base_values.pop("target_accuracy", None)
    if "target" not in values:
        if target_accuracy is None:
            raise ConfigError(f"{source}: no target accuracy; add target = 0.9 to [sweep] (or --target 0.9)")
        values["target"] = target_accuracy
    base_values["progress"] = False  # one line per finished run instead of a bar per run
    try:
        cfg = RunConfig(**base_values)
        return SweepSpec(base=cfg, **values)
    except TypeError as e:  # a value of the wrong type reaches a comparison
        raise ConfigError(f"{source}: invalid value ({e})") from None


def read_spec_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``[sweep]`` and ``[base]`` tables of a sweep TOML file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"sweep spec {path} not found; pass the path of a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"sweep spec {path} is not valid TOML ({e}); fix the line it names") from None
    unknown = [k for k in doc if k not in ("sweep", "base")]
    if unknown:
        raise ConfigError(f"{path}: unknown table or key {unknown[0]!r}; a sweep spec has two tables, [sweep] "
                          "(grid axes and target) and [base] (run options)")
    for table in ("sweep", "base"):
        if not isinstance(doc.get(table, {}), dict):
            raise ConfigError(f"{path}: {table} must be a table, [{table}]")
    return dict(doc.get("sweep", {})), dict(doc.get("base", {}))


def load_spec(path: Path) -> SweepSpec:
    sweep, base = read_spec_file(path)
    return spec_from_mappings(sweep, base, source=str(path))


# ---------------------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True, order=True)
class Point:
    """One training run of the grid."""

    replicate: int
    workers: int
    global_batch_size: int
    lr: float
    seed: int

    @property
    def name(self) -> str:
        """The run directory's name: deterministic, so a second invocation finds it."""
        return f"B{self.global_batch_size}-P{self.workers}-lr{self.lr:g}-s{self.seed}-r{self.replicate:g}"


@dataclass(frozen=True)
class Group:
    """All runs at one (r, P, B): the lr-tuning runs, then every seed at the chosen lr."""

    replicate: int
    workers: int
    global_batch_size: int
    tuning: tuple[Point, ...]  # lrs × tuning seeds; empty when the lr is given
    seeds: tuple[int, ...]

    @property
    def series(self) -> tuple[int, int]:
        return (self.replicate, self.workers)

    def at(self, lr: float, seed: int) -> Point:
        return Point(self.replicate, self.workers, self.global_batch_size, lr, seed)


def plan(spec: SweepSpec) -> list[Group]:
    """The groups of the sweep in run order (r, then P, then B ascending)."""
    groups = []
    for r in sorted(spec.replicates):
        for p in sorted(spec.workers):
            for b in sorted(spec.batch_sizes):
                g = Group(r, p, b, (), spec.seeds)
                tuning = tuple(g.at(lr, s) for lr in spec.lrs for s in spec.tune_seeds) if spec.tuned else ()
                groups.append(Group(r, p, b, tuning, spec.seeds))
    return groups


def expand_grid(spec: SweepSpec) -> list[Point]:
    """Every point the sweep runs when the lr is given; with tuning, the tuning points plus the other seeds
    at the first lr as placeholders (the winner is known only after the tuning runs)."""
    points = []
    for g in plan(spec):
        points += list(g.tuning)
        lr = spec.lrs[0]
        points += [g.at(lr, s) for s in spec.seeds if not (spec.tuned and s in spec.tune_seeds)]
    return points


def runs_in_sweep(spec: SweepSpec) -> int:
    per_group = (len(spec.lrs) * len(spec.tune_seeds) + len(spec.seeds) - len(spec.tune_seeds)
                 if spec.tuned else len(spec.seeds))
    return per_group * len(spec.batch_sizes) * len(spec.workers) * len(spec.replicates)


def eval_every(spec: SweepSpec, global_batch_size: int, n_train: int) -> int:
    """Steps between evaluations: ``base.eval_every`` if set, else about ``evals_per_epoch`` per pass."""
    if spec.base.eval_every is not None:
        return spec.base.eval_every
    return max(1, int(round(n_train / (global_batch_size * spec.evals_per_epoch))))


def point_config(spec: SweepSpec, point: Point, *, n_train: int, run_root: Path) -> RunConfig:
    """The run configuration of ``point``; the trainer stops at the first evaluation that reaches the target
    (on test or train accuracy, as the spec says)."""
    return spec.base.replace(
        global_batch_size=point.global_batch_size, workers=point.workers, lr=point.lr, seed=point.seed,
        replicate=point.replicate, run_dir=str(run_root / point.name),
        target_accuracy=spec.target, target_metric=spec.target_metric,
        eval_every=eval_every(spec, point.global_batch_size, n_train), progress=False,
        extra={**spec.base.extra, "sweep": spec.name, "target_metric": spec.target_metric,
               "target": spec.target})


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
    lr_at_b: float = math.nan  # the lr the trainer used at this B (after warm-up, at the start of the schedule)
    message: str = ""


def crossing(evals: Sequence[dict[str, Any]], metric: str, target: float) -> tuple[float, float] | None:
    """(epoch, train_time_s) at which ``metric`` first reaches ``target``, or None.

    Linearly interpolated between the last evaluation below the target and the first at or above it (the
    first evaluation itself when it is already there), so the resolution is finer than the eval interval.
    """
    prev = None
    for rec in evals:
        value = rec.get(metric)
        if value is None:
            continue
        if value >= target:
            if prev is None or prev[metric] >= value:
                return float(rec["epoch"]), float(rec["train_time_s"])
            frac = (target - prev[metric]) / (value - prev[metric])
            return (prev["epoch"] + frac * (rec["epoch"] - prev["epoch"]),
                    prev["train_time_s"] + frac * (rec["train_time_s"] - prev["train_time_s"]))
        prev = rec
    return None


def measure(run: RunData, point: Point, spec: SweepSpec) -> Outcome:
    """The sweep's figures for one finished (or diverged) run directory."""
    evals = run.evals
    summary = run.summary
    hit = crossing(evals, spec.target_metric, spec.target)
    values = [e[spec.target_metric] for e in evals if e.get(spec.target_metric) is not None]
    until = hit[0] if hit else math.inf
    bounds = [(s["epoch"], s.get("batch_bound_est")) for s in run.steps]
    bounds = [(e, v) for e, v in bounds if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    after_warmup = [s for s in run.steps if s["epoch"] >= spec.base.warmup_epochs and s.get("lr") is not None]
    common = dict(best_metric=max(values) if values else math.nan,
                  lr_at_b=float(after_warmup[0]["lr"]) if after_warmup else math.nan,
                  bound_first=tuple(v for e, v in bounds if e <= spec.bound_epochs),
                  bound_to_target=tuple(v for e, v in bounds if e <= until))
    if summary is None:
        return Outcome(point, "diverged", message=_read_status(run.path), **common)
    epochs, train_s = float(summary["epochs"]), float(summary["train_time_s"])
    return Outcome(point, "done", reached=hit is not None, passes_to_target=hit[0] if hit else math.nan,
                   time_to_target_s=hit[1] if hit else math.nan,
                   time_per_pass_s=train_s / epochs if epochs > 0 else math.nan, epochs=epochs,
                   train_time_s=train_s, final_test_accuracy=_num(summary.get("final_test_accuracy")), **common)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _read_status(path: Path) -> str:
    try:
        return json.loads((path / STATUS_FILE).read_text()).get("message", "")
    except (FileNotFoundError, json.JSONDecodeError):
        return ""


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
    chosen_lr: dict[tuple[int, int, int], float] = field(default_factory=dict)  # (r, P, B) -> lr
    tuning_notes: dict[tuple[int, int, int], str] = field(default_factory=dict)
    init_bounds: dict[tuple[int, int], float] = field(default_factory=dict)  # (r, seed) -> exact B_S at init
    n_train: int | None = None

    def final(self, g: Group) -> list[Outcome]:
        """The runs of ``g`` at its chosen lr, one per seed (missing ones as status "missing")."""
        lr = self.chosen_lr.get((g.replicate, g.workers, g.global_batch_size))
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
            _check_same_config(run_dir, cfg, ignore_target=not self.train_missing)
            outcome = measure(RunData.open(run_dir), point, self.spec)
            self.log(f"{tag}: finished earlier, skipped — {describe(outcome, self.spec)}")
            return outcome
        if not self.train_missing:
            return Outcome(point, "missing")
        if run_dir.exists():
            self.log(f"{tag}: partial run directory (no summary.json), re-running it")
            shutil.rmtree(run_dir)
        from scalesgd.config import check_against_data
        from scalesgd.run import train
        from scalesgd.writer import write_json_atomic

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
        from scalesgd.writer import write_json_atomic

        path = self.out / "bounds" / f"init-r{r:g}-s{seed}.json"
        if path.exists():
            return float(json.loads(path.read_text())["batch_bound"])
        if not self.train_missing:
            return math.nan
        import torch

        from scalesgd.diversity import measure_exact_diversity
        from scalesgd.models import build_model, loss_function

        ds = self.data(r)
        base = self.spec.base
        if base.threads_per_worker:
            torch.set_num_threads(base.threads_per_worker)
        model = build_model(base.model, input_shape=ds.input_shape, num_outputs=ds.num_outputs, seed=seed,
                            width=base.width, depth=base.depth, dropout=base.dropout, norm=base.norm)
        model.train()
        stats = measure_exact_diversity(model, loss_function(ds.task, "none"), ds.x_train, ds.y_train)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"replicate": r, "seed": seed, **stats})
        self.log(f"exact B_S at init, r={r:g} seed={seed}: {stats['batch_bound']:.1f}")
        return float(stats["batch_bound"])


def _check_same_config(run_dir: Path, cfg: RunConfig, *, ignore_target: bool = False) -> None:
    """Refuse to reuse a run directory written under different options (the spec changed)."""
    try:
        old = json.loads((run_dir / "config.json").read_text())
    except FileNotFoundError:
        return
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


def run_sweep(spec: SweepSpec, out: Path, *, report_dir: Path | None = None, train_missing: bool = True,
              log: Callable[[str], None] = print) -> tuple[SweepResult, Path]:
    """Run (or resume) every point of ``spec`` under ``out/runs`` and write the report.

    Args:
        spec: the sweep.
        out: directory of the sweep; runs go to ``out/runs/<point name>``.
        report_dir: where report.md and the figures go (default: ``out``).
        train_missing: False only reads what is there and reports it (``--report-only``).
        log: where the one-line progress messages go.
    Returns:
        (the :class:`SweepResult`, the path of report.md).
    """
    out = Path(out)
    runner = _Runner(spec, out, log, train_missing)
    groups = plan(spec)
    result = SweepResult(spec, groups)
    lr_how = (f"tuned per (B, P, r) over {', '.join(f'{v:g}' for v in spec.lrs)} on "
              f"{'seed ' + str(spec.seeds[0]) if spec.tune == 'first-seed' else 'all seeds'}" if spec.tuned
              else f"{spec.lrs[0]:g}")
    log(f"sweep {spec.name}: {runs_in_sweep(spec)} runs in {out / 'runs'}; lr {lr_how}, lr rule "
        f"{spec.base.lr_rule}; target {spec.target_metric} {spec.target:g} within {spec.base.epochs:g} passes")
    for g in groups:
        key = (g.replicate, g.workers, g.global_batch_size)
        if spec.tuned:
            by_lr: dict[float, list[Outcome]] = {}
            for p in g.tuning:
                result.outcomes[p] = runner.ensure(p)
                by_lr.setdefault(p.lr, []).append(result.outcomes[p])
            if any(o.status == "missing" for os_ in by_lr.values() for o in os_):
                continue  # report-only on an unfinished sweep: no winner yet
            lr, note = choose_lr(by_lr)
            result.tuning_notes[key] = note
            log(f"B={g.global_batch_size} P={g.workers} r={g.replicate:g}: lr {lr:g} won ({note})")
        else:
            lr = spec.lrs[0]
        result.chosen_lr[key] = lr
        for s in g.seeds:
            p = g.at(lr, s)
            if p not in result.outcomes:
                result.outcomes[p] = runner.ensure(p)
    if spec.bound == "init" or spec.measure_init_bound:
        for r in sorted(spec.replicates):
            for s in spec.seeds:
                result.init_bounds[(r, s)] = runner.init_bound(r, s)
    result.n_train = runner.data(sorted(spec.replicates)[0]).n_train
    path = write_report(result, Path(report_dir) if report_dir else out)
    log(f"report: {path}")
    return result, path


# ---------------------------------------------------------------------------------------------------------
# Aggregation and report


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value; NaN for none)."""
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0


@dataclass(frozen=True)
class Row:
    """One (r, P, B) at its chosen lr, aggregated over seeds."""

    group: Group
    lr: float
    outcomes: tuple[Outcome, ...]

    @property
    def done(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "done"]

    @property
    def reached(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.reached]

    @property
    def all_reached(self) -> bool:
        return len(self.reached) == len(self.outcomes) and bool(self.outcomes)

    def stat(self, name: str) -> tuple[float, float]:
        pool = self.done if name == "time_per_pass_s" else self.reached
        return _mean_std([getattr(o, name) for o in pool])

    def lower_bound(self, name: str) -> float:
        """Where some seed missed: the mean over seeds with the budget (passes or time trained) for the missed
        ones, a lower bound of the true mean; NaN when every seed reached the target."""
        if self.all_reached or not self.done:
            return math.nan
        full = "epochs" if name == "passes_to_target" else "train_time_s"
        return statistics.fmean(getattr(o, name) if o.reached else getattr(o, full) for o in self.done)


def rows_by_series(result: SweepResult) -> dict[tuple[int, int], list[Row]]:
    """Rows per (r, P) series, by ascending B; groups without a chosen lr (unfinished tuning) are left out."""
    series: dict[tuple[int, int], list[Row]] = {}
    for g in result.groups:
        lr = result.chosen_lr.get((g.replicate, g.workers, g.global_batch_size))
        if lr is None:
            continue
        series.setdefault(g.series, []).append(Row(g, lr, tuple(result.final(g))))
    return series


@dataclass(frozen=True)
class SeriesBound:
    """The measured B_S of a series: online (median and quartiles of the estimates pooled over the smallest
    batch's seeds, first ``bound_epochs``; and the median until the target) and exact at initialisation."""

    online: tuple[float, float, float]  # median, 25th, 75th percentile
    online_to_target: tuple[float, float, float]
    init: tuple[float, float]  # mean, std over seeds

    def marked(self, mode: str) -> tuple[float, float, float] | None:
        """(B_S, low, high) of the bound ``mode`` marks on the figures, or None when it was not measured."""
        if mode in ("online", "online-to-target"):
            values = self.online if mode == "online" else self.online_to_target
            return values if math.isfinite(values[0]) else None
        if math.isfinite(self.init[0]):
            return (self.init[0], self.init[0] - self.init[1], self.init[0] + self.init[1])
        return None


def series_bound(result: SweepResult, rows: Sequence[Row]) -> SeriesBound:
    first = [v for o in rows[0].outcomes for v in o.bound_first]
    to_target = [v for o in rows[0].outcomes for v in o.bound_to_target]
    r = rows[0].group.replicate
    init = _mean_std([result.init_bounds.get((r, s), math.nan) for s in result.spec.seeds])
    return SeriesBound(_quartiles(first), _quartiles(to_target), init)


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if not values:
        return (math.nan,) * 3
    median, low, high = np.percentile(values, [50, 25, 75])
    return float(median), float(low), float(high)


def passes_ratio(small: Row, large: Row) -> tuple[float, float, bool]:
    """passes(largest B) / passes(smallest B), mean ± std over seeds paired by seed; the flag says a seed
    missed at the largest B and its ratio used the budget (so the mean is a lower bound)."""
    by_seed = {o.point.seed: o for o in small.outcomes if o.reached}
    ratios, lower = [], False
    for o in large.done:
        if o.point.seed not in by_seed:
            continue
        if o.reached:
            ratios.append(o.passes_to_target / by_seed[o.point.seed].passes_to_target)
        else:
            ratios.append(o.epochs / by_seed[o.point.seed].passes_to_target)
            lower = True
    mean, std = _mean_std(ratios)
    return mean, std, lower


def _iqr(q: tuple[float, float, float]) -> str:
    return f"{q[0]:.1f} [{q[1]:.1f}, {q[2]:.1f}]" if math.isfinite(q[0]) else "—"


def _pm(ms: tuple[float, float], spec: str | None = None) -> str:
    """``mean ± std``; by default the mean to 3 significant digits and the std to the same decimals."""
    mean, std = ms
    if not math.isfinite(mean):
        return "—"
    if spec is None:
        decimals = max(0, 2 - math.floor(math.log10(abs(mean)))) if mean else 3
        spec = f".{decimals}f"
    return f"{mean:{spec}} ± {std:{spec}}"


def _series_label(spec: SweepSpec, key: tuple[int, int]) -> str:
    r, p = key
    parts = []
    if len(spec.replicates) > 1 or r != 1:
        parts.append(f"r={r:g}")
    if len(spec.workers) > 1 or p != 1:
        parts.append(f"P={p}")
    return ", ".join(parts) or "B sweep"


def _curves(spec: SweepSpec, series: dict[tuple[int, int], list[Row]], bounds: dict, name: str):
    from scalesgd.sweep_plots import Curve

    curves = []
    for key, rows in series.items():
        stats = [row.stat(name) for row in rows]
        missed = tuple(row.lower_bound(name) for row in rows) if name != "time_per_pass_s" else ()
        curves.append(Curve(label=_series_label(spec, key), batch_sizes=tuple(r.group.global_batch_size for r in rows),
                            mean=tuple(m for m, _ in stats), std=tuple(s for _, s in stats), missed=missed,
                            bound=bounds[key].marked(spec.bound)))
    return curves


def write_report(result: SweepResult, out_dir: Path) -> Path:
    """Write ``report.md`` with the three time-to-accuracy figures (and the ratio against r when the sweep
    replicates data) into ``out_dir``; returns its path. Written via a temporary name."""
    from scalesgd import sweep_plots

    spec = result.spec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = rows_by_series(result)
    bounds = {key: series_bound(result, rows) for key, rows in series.items()}
    target = f"{spec.target_metric.replace('_', ' ')} {spec.target:g}"
    lines = [f"# Sweep `{spec.name}`: time to accuracy against the batch size", ""]
    lines += _method_lines(result)
    if not series:
        lines += ["No finished runs yet.", ""]
    else:
        sweep_plots.time_per_pass(_curves(spec, series, bounds, "time_per_pass_s"), out_dir / "time_per_pass.png")
        sweep_plots.passes_to_target(_curves(spec, series, bounds, "passes_to_target"),
                                     out_dir / "passes_to_target.png", target=target)
        sweep_plots.time_to_target(_curves(spec, series, bounds, "time_to_target_s"),
                                   out_dir / "time_to_target.png", target=target)
        lines += ["## Time to accuracy = time per pass × passes", "",
                  "![(a) time per pass](time_per_pass.png) ![(b) passes to the target](passes_to_target.png)",
                  "", "![(c) time to the target](time_to_target.png)", ""]
        lines += _bound_lines(result, series, bounds, out_dir)
        for key, rows in series.items():
            lines += _table_lines(result, key, rows)
    final = {o.point for g in result.groups for o in result.final(g)}
    missed = sorted((o for o in result.outcomes.values() if o.status in ("done", "diverged") and not o.reached),
                    key=lambda o: o.point)
    if missed:
        lines += ["## Runs that missed the target", ""]
        in_tables = [o for o in missed if o.point in final]
        tuning = [o for o in missed if o.point not in final]
        if in_tables:
            lines += ["At the chosen lr (counted in the tables as *k/N reached*; the figures draw a hollow "
                      "triangle at the budget):", ""]
            lines += [f"- `{o.point.name}`: {describe(o, spec)}" for o in in_tables] + [""]
        if tuning:
            lines += ["lr-tuning runs at a learning rate that lost (not in the tables):", ""]
            lines += [f"- `{o.point.name}`: {describe(o, spec)}" for o in tuning] + [""]
    not_run = [o for o in result.outcomes.values() if o.status == "missing"]
    if not_run:
        lines += [f"{len(not_run)} point(s) have not run yet (`--report-only` on an unfinished sweep).", ""]
    path = out_dir / "report.md"
    tmp = out_dir / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


def _method_lines(result: SweepResult) -> list[str]:
    spec, base = result.spec, result.spec.base
    seeds = ", ".join(map(str, spec.seeds))
    if spec.tuned:
        on = f"seed {spec.seeds[0]}" if spec.tune == "first-seed" else "all seeds"
        lr = (f"constant per run, **tuned** per (B, P, r) over {{{', '.join(f'{v:g}' for v in spec.lrs)}}}: the lr "
              f"with the fewest mean passes to the target on {on} wins (fewer seeds missing the target first, "
              "ties by time); the other seeds then run at the winner")
    else:
        lr = f"**{spec.lrs[0]:g}**, not tuned"
    if base.lr_rule != "constant":
        lr += (f"; the trainer's **{base.lr_rule}** rule scales it with B from B0 = "
               f"{base.base_batch_size or 'each run' + chr(39) + 's own B'}")
    lr += f"; base schedule {base.lr_schedule}"
    evals = (f"every {base.eval_every} steps" if base.eval_every is not None
             else f"about {spec.evals_per_epoch:g} per pass (eval_every = round(n / (B · {spec.evals_per_epoch:g})))")
    window = (f"the first {spec.bound_epochs:g} epoch(s)" if spec.bound == "online"
              else "the start until the target (the whole path to the same accuracy)")
    bound = (f"online: median of the trainer's `batch_bound_est` (EMA of ‖G‖² and tr Σ, --diversity "
             f"{base.diversity}) over the steps from {window} of the smallest batch's runs, pooled over seeds; "
             "the band is the interquartile range" if spec.bound != "init" else
             "exact B_S = n·Δ_S over the whole training set at the initial weights (mean ± std over seeds; band ± std)")
    rows = [
        f"- data set `{base.dataset}`" + (f" (n_train {result.n_train})" if result.n_train else "") +
        f", model `{base.model}`, momentum {base.momentum:g}, weight decay {base.weight_decay:g}; budget "
        f"{base.epochs:g} passes per run; seeds {seeds} (mean ± sample std over seeds).",
        f"- learning rate: {lr}.",
        f"- target: **{spec.target_metric} ≥ {spec.target:g}**" +
        (" (the trainer stops there)." if spec.target_metric == "test_accuracy" else
         f" (measured on {min(base.eval_train_examples, result.n_train or base.eval_train_examples)} training "
         "examples at each evaluation; the trainer stops there)."),
        f"- passes to target: epoch at which the metric first reaches the target, linearly interpolated between "
        f"the evaluation below and the first at or above it; evaluations {evals}.",
        "- time per pass = training time / passes trained (evaluation excluded; includes the diversity tap "
        f"--diversity {base.diversity}); time to target = training time at the target, interpolated the same way.",
        f"- B_S marked on (b) and (c): {bound}.",
        "",
    ]
    return rows


def _bound_lines(result, series, bounds, out_dir: Path) -> list[str]:
    from scalesgd import sweep_plots

    spec = result.spec
    b_small, b_large = min(spec.batch_sizes), max(spec.batch_sizes)
    lines = ["## Diversity bound and the passes ratio", "",
             f"| series | B_S online, first {spec.bound_epochs:g} epoch(s) [IQR] | B_S online, until the target [IQR] | "
             f"B_S exact at init | passes(B={b_large}) / passes(B={b_small}) |", "|---|---|---|---|---|"]
    ratio_r, ratio_m, ratio_s, ratio_lb = [], [], [], []
    bound_r: dict[str, list[float]] = {}
    for key, rows in series.items():
        sb = bounds[key]
        small = next((r for r in rows if r.group.global_batch_size == b_small), None)
        large = next((r for r in rows if r.group.global_batch_size == b_large), None)
        mean = std = math.nan
        lower = False
        if small is not None and large is not None:
            mean, std, lower = passes_ratio(small, large)
        online, to_target = _iqr(sb.online), _iqr(sb.online_to_target)
        ratio = ("≥ " if lower else "") + _pm((mean, std), ".2f")
        lines.append(f"| {_series_label(spec, key)} | {online} | {to_target} | {_pm(sb.init, '.1f')} | {ratio} |")
        if key[1] == min(spec.workers):
            ratio_r.append(key[0])
            ratio_m.append(mean)
            ratio_s.append(std)
            ratio_lb.append(lower)
            for mode, label in (("online-to-target", f"online, until the target (B={b_small})"),
                                ("online", f"online, first {spec.bound_epochs:g} epoch(s) (B={b_small})"),
                                ("init", "exact, at initialisation")):
                marked = sb.marked(mode)
                bound_r.setdefault(label + (" — marked" if mode == spec.bound else ""), []).append(
                    marked[0] if marked else math.nan)
    lines += ["", "The ratio is taken per seed (same seed at both batch sizes) and then averaged; ≥ means some "
              "seed missed the target at the largest batch and its ratio used the budget.", ""]
    if len(ratio_r) > 1:
        measured = {label: values for label, values in bound_r.items()
                    if any(math.isfinite(v) for v in values)}
        sweep_plots.ratio_vs_replicate(ratio_r, ratio_m, ratio_s, measured, out_dir / "ratio_vs_replicate.png",
                                       b_small=b_small, b_large=b_large, lower_bound=ratio_lb)
        lines += ["![passes ratio and B_S against r](ratio_vs_replicate.png)", ""]
    return lines


def _table_lines(result: SweepResult, key: tuple[int, int], rows: Sequence[Row]) -> list[str]:
    spec = result.spec
    lines = [f"## {_series_label(spec, key)}", "",
             f"| B | {'lr' if spec.base.lr_rule == 'constant' else 'lr0 (lr at B)'} | reached | time per pass (s) | passes to target | time to target (s) | step speedup "
             "(ideal B/B_min) | time speedup | final test acc |", "|---|---|---|---|---|---|---|---|---|"]
    small = rows[0]
    p0, t0 = small.stat("passes_to_target")[0], small.stat("time_to_target_s")[0]
    for row in rows:
        b = row.group.global_batch_size
        passes, secs = row.stat("passes_to_target"), row.stat("time_to_target_s")
        ideal = b / small.group.global_batch_size
        step_speedup = ideal * p0 / passes[0] if small.all_reached and row.all_reached else math.nan
        time_speedup = t0 / secs[0] if small.all_reached and row.all_reached else math.nan
        mark = "" if row.all_reached else " †"
        acc = _mean_std([o.final_test_accuracy for o in row.done])
        lr = f"{row.lr:g}"
        if spec.base.lr_rule != "constant":
            lr_b = statistics.fmean(o.lr_at_b for o in row.done) if row.done else math.nan
            lr += f" ({lr_b:.3g})"
        lines.append(
            f"| {b} | {lr} | {len(row.reached)}/{len(row.outcomes)} | {_pm(row.stat('time_per_pass_s'))} | "
            f"{_pm(passes)}{mark} | {_pm(secs)}{mark} | "
            f"{(f'{step_speedup:.2f} ({ideal:g})' if math.isfinite(step_speedup) else f'— ({ideal:g})')} | "
            f"{(f'{time_speedup:.2f}' if math.isfinite(time_speedup) else '—')} | {_pm(acc, '.4f')} |")
    lines += ["", "† mean over the seeds that reached the target only; speedups are given only where every seed "
              "reached it. Step speedup = (B/B_min) · passes(B_min)/passes(B) (iterations saved; B/B_min is "
              "linear speedup); time speedup = time to target at B_min / at B.", ""]
    if spec.tuned:
        lines += ["lr tuning (mean passes to target of the tuning runs):", ""]
        for row in rows:
            g = row.group
            note = result.tuning_notes.get((g.replicate, g.workers, g.global_batch_size), "")
            lines.append(f"- B={g.global_batch_size}: **{row.lr:g}** won — {note}")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


_SWEEP_OPTIONS: list[tuple[str, Any, str]] = [
    ("batch-sizes", _int_list, "global batch sizes, e.g. 16,32,64,128"),
    ("seeds", _int_list, "seeds; results are mean ± std over them (default 0,1,2)"),
    ("workers", _int_list, "worker counts, one series each (default 1)"),
    ("lrs", _float_list, "learning rates; several are tuned per (B, P, r), one is used as given (default: "
                         "the train default 0.05)"),
    ("replicates", _int_list, "data replication factors r, one series each (default 1)"),
    ("target-metric", str, "test_accuracy (the trainer stops there) or train_accuracy (read afterwards)"),
    ("target", float, "the target accuracy, a fraction, e.g. 0.9"),
    ("evals-per-epoch", float, "evaluations per pass, the resolution of passes to target (default 4)"),
    ("tune", str, "lr tuning on the first seed (first-seed, default) or the mean over all-seeds"),
    ("bound", str, "B_S marked on the plots: online (median of the runs' estimate over the first "
                   "--bound-epochs at the smallest B, default), online-to-target (the same from the start to "
                   "the target) or init (exact at initialisation)"),
    ("bound-epochs", float, "epochs over which the online B_S estimate is taken (default 1)"),
    ("name", str, "the sweep's name in the report"),
]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sweep`` on the CLI's subparsers."""
    from scalesgd.cli import TRAIN_OPTIONS

    p = subparsers.add_parser(
        "sweep", help="run a resumable grid over the batch size (and P, lr, seed, r) and report time to accuracy",
        description="Run every point of a grid over the global batch size (optionally worker counts, learning "
                    "rates, seeds and data replication) into OUT/runs/<point>, skipping finished points, then "
                    "write OUT/report.md with time per pass, passes to the target and time to the target "
                    "against B (mean ± std over seeds) and the measured diversity bound B_S. The grid comes "
                    "from a TOML spec ([sweep] axes and target, [base] run options) and/or the options below; "
                    "the command line wins.")
    p.add_argument("spec", nargs="?", metavar="SPEC.toml", help="sweep spec ([sweep] and [base] tables)")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory (runs in DIR/runs)")
    p.add_argument("--report-dir", metavar="DIR", help="where report.md and the figures go (default: --out)")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the runs already there")
    p.add_argument("--measure-init-bound", action="store_true", default=argparse.SUPPRESS,
                   help="also measure the exact B_S at initialisation for every (r, seed)")
    choices = {"target-metric": TARGET_METRICS, "tune": TUNE_MODES, "bound": BOUND_MODES}
    for option, typ, help_text in _SWEEP_OPTIONS:
        p.add_argument(f"--{option}", type=typ, default=argparse.SUPPRESS, help=help_text,
                       choices=choices.get(option))
    base = p.add_argument_group("run options (the [base] of every run)")
    for option, typ, help_text in TRAIN_OPTIONS:
        name = option.replace("-", "_")
        if name in GRID_OWNED or name in ("target_accuracy", "target_metric", "steps"):
            continue
        base.add_argument(f"--{option}", type=typ, default=argparse.SUPPRESS, dest=f"base_{name}",
                          metavar=name.upper(), help=help_text)
    base.add_argument("--nesterov", action="store_true", default=argparse.SUPPRESS, dest="base_nesterov")
    p.set_defaults(func=cmd_sweep)
    return p


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """TOML spec < command line → a validated :class:`SweepSpec`."""
    sweep, base = read_spec_file(Path(args.spec)) if args.spec else ({}, {})
    given = vars(args)
    for option, _, _ in _SWEEP_OPTIONS:
        name = option.replace("-", "_")
        if name in given:
            sweep[name] = given[name]
    if given.get("measure_init_bound"):
        sweep["measure_init_bound"] = True
    for key, value in given.items():
        if key.startswith("base_"):
            base[key[len("base_"):]] = value
    base = {k.replace("-", "_"): v for k, v in base.items()}
    return spec_from_mappings(sweep, base, source=args.spec or "the command line")


def cmd_sweep(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    run_sweep(spec, Path(args.out), report_dir=Path(args.report_dir) if args.report_dir else None,
              train_missing=not args.report_only, log=lambda line: print(line, flush=True))
    return 0


__all__ = ["SweepSpec", "Point", "Group", "Outcome", "SweepResult", "plan", "expand_grid", "point_config",
           "crossing", "measure", "choose_lr", "run_sweep", "write_report", "load_spec", "spec_from_mappings",
           "add_parser"]
