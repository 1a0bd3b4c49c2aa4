"""The sweep spec: :class:`SweepSpec` (validated), its TOML form, and the grid of runs it expands to.

A sweep is a TOML file with two tables, ``[sweep]`` (grid axes and target) and ``[base]`` (run options,
keys as ``scalesgd train``'s); see :mod:`scalesgd.sweep` for the format.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from scalesgd.config import FIELDS, RunConfig, config_from_mapping, load_toml
from scalesgd.errors import ConfigError

TARGET_METRICS = ("test_accuracy", "train_accuracy")
TUNE_MODES = ("first-seed", "all-seeds")
BOUND_MODES = ("online", "online-to-target", "init")
# RunConfig fields the grid owns: they may not be set in [base] (and are not base options on the CLI).
GRID_OWNED = {"global_batch_size": "batch_sizes", "seed": "seeds", "workers": "workers", "lr": "lrs",
              "replicate": "replicates", "run_dir": None}
STATUS_FILE = "sweep_status.json"  # written into a run directory whose run diverged
# A variant changes how a run trains, not what it trains on: the sweep loads the data once per r.
DATA_FIELDS = ("dataset", "n_train", "dim", "noise", "data_seed", "loader_workers")
# Fields the sweep sets itself from [sweep] (target) and that make no sense per variant.
SWEEP_OWNED = ("target_accuracy", "target_metric", "steps", "batch_policy", "eval_every")
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,39}")  # part of a run directory's name


@dataclass(frozen=True)
class Variant:
    """One named series of the sweep: ``[base]`` with some run options changed (e.g. ``lr_rule = "sqrt"``).

    Attributes:
        name: the series' label and the prefix of its run directories' names.
        overrides: the changed options, as (field, value) pairs in the order given.
        base: ``[base]`` with the overrides applied (validated).
    """

    name: str
    overrides: tuple[tuple[str, Any], ...]
    base: RunConfig

    def describe(self) -> str:
        """``name`` (key = value, ...), for the report."""
        return f"`{self.name}` ({', '.join(f'{k} = {v!r}' for k, v in self.overrides) or 'as [base]'})"


# ---------------------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: the base run configuration and the grid axes.

    ``base.global_batch_size``, ``lr``, ``seed``, ``workers`` and ``replicate`` are replaced at every grid
    point; ``base.epochs`` is the budget in passes, the same for every batch size.

    ``variants`` (optional) are named series, each ``[base]`` with some options changed (an lr rule, a
    warm-up, dropout); without them the sweep has the one series of ``[base]``. ``tune_batch`` (optional)
    tunes the lr once per (r, P), at that batch size on ``[base]``, and runs every batch size and variant at
    the winner (the protocol of a learning-rate rule: one base lr tuned at the base batch); without it the lr
    is tuned per (B, P, r, variant). ``stop_at_target = false`` runs every point for the whole budget (the
    final accuracy is then the budget's; passes to target are still read from the evaluations).
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
    variants: tuple[Variant, ...] = ()
    tune_batch: int | None = None
    stop_at_target: bool = True
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
        if self.base.steps is not None:
            raise ConfigError("a sweep's budget is epochs (passes over the data, the same for every batch size); "
                              "remove steps from [base] and set epochs")
        if self.base.batch_policy != "fixed":
            raise ConfigError(f"a sweep over the batch size needs batch_policy = \"fixed\", [base] sets "
                              f"{self.base.batch_policy!r}")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ConfigError(f"sweep variants lists a name twice: {names}")
        for where, cfg in self.series_configs():
            if self.bound != "init" and cfg.diversity == "off":
                raise ConfigError(f"bound = \"{self.bound}\" reads the trainer's online B_S estimate, but {where} "
                                  "sets diversity = \"off\"; set diversity = \"exact\" (or \"cheap\" with "
                                  "workers > 1) or use bound = \"init\" (exact B_S at initialisation)")
        if self.tune_batch is not None:
            if not isinstance(self.tune_batch, int) or isinstance(self.tune_batch, bool) or \
                    self.tune_batch not in self.batch_sizes:
                raise ConfigError(f"sweep tune_batch = {self.tune_batch} is not one of batch_sizes "
                                  f"{list(self.batch_sizes)}; add it there or drop tune_batch")
            if not self.tuned:
                raise ConfigError("sweep tune_batch tunes the lr over lrs, but lrs has one value; give several, "
                                  "e.g. lrs = [0.01, 0.03, 0.1], or drop tune_batch")
        if not isinstance(self.stop_at_target, bool):
            raise ConfigError(f"sweep stop_at_target must be true or false, got {self.stop_at_target!r}")

    @property
    def tuned(self) -> bool:
        """Whether the lr is tuned over :attr:`lrs` (per (B, P, r, variant), or at :attr:`tune_batch`)."""
        return len(self.lrs) > 1

    @property
    def variant_names(self) -> tuple[str, ...]:
        """The series' names; ``("",)`` (the series of ``[base]``) when there are no variants."""
        return tuple(v.name for v in self.variants) or ("",)

    def config_for(self, variant: str) -> RunConfig:
        """The run options of a variant's runs (``[base]`` for ``""``)."""
        if not variant:
            return self.base
        for v in self.variants:
            if v.name == variant:
                return v.base
        raise KeyError(f"sweep {self.name!r} has no variant {variant!r}")

    def series_configs(self) -> list[tuple[str, RunConfig]]:
        """(where, run options) of every series, ``where`` naming it in messages."""
        return [(f"variant {v.name!r}", v.base) for v in self.variants] or [("[base]", self.base)]

    @property
    def tune_seeds(self) -> tuple[int, ...]:
        return self.seeds if self.tune == "all-seeds" else self.seeds[:1]


