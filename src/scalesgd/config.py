"""Run configuration: one frozen dataclass that validates itself.

Errors say what was wrong and how to fix it. Checks that need the data set (batch larger than the data)
live in :func:`check_against_data`, called once the data set is loaded and before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalesgd.errors import ConfigError

from scalesgd.batch_policy import BATCH_POLICY_NAMES, parse_schedule
from scalesgd.comm_registry import COMM_CHOICES
from scalesgd.distributed import BACKENDS
from scalesgd.models import MODELS, NORMS
from scalesgd.lr_rules import BASE_SCHEDULES as LR_SCHEDULES
from scalesgd.lr_rules import LR_RULES
from scalesgd.stragglers import parse_straggler
from scalesgd.user_code import OBJECT_PREFIX, is_import_string

DIVERSITY_MODES = ("off", "cheap", "exact")
# sync: synchronous data-parallel SGD; async-ps: asynchronous SGD through a parameter server (stale gradients);
# hogwild: lock-free updates of one model in shared memory (scalesgd.async_sgd)
ALGORITHMS = ("sync", "async-ps", "hogwild")


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs. Field names are the command-line options with ``-`` → ``_``."""

    # data
    dataset: str = "mnist1d"
    n_train: int | None = None  # examples to generate for generated sets (mnist1d, synthetic-*)
    dim: int | None = None  # synthetic sets: input dimension (None: the data set's default)
    noise: float | None = None  # synthetic sets: label noise (None: the data set's default)
    replicate: int = 1  # keep n/r distinct training examples, refill to n (lowers diversity)
    data_seed: int | None = None  # generated sets and splits (None: the data set's default)
    loader_workers: int = 0  # DataLoader worker processes reading a map-style data set's examples (0: in-process)
    # model
    model: str = "cnn1d"
    width: int | None = None  # None: the model's default width
    depth: int = 2  # mlp hidden layers
    dropout: float = 0.0
    norm: str = "none"
    loss: str | None = None  # MODULE:FUNCTION giving per-example losses (B,); None: the task's built-in loss
    # optimisation
    global_batch_size: int = 128
    lr: float | str = 0.05  # learning rate of the mean loss, at the base batch size; "auto": a range test finds it
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # base schedule: constant, cosine or step
    lr_milestones: tuple[float, ...] = ()  # epochs at which `step` multiplies the lr by lr_gamma
    lr_gamma: float = 0.1
    lr_rule: str | None = None  # how the lr follows the batch: constant, linear, sqrt, adascale (None: effective_lr_rule)
    warmup_epochs: float = 0.0
    base_batch_size: int | None = None  # B₀ of the lr rule; None: the starting global batch size
    langevin_noise: float = 0.0  # σ: each step adds N(0, σ²·lr) per coordinate to the weights (SGLD-style)
    example_qsgd_levels: int = 0  # s > 0: each example's gradient QSGD-quantized (s levels) before the sum; 0: off
    # batch-size policy
    batch_policy: str = "fixed"
    batch_schedule: str = ""  # for `schedule`: "epoch:batch,epoch:batch", e.g. "0:64,5:256"
    delta: float = 0.5  # for `diversity`: batch = delta * B_S + 1
    min_batch: int | None = None
    max_batch: int | None = None
    # length
    epochs: float = 12.0
    steps: int | None = None  # if set, overrides epochs
    target_accuracy: float | None = None
    target_metric: str = "test_accuracy"  # which evaluation the target applies to: test_accuracy, train_accuracy
    # evaluation
    eval_every: int | None = None  # steps between evaluations; None: once per epoch
    eval_train_examples: int = 5000
    # diversity tracking
    diversity: str = "cheap"
    diversity_decay: float = 0.99
    exact_diversity_every: int = 0  # measure the exact whole-data diversity every k steps (0: never)
    # engine
    workers: int = 2
    backend: str = "auto"
    comm: str = "auto"  # auto: ring-tcp on CPU (gloo), allreduce on GPUs (comm_registry.resolve_comm)
    qsgd_levels: int = 7
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    threads_per_worker: int | None = None
    timeout_s: float = 600.0
    check_replicas_every: int = 0  # all-gather the parameters every k steps and check they are identical
    seed: int = 0
    # delayed nodes and local SGD
    straggler: str = ""  # injected delays, e.g. "rank1x1.5", "exp:mean=5ms" (scalesgd.stragglers); "": none
    sync_every: int | None = None  # local SGD: average the parameters every H steps; None: synchronous SGD
    sync_every_after: float = 0.0  # post-local SGD: synchronous for this many epochs, then every H steps
    backup_workers: int = 0  # b: each step uses the first P − b gradients to reach rank 0 (--comm ps)
    algorithm: str = "sync"  # sync, async-ps or hogwild (ALGORITHMS)
    # fault tolerance (none of these changes the maths: a resume may change them)
    checkpoint_every_steps: int = 0  # 0: by time only
    checkpoint_every_s: float = 300.0  # 0: by steps only; stretched so that saving costs <= 2% of the time
    keep_checkpoints: int = 2
    max_restarts: int = 0  # local launcher: restart the job from its last checkpoint after a worker dies
    # output
    run_dir: str | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # free-form tags recorded in config.json

    def __post_init__(self) -> None:
        _check_types(self)  # first: every check below may then compare and do arithmetic safely
        _positive_int("global-batch-size", self.global_batch_size)
        _positive_int("workers", self.workers)
        if self.global_batch_size < self.workers:
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is smaller than --workers "
                              f"{self.workers}: every worker needs at least one example; raise the batch "
                              f"to at least {self.workers} or use fewer workers")
        if isinstance(self.lr, str):
            if self.lr != "auto":
                raise ConfigError(f"--lr must be a positive number or 'auto', got {self.lr!r}; try --lr 0.05")
        elif isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (
                math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number or 'auto', got {self.lr}; try --lr 0.05")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("--nesterov needs a non-zero --momentum")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.langevin_noise < 0:
            raise ConfigError(f"--langevin-noise must be >= 0, got {self.langevin_noise}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (isinstance(self.example_qsgd_levels, int) and 0 <= self.example_qsgd_levels <= 127):
            raise ConfigError(f"--example-qsgd-levels must be an integer in 0..127 (0: off), got "
                              f"{self.example_qsgd_levels}; e.g. --example-qsgd-levels 4")
        if self.example_qsgd_levels and self.dropout:
            raise ConfigError("--example-qsgd-levels computes per-example gradients with torch.func, which cannot draw "
                              "the trainer's per-example dropout masks; use one mechanism at a time (--dropout 0)")
        if self.width is not None:
            _positive_int("width", self.width)
        _positive_int("depth", self.depth)
        _positive_int("replicate", self.replicate)
        if self.n_train is not None:
            _positive_int("n-train", self.n_train)
        if self.dim is not None:
            _positive_int("dim", self.dim)
        if self.noise is not None and self.noise < 0:
            raise ConfigError(f"--noise must be >= 0, got {self.noise}")
        if not (is_import_string(self.model) or self.model.startswith(OBJECT_PREFIX)) and self.model not in MODELS:
            # a user's own model file given without its function is the likely slip: show the form it needs
            own = f"{self.model}:make_model" if self.model.endswith(".py") else "mypkg.models:make_model"
            raise ConfigError(f"--model: unknown value {self.model!r}; choose one of {', '.join(MODELS)}, or your "
                              f"own as MODULE:FUNCTION, e.g. {own}")
        if self.loss is not None and not (is_import_string(self.loss) or self.loss.startswith(OBJECT_PREFIX)):
            raise ConfigError(f"--loss {self.loss!r} is not an import string; write MODULE:FUNCTION, e.g. "
                              "mypkg.losses:my_loss or path/to/file.py:my_loss")
        if not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise ConfigError(f"--loader-workers must be an integer >= 0, got {self.loader_workers!r}")
        _choice("backend", self.backend, BACKENDS)
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value}")
        _choice("comm", self.comm, COMM_CHOICES)
        if self.comm == "ring-tcp" and self.backend == "nccl":
            raise ConfigError("--comm ring-tcp moves CPU tensors through sockets; with --backend nccl use "
                              "--comm allreduce or ring")
        _choice("norm", self.norm, NORMS)
        _choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        if self.lr_rule is not None:
            _choice("lr-rule", self.lr_rule, LR_RULES)
        _choice("batch-policy", self.batch_policy, BATCH_POLICY_NAMES)
        if self.batch_policy == "goodput" and self.lr_rule not in (None, "adascale"):
            # Refused rather than warned: goodput's efficiency E(B) = r/S is the AdaScale gain, so another rule
            # would train at a learning rate the batch choice did not assume.
            raise ConfigError(f"--batch-policy goodput sets the learning rate by the AdaScale gain (its "
                              f"efficiency model is that rule's r/S), not --lr-rule {self.lr_rule}; drop "
                              f"--lr-rule or use --lr-rule adascale")
        _choice("diversity", self.diversity, DIVERSITY_MODES)
        if self.batch_policy == "schedule":
            if not self.batch_schedule:
                raise ConfigError("--batch-policy schedule needs --batch-schedule, e.g. \"0:64,5:256,10:1024\"")
            try:
                parse_schedule(self.batch_schedule)
            except ConfigError as e:
                raise ConfigError(f"--batch-schedule: {e}") from None
        if self.lr_schedule == "step" and not self.lr_milestones:
            raise ConfigError("--lr-schedule step needs --lr-milestones, e.g. --lr-milestones 5,8 (epochs)")
        if self.batch_policy == "diversity" and self.diversity == "off":
            raise ConfigError("--batch-policy diversity needs the diversity estimate; use --diversity cheap "
                              "or exact")
        if self.batch_policy == "goodput" and self.diversity == "off":
            raise ConfigError("--batch-policy goodput needs the gradient-noise estimate; use --diversity cheap "
                              "or exact")
        if self.effective_lr_rule == "adascale" and self.diversity == "off":
            raise ConfigError("--lr-rule adascale needs the gradient statistics; use --diversity cheap or exact")
        if not self.delta > 0:
            raise ConfigError(f"--delta must be positive, got {self.delta}")
        for name in ("min_batch", "max_batch", "base_batch_size"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name.replace("_", "-"), value)
        if self.min_batch and self.max_batch and self.min_batch > self.max_batch:
            raise ConfigError(f"--min-batch {self.min_batch} exceeds --max-batch {self.max_batch}")
        adaptive = self.batch_policy in ("diversity", "goodput")  # the policies that clip to --max-batch
        if adaptive and self.max_batch is not None and self.max_batch < self.workers:
            raise ConfigError(f"--max-batch {self.max_batch} is below --workers {self.workers}: every worker needs at "
                              f"least one example; raise --max-batch to at least {self.workers} or use fewer workers")
        if self.steps is not None:
            _positive_int("steps", self.steps)
        elif not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError(f"--epochs must be positive, got {self.epochs}; or give --steps")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(f"--target-accuracy is a fraction in (0, 1], got {self.target_accuracy}; "
                              "e.g. 0.94 for 94%")
        _choice("target-metric", self.target_metric, ("test_accuracy", "train_accuracy"))
        if self.eval_every is not None:
            _positive_int("eval-every", self.eval_every)
        if self.eval_train_examples < 0:
            raise ConfigError("--eval-train-examples must be >= 0")
        if self.exact_diversity_every < 0:
            raise ConfigError("--exact-diversity-every must be >= 0 (0 turns it off)")
        if not 0 < self.diversity_decay < 1:
            raise ConfigError(f"--diversity-decay must be in (0, 1), got {self.diversity_decay}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ConfigError(f"--master-port must be in 1..65535, got {self.master_port}")
        if self.threads_per_worker is not None:
            _positive_int("threads-per-worker", self.threads_per_worker)
        if self.check_replicas_every < 0:
            raise ConfigError("--check-replicas-every must be >= 0 (0 turns the check off)")
        if not self.timeout_s >= MIN_TIMEOUT_S:
            # Below a second a collective's ordinary jitter (a worker's time slice, a page fault) already
            # trips the watchdog, which then aborts inside the engine instead of naming the slow worker.
            raise ConfigError(f"--timeout-s must be at least {MIN_TIMEOUT_S:g} s (it bounds how long a worker may "
                              f"stay silent), got {self.timeout_s:g}; e.g. --timeout-s 600")
        _positive_int("qsgd-levels", self.qsgd_levels)
        if self.qsgd_levels > 127:
            raise ConfigError(f"--qsgd-levels must be in 1..127 (a signed 8-bit code), got {self.qsgd_levels}")
        if any(m <= 0 for m in self.lr_milestones) or any(b <= a for a, b in zip(self.lr_milestones,
                                                                                   self.lr_milestones[1:])):
            raise ConfigError(f"--lr-milestones must be epochs > 0 in increasing order, got "
                              f"{','.join(f'{m:g}' for m in self.lr_milestones)}; e.g. --lr-milestones 5,8")
        if not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"--lr-gamma must be in (0, 1], got {self.lr_gamma}")
        if self.warmup_epochs < 0:
            raise ConfigError("--warmup-epochs must be >= 0")
        if not (isinstance(self.checkpoint_every_steps, int) and self.checkpoint_every_steps >= 0):
            raise ConfigError("--checkpoint-every-steps must be an integer >= 0 (0: by time only)")
        if not (math.isfinite(self.checkpoint_every_s) and self.checkpoint_every_s >= 0):
            raise ConfigError("--checkpoint-every-s must be a number of seconds >= 0 (0: by steps only)")
        _positive_int("keep-checkpoints", self.keep_checkpoints)
        if not (isinstance(self.max_restarts, int) and self.max_restarts >= 0):
            raise ConfigError("--max-restarts must be an integer >= 0")
        self._check_local_sgd()
        self._check_algorithm()

    def _check_local_sgd(self) -> None:
        parse_straggler(self.straggler)
        if not isinstance(self.backup_workers, int) or not 0 <= self.backup_workers < self.workers:
            raise ConfigError(f"--backup-workers must be an integer in [0, {self.workers}) for --workers "
                              f"{self.workers}, got {self.backup_workers!r}")
        if self.backup_workers:
            if self.comm != "ps":
                raise ConfigError("--backup-workers collects the gradients at rank 0 in arrival order; add --comm ps")
            if self.diversity != "off":
                raise ConfigError("--backup-workers drops gradients, which biases the diversity estimators; add "
                                  "--diversity off")
            if self.sync_every is not None:
                raise ConfigError("--backup-workers and --sync-every are two different remedies; choose one")
        if self.sync_every is None:
            if self.sync_every_after:
                raise ConfigError("--sync-every-after needs --sync-every H (average every H steps after it)")
            return
        _positive_int("sync-every", self.sync_every)
        if not (math.isfinite(self.sync_every_after) and self.sync_every_after >= 0):
            raise ConfigError(f"--sync-every-after must be >= 0 epochs, got {self.sync_every_after}")
        if "qsgd" in self.comm:
            raise ConfigError(f"--sync-every averages parameters, which a lossy codec would corrupt; use an exact "
                              f"--comm (allreduce, ring, ring-tcp, ps) instead of {self.comm}")
        if self.effective_lr_rule == "adascale" or self.batch_policy in ("diversity", "goodput"):
            raise ConfigError("--sync-every: local steps all-reduce no gradient, so there is no noise estimate "
                              "for --lr-rule adascale or --batch-policy diversity/goodput; use them without local "
                              "SGD")

    def _check_algorithm(self) -> None:
        """The asynchronous algorithms have no all-reduced gradient and no synchronous step: refuse what needs
        either, one line each."""
        _choice("algorithm", self.algorithm, ALGORITHMS)
        if self.algorithm == "sync":
            return
        a = f"--algorithm {self.algorithm}"
        refusals = [
            (self.diversity != "off", "has no all-reduced gradient for the online diversity estimate; add "
                                      "--diversity off (--exact-diversity-every still measures B_S exactly)"),
            (self.comm not in ("auto", "allreduce", "ps"),
             f"sends gradients to its own server or none; drop --comm {self.comm}"),
            (self.algorithm == "hogwild" and self.comm not in ("auto", "allreduce"),
             "communicates through shared memory; drop --comm"),
            (self.backend == "nccl", "runs on the CPU over gloo; use --backend gloo"),
            (self.sync_every is not None, "and --sync-every are two different algorithms; choose one"),
            (self.backup_workers > 0, "applies every gradient as it arrives; drop --backup-workers"),
            (self.batch_policy != "fixed", "keeps the global batch fixed; use --batch-policy fixed"),
            (self.effective_lr_rule == "adascale", "has no noise estimate for --lr-rule adascale; choose another rule"),
            (self.lr == "auto", "cannot run the synchronous --lr auto range test; give --lr a number"),
            (self.check_replicas_every > 0, "keeps no identical replicas between evaluations; drop "
                                            "--check-replicas-every"),
            (self.checkpoint_every_steps > 0 or self.max_restarts > 0, "writes no checkpoints to restart from; drop "
                                                                       "--checkpoint-every-steps/--max-restarts"),
            (self.algorithm == "hogwild" and self.langevin_noise > 0, "would add the same Langevin noise in every "
                                                                      "process; drop --langevin-noise"),
            # its workers compute plain mean gradients (async_sgd.local_gradient): the option would be ignored
            (self.example_qsgd_levels > 0, "computes plain mean gradients, without per-example quantization; drop "
                                           "--example-qsgd-levels (or use --algorithm sync)"),
        ]
        for refused, why in refusals:
            if refused:
                raise ConfigError(f"{a} {why}")

    @property
    def effective_lr_rule(self) -> str:
        """The lr rule in force: ``--lr-rule`` if given, else ``adascale`` with ``--batch-policy goodput``
        (the rule its efficiency model assumes) and ``constant`` otherwise."""
        if self.lr_rule is not None:
            return self.lr_rule
        return "adascale" if self.batch_policy == "goodput" else "constant"

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lr_rule"] = self.effective_lr_rule
        d["lr_milestones"] = list(self.lr_milestones)
        return d


MIN_TIMEOUT_S = 1.0

# The kind of value each field holds, from its annotation: what a TOML file or a caller must give.
_KINDS = {"bool": bool, "int": int, "float": float, "str": str, "tuple[float, ...]": tuple, "dict[str, Any]": dict}


def _field_kind(annotation: str) -> tuple[type, bool]:
    """(kind, optional) of a field from its annotation string, e.g. ``"int | None"`` → (int, True)."""
    base, _, none = annotation.partition(" | ")
    return _KINDS[base], none == "None"


def _check_types(cfg: "RunConfig") -> None:
    """Every field holds its kind of value: a bool is a bool (not the string "false", which is truthy), an
    integer is an int (not a bool or a float), a number is a finite int or float (stored as float), a text
    a str; ``lr_milestones`` a list of finite numbers (or their comma-separated text).

    Raises:
        ConfigError: one line naming the option, the value it got and what it takes.
    """
    for f in dataclasses.fields(cfg):
        object.__setattr__(cfg, f.name, _checked_value(f, getattr(cfg, f.name)))


def _checked_value(f: dataclasses.Field, value: Any) -> Any:
    """``value`` as field ``f`` holds it (see :func:`_check_types`); ConfigError naming the option otherwise."""
    kind, optional = _field_kind(f.type)
    if value is None and optional:
        return value
    if f.type == "float | str" and isinstance(value, str):
        return value  # a named value (``--lr auto``): the field's own check in __post_init__ takes it or refuses it
    option = f"--{f.name.replace('_', '-')}"
    wanted = {bool: "true or false (an unquoted TOML boolean; on the command line, the bare flag)",
              int: "an integer", float: "a finite number", str: "a text (a quoted TOML string)",
              tuple: "a list of finite numbers, e.g. [5, 8] or \"5,8\"", dict: "a table"}[kind]
    none = " or left out" if optional else ""
    if kind is tuple:
        value = _number_tuple(option, value, wanted)
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{option} must be {wanted}{none}, got {value!r}")
        value = float(value)
    elif kind is int and isinstance(value, float) and value.is_integer() and math.isfinite(value):
        raise ConfigError(f"{option} must be {wanted}{none}, got {value!r}; write {int(value)}")
    elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{option} must be {wanted}{none}, got {value!r} ({type(value).__name__})")
    return value


def _number_tuple(option: str, value: Any, wanted: str) -> tuple[float, ...]:
    if isinstance(value, str):
        try:
            value = parse_number_list(value)
        except ValueError as e:
            raise ConfigError(f"{option}: {e}; give {wanted}") from None
    if not isinstance(value, (list, tuple)) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
        raise ConfigError(f"{option} must be {wanted}, got {value!r}")
    return tuple(float(v) for v in value)


def _positive_int(option: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"--{option} must be a positive integer, got {value!r}")


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{option}: unknown value {value!r}; choose one of {', '.join(choices)}")


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}