def _choice(option: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"sweep {option}: unknown value {value!r}; choose one of {', '.join(choices)}")


SWEEP_KEYS = {f for f in SweepSpec.__dataclass_fields__ if f != "base"}
_LIST_KEYS = {"batch_sizes": int, "seeds": int, "workers": int, "lrs": float, "replicates": int}


def _variants(table: Any, base_values: dict[str, Any], *, source: str) -> tuple[Variant, ...]:
    """The ``[sweep.variants]`` table (name → table of run options) as validated :class:`Variant` s."""
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{source}: [sweep] variants must be a table of named option tables, e.g. "
                          "[sweep.variants] with sqrt = { lr_rule = \"sqrt\" } on the next line")
    variants = []
    for name, options in table.items():
        where = f"{source}: variant {name!r}"
        if not VARIANT_NAME.fullmatch(str(name)):
            raise ConfigError(f"{where}: a variant's name becomes part of run directories' names; use up to 40 "
                              "letters, digits and _ . + - (starting with a letter or digit), e.g. linear-warmup")
        if not isinstance(options, dict):
            raise ConfigError(f"{where} must be a table of run options, e.g. {{ lr_rule = \"sqrt\" }}")
        values = config_from_mapping(options, source=where)
        for key in values:
            if key in GRID_OWNED or key in SWEEP_OWNED:
                raise ConfigError(f"{where} sets {key!r}, which the sweep sets for every run; remove it from "
                                  "the variant")
            if key in DATA_FIELDS:
                raise ConfigError(f"{where} sets {key!r}: variants share one data set; put it in [base] (or run "
                                  "a second sweep)")
        try:
            cfg = RunConfig(**{**base_values, **values})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        variants.append(Variant(str(name), tuple(values.items()), cfg))
    return tuple(variants)


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
        if "variants" in values:
            values["variants"] = _variants(values["variants"], base_values, source=source)
        return SweepSpec(base=cfg, **values)
    except TypeError as e:  # a value of the wrong type reaches a comparison
        raise ConfigError(f"{source}: invalid value ({e})") from None


def read_spec_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``[sweep]`` and ``[base]`` tables of a sweep TOML file."""
    path = Path(path)
    doc = load_toml(path, what="sweep spec")
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
    variant: str = ""  # "": [base]

    @property
    def name(self) -> str:
        """The run directory's name: deterministic, so a second invocation finds it."""
        prefix = f"{self.variant}-" if self.variant else ""
        return f"{prefix}B{self.global_batch_size}-P{self.workers}-lr{self.lr:g}-s{self.seed}-r{self.replicate:g}"


@dataclass(frozen=True)
class Group:
    """All runs at one (r, P, B, variant): the lr-tuning runs, then every seed at the chosen lr.

    With ``tune_batch`` the tuning runs form a group of their own (on ``[base]``, no seeds of its own) and the
    other groups have none.
    """

    replicate: int
    workers: int
    global_batch_size: int
    tuning: tuple[Point, ...]  # lrs × tuning seeds; empty when the lr is given or tuned at tune_batch
    seeds: tuple[int, ...]
    variant: str = ""

    @property
    def series(self) -> tuple[int, int, str]:
        """(r, P, variant): one curve of the report."""
        return (self.replicate, self.workers, self.variant)

    @property
    def key(self) -> tuple[int, int, int, str]:
        """(r, P, B, variant): the key of its chosen lr."""
        return (self.replicate, self.workers, self.global_batch_size, self.variant)

    def at(self, lr: float, seed: int) -> Point:
        return Point(self.replicate, self.workers, self.global_batch_size, lr, seed, self.variant)


def plan(spec: SweepSpec) -> list[Group]:
    """The groups of the sweep in run order (r, then P, then the tune_batch group, then variant, then B
    ascending)."""
    groups = []
    for r in sorted(spec.replicates):
        for p in sorted(spec.workers):
            if spec.tune_batch is not None:
                b0 = spec.tune_batch
                groups.append(Group(r, p, b0, tuple(Point(r, p, b0, lr, s) for lr in spec.lrs
                                                    for s in spec.tune_seeds), ()))
            for v in spec.variant_names:
                for b in sorted(spec.batch_sizes):
                    g = Group(r, p, b, (), spec.seeds, v)
                    if spec.tuned and spec.tune_batch is None:
                        g = Group(r, p, b, tuple(g.at(lr, s) for lr in spec.lrs for s in spec.tune_seeds),
                                  spec.seeds, v)
                    groups.append(g)
    return groups


def tuning_group_key(spec: SweepSpec, g: Group) -> tuple[int, int, int, str]:
    """The key of the group whose tuning chooses ``g``'s lr: ``g`` itself, or the tune_batch group."""
    if spec.tune_batch is None:
        return g.key
    return (g.replicate, g.workers, spec.tune_batch, "")


def expand_grid(spec: SweepSpec) -> list[Point]:
    """Every point the sweep runs when the lr is given; with tuning, the tuning points plus the other seeds
    at the first lr as placeholders (the winner is known only after the tuning runs). A seed a tuning run
    already covers (same r, P, B, variant and seed) is not listed again."""
    groups = plan(spec)
    tuned = {p for g in groups for p in g.tuning}
    covered = {(p.replicate, p.workers, p.global_batch_size, p.variant, p.seed) for p in tuned}
    points = []
    for g in groups:
        points += list(g.tuning)
        points += [g.at(spec.lrs[0], s) for s in g.seeds if (*g.key, s) not in covered]
    return points


def runs_in_sweep(spec: SweepSpec) -> int:
    return len(expand_grid(spec))


def eval_every(spec: SweepSpec, global_batch_size: int, n_train: int) -> int:
    """Steps between evaluations: ``base.eval_every`` if set, else about ``evals_per_epoch`` per pass."""
    if spec.base.eval_every is not None:
        return spec.base.eval_every
    return max(1, int(round(n_train / (global_batch_size * spec.evals_per_epoch))))


def point_config(spec: SweepSpec, point: Point, *, n_train: int, run_root: Path) -> RunConfig:
    """The run configuration of ``point`` (its variant's options); the trainer stops at the first evaluation
    that reaches the target (on test or train accuracy, as the spec says) unless ``stop_at_target`` is off."""
    base = spec.config_for(point.variant)
    extra = {**base.extra, "sweep": spec.name, "target_metric": spec.target_metric, "target": spec.target}
    if point.variant:
        extra["variant"] = point.variant
    return base.replace(
        global_batch_size=point.global_batch_size, workers=point.workers, lr=point.lr, seed=point.seed,
        replicate=point.replicate, run_dir=str(run_root / point.name),
        target_accuracy=spec.target if spec.stop_at_target else None, target_metric=spec.target_metric,
        eval_every=eval_every(spec, point.global_batch_size, n_train), progress=False, extra=extra)