# What ``scalesgd train`` adds to the options given when they leave the batch policy and the learning rate unset:
# the batch with the most progress per second and a learning rate found by a range test (``bench/
# time_to_accuracy.py`` measures this pair, untuned, against a tuned grid of fixed-batch DDP runs). RunConfig's
# own defaults (fixed batch, lr 0.05) stay those of the library (``scalesgd.fit``, sweeps, tests): a run there is
# a function of its seed, where goodput's batch follows the step times it measures.
TRAIN_DEFAULTS = {"batch_policy": "goodput", "lr": "auto"}


def train_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """The entries of :data:`TRAIN_DEFAULTS` that ``scalesgd train`` adds to the options ``given`` (by field name).

    Each is added only when ``given`` leaves it unset and it can run with the rest: both need the synchronous
    algorithm without local SGD or backup workers (the asynchronous ones keep a fixed batch and a numeric lr, and
    local steps all-reduce no gradient); goodput also needs the online noise estimate (``--diversity`` not
    off) and the AdaScale rule it prices (``--lr-rule`` unset or adascale), and no ``--batch-schedule``.

    Returns:
        ``{field: value}`` to merge under ``given`` (``{**train_defaults(given), **given}``).
    """
    def value(name: str) -> Any:
        return given.get(name, FIELDS[name].default)

    synchronous = (value("algorithm") == "sync" and value("sync_every") is None and not value("backup_workers"))
    out: dict[str, Any] = {}
    if "lr" not in given and synchronous:
        out["lr"] = TRAIN_DEFAULTS["lr"]
    if ("batch_policy" not in given and synchronous and value("diversity") != "off"
            and value("lr_rule") in (None, "adascale") and not value("batch_schedule")):
        out["batch_policy"] = TRAIN_DEFAULTS["batch_policy"]
    return out


def load_toml(path: Path | str, *, what: str) -> dict[str, Any]:
    """Read a TOML file: ``train --config`` files and sweep specs both come through here.

    Args:
        path: the file.
        what: what the file is, for the error line ("config file", "sweep spec").
    Returns:
        The parsed document (a dict of tables and keys).
    Raises:
        ConfigError: one line naming the file, when it does not exist or is not valid TOML (with the
            parser's line and column).
    """
    try:  # Python 3.11+
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found; check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory; pass the path of a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid TOML ({e}); fix the line it names") from None


def parse_number_list(text: str, typ: type = float, *, minimum: float | None = None) -> tuple:
    """``"16,32 64"`` → ``(16, 32, 64)``: numbers separated by commas and/or spaces, as options take them.

    Raises:
        ValueError: a message saying what was expected, for an item that is not a ``typ`` or is below
            ``minimum`` (an empty text gives an empty tuple; the option's own check decides about that).
    """
    kind = "integers" if typ is int else "numbers"
    try:
        values = tuple(typ(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"expected {kind} separated by commas, got {text!r}") from None
    if minimum is not None and any(v < minimum for v in values):
        raise ValueError(f"expected {kind} >= {minimum:g} separated by commas, got {text!r}")
    return values


def config_from_mapping(values: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Normalise keys (``-`` → ``_``) of a mapping such as a TOML file and reject unknown ones."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in FIELDS or name == "extra":
            negated = name[3:] if name.startswith("no_") else None
            if negated in FIELDS and _field_kind(FIELDS[negated].type)[0] is bool:  # --no-progress as a key
                hint = f" (use {negated} = false)"
            else:
                close = [k.replace("_", "-") for k in FIELDS if k.startswith(name[:4])]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}; keys mirror the command-line options")
        try:  # the kind here, so the line names the file; ranges and combinations: RunConfig's own checks
            _checked_value(FIELDS[name], value)
        except ConfigError as e:
            raise ConfigError(f"{source}: key {key!r}: {e}") from None
        out[name] = value
    return out


def check_against_data(cfg: RunConfig, n_train: int) -> None:
    """Checks that need the size of the training set."""
    if cfg.global_batch_size > n_train:
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} is larger than the training set "
                          f"({n_train} examples); use a batch of at most {n_train}")
    if cfg.max_batch is not None and cfg.max_batch > n_train:
        raise ConfigError(f"--max-batch {cfg.max_batch} is larger than the training set ({n_train} examples)")
