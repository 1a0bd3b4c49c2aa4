"""Command-line interface: the only reader of ``sys.argv`` and the only user of argparse in the package.

Each subcommand fills a config (or spec) and calls one library function with explicit arguments; no
library module imports this one. Errors of the user's making (:class:`ScalesgdError`) become one line on
stderr and exit code 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from scalesgd.errors import ConfigError, ScalesgdError, StoppedError


# Option types for lists of numbers ("16,32,64"); the parsing itself is config.parse_number_list.
def _number_list(typ: type, minimum: float | None = None):
    def parse(text: str) -> tuple:
        from scalesgd.config import parse_number_list

        try:
            return parse_number_list(text, typ, minimum=minimum)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


_float_list = _number_list(float)


def _lr(text: str) -> float | str:
    """``--lr``: a positive number, or ``auto`` (RunConfig checks the value)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
_int_list = _number_list(int)


def _positive_int_list(text: str) -> list[int]:
    values = list(_number_list(int, minimum=1)(text))
    if not values:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# (option, type, help). Every RunConfig field the user may set; defaults come from RunConfig itself, and are
# appended to the help unless the help states what an unset (None) value means.
TRAIN_OPTIONS: list[tuple[str, Any, str]] = [
    ("dataset", str, "data set: mnist1d, digits, idx:PATH, cifar10:PATH, synthetic-linreg, synthetic-logreg, or "
                     "your own MODULE:FUNCTION returning (train, test) (MODULE: dotted name or path/to/file.py)"),
    ("n-train", int, "training examples to generate (mnist1d, synthetic-*) (default: the data set's own)"),
    ("dim", int, "input dimension of synthetic data sets (default: the data set's own)"),
    ("noise", float, "label noise of synthetic data sets (default: the data set's own)"),
    ("replicate", int, "keep n/r distinct training examples and refill to n (lowers gradient diversity)"),
    ("data-seed", int, "seed of generated data sets and splits (default: the data set's own)"),
    ("model", str, "model: logreg, mlp, cnn1d, cnn, or your own MODULE:FUNCTION returning an nn.Module (it gets "
                   "the keywords it accepts of input_shape, num_outputs, width, depth, dropout, norm)"),
    ("loss", str, "your own per-example loss MODULE:FUNCTION, (output, target) -> (B,) (default: cross-entropy "
                  "for integer targets, half squared error otherwise)"),
    ("loader-workers", int, "DataLoader worker processes that read a map-style data set's examples (0: in the "
                            "training process)"),
    ("width", int, "channels / hidden units (default: the model's own)"),
    ("depth", int, "hidden layers of the mlp"),
    ("dropout", float, "dropout probability"),
    ("norm", str, "normalisation: none or group (GroupNorm/LayerNorm; BatchNorm is not offered)"),
    ("global-batch-size", int, "examples per step, summed over all workers"),
    ("lr", _lr, "learning rate (of the mean loss) at the base batch size, or 'auto': a learning-rate range test "
                "on the first steps picks it, in at most 5%% of the run's time"),
    ("momentum", float, "heavy-ball momentum"),
    ("weight-decay", float, "L2 weight decay"),
    ("lr-schedule", str, "base schedule: constant, cosine, step"),
    ("lr-milestones", _float_list, "epochs at which the step schedule multiplies the lr by --lr-gamma"),
    ("lr-gamma", float, "factor of the step schedule"),
    ("lr-rule", str, "lr as the batch changes: constant, linear, sqrt, adascale (default: adascale with "
                     "--batch-policy goodput, which needs it; else constant)"),
    ("warmup-epochs", float, "epochs of linear lr warm-up, from min(lr, a tenth of the rule's rate) to that rate "
                             "(Goyal et al.)"),
    ("base-batch-size", int, "B0 of the lr rule (default: the starting global batch)"),
    ("langevin-noise", float, "sigma of SGLD-style noise: each step adds N(0, sigma^2 * lr) per coordinate to the "
                              "weights, i.e. N(0, sigma^2 / lr) to the mean gradient (sigma^2 = 2/temperature "
                              "gives SGLD); one draw per step, the same on every worker"),
    ("example-qsgd-levels", int, "s > 0: quantize each example's gradient with QSGD's unbiased stochastic rounding "
                                 "(s levels, buckets of 512, max scale) before the sum: per-example noise that "
                                 "raises the diversity; needs per-example gradients (small models; no dropout) "
                                 "(default: 0, off)"),
    ("batch-policy", str, "fixed, diversity (batch = delta*B_S + 1), schedule, goodput (the batch with the most "
                          "progress per second: fitted step time x statistical efficiency; lr by AdaScale)"),
    ("batch-schedule", str, "for --batch-policy schedule: epoch:batch pairs, e.g. 0:64,5:256"),
    ("delta", float, "for --batch-policy diversity: batch = delta * B_S + 1"),
    ("min-batch", int, "smallest global batch the diversity/goodput policy may choose; 1 lets diversity shrink "
                       "(default: diversity: the starting batch, since below it per-step overhead outweighs "
                       "sample efficiency; goodput: P, its step-time model weighs that overhead)"),
    ("max-batch", int, "largest global batch the diversity/goodput policy may choose (default: the training "
                       "set's size)"),
    ("epochs", float, "passes over the training set"),
    ("steps", int, "number of steps; overrides --epochs (default: --epochs decides)"),
    ("target-accuracy", float, "stop when --target-metric reaches this fraction; records the time to get there "
                                "(default: no target, train the whole budget)"),
    ("target-metric", str, "what --target-accuracy applies to: test_accuracy or train_accuracy"),
    ("eval-every", int, "steps between evaluations (default: every epoch)"),
    ("eval-train-examples", int, "training examples used to measure train accuracy"),
    ("diversity", str, "online gradient-diversity estimate: off, cheap (two batch sizes; with one worker: "
                       "exact), exact (per-example ghost norms)"),
    ("diversity-decay", float, "EMA decay of the diversity estimators"),
    ("exact-diversity-every", int, "measure the exact whole-data diversity every k steps (0: never)"),
    ("workers", int, "local worker processes (under torchrun the launch sets them: a different --workers is an "
                     "error)"),
    ("backend", str, "auto (nccl with CUDA, else gloo), gloo, nccl"),
    ("comm", str, "gradient communication: auto (ring-tcp for several CPU workers, else allreduce: GPUs, one "
                 "worker), allreduce (built-in), "
                 "ring (ours, over torch.distributed), "
                 "ring-tcp (ours, over our own sockets; CPU), ps, qsgd (over the built-in), "
                 "qsgd+ring, qsgd+ring-tcp, qsgd+ps (the QSGD codec over that transport)"),
    ("qsgd-levels", int, "quantisation levels of --comm qsgd"),
    ("master-addr", str, "the address of this machine that local workers meet and listen on: the rendezvous "
                        "store, gloo's and ring-tcp's sockets bind it (loopback, the default, is reachable from "
                        "this machine only). Several machines: launch with torchrun and name the address there "
                        "(--rdzv-endpoint HOST:PORT)"),
    ("master-port", int, "rendezvous port for local workers (default: a free one)"),
    ("threads-per-worker", int, "torch threads per worker (default: cores / local workers, at least 1)"),
    ("timeout-s", float, "collective timeout: a worker silent this long ends the job with an error"),
    ("check-replicas-every", int, "check every k steps that all ranks hold identical parameters (0: off)"),
    ("seed", int, "seed of model init and data order"),
    ("straggler", str, "inject delays, reproducible from (seed, rank, step): rank1x1.5 (rank 1's compute takes "
                      "1.5x), exp:mean=5ms, lognormal:mean=5ms,sigma=1, pause:p=0.01,s=0.5 (default: none)"),
    ("sync-every", int, "local SGD: each worker steps on its own shard, parameters averaged every H steps "
                       "(default: synchronous SGD, gradients all-reduced every step)"),
    ("sync-every-after", float, "post-local SGD: synchronous for this many epochs, then --sync-every H"),
    ("backup-workers", int, "b backup workers: each step uses the first P-b gradients to reach rank 0, rescaled "
                           "(Chen et al. 2016); needs --comm ps and --diversity off"),
    ("algorithm", str, "sync (synchronous SGD), async-ps (asynchronous SGD through a parameter server on rank 0, "
                       "stale gradients; staleness logged), hogwild (lock-free updates of one model in shared "
                       "memory); the asynchronous two need --diversity off"),
    ("checkpoint-every-steps", int, "write a checkpoint every k steps (0: by time only)"),
    ("checkpoint-every-s", float, "write a checkpoint every this many seconds (0: by steps only); stretched so "
                                  "that saving costs at most 2%% of the run (default: 300)"),
    ("keep-checkpoints", int, "checkpoints kept in RUN_DIR/checkpoints (the newest)"),
    ("max-restarts", int, "restart the job from its last checkpoint up to this many times when a worker dies "
                          "(local workers; under torchrun use its own --max-restarts)"),
    ("run-dir", str, "where to write the run (default: runs/<time>-<model>-<data>-B<b>-P<p>-s<seed>)"),
]

# `scalesgd train`'s own defaults where they differ from RunConfig's (config.train_defaults); the other commands
# that take the run options (diversity, sweep) keep RunConfig's, and their help shows those.
TRAIN_DEFAULT_HELP = {
    "lr": "(default: auto for synchronous SGD without --sync-every or --backup-workers, else 0.05)",
    "batch-policy": "(default: goodput where it can run: synchronous SGD with --diversity on, --lr-rule unset or "
                    "adascale, no --batch-schedule; else fixed)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other input error
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_train_options(p: argparse.ArgumentParser, *, train: bool = False) -> None:
    """The run options; ``train``: with ``scalesgd train``'s own defaults in their help (TRAIN_DEFAULT_HELP)."""
    from scalesgd.config import FIELDS

    p.add_argument("--config", metavar="FILE.toml", help="TOML file whose keys mirror these options; "
                   "options given on the command line win")
    for option, typ, help_text in TRAIN_OPTIONS:
        default = FIELDS[option.replace("-", "_")].default
        if train and option in TRAIN_DEFAULT_HELP:
            help_text = f"{help_text} {TRAIN_DEFAULT_HELP[option]}"
        if "(default:" not in help_text:  # one default per option: the help's own, else RunConfig's
            shown = (", ".join(map(str, default)) or "none") if isinstance(default, tuple) else default
            help_text = f"{help_text} (default: {shown})"
        p.add_argument(f"--{option}", type=typ, default=argparse.SUPPRESS, help=help_text)
    p.add_argument("--nesterov", action="store_true", default=argparse.SUPPRESS, help="Nesterov momentum")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bar")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run options the user set: a --config TOML file's, overridden by the command line's."""
    from scalesgd.config import FIELDS, config_from_mapping, load_toml

    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        values.update(config_from_mapping(load_toml(path, what="config file (--config)"), source=str(path)))
    for name in FIELDS:
        if name in vars(args):
            values[name] = getattr(args, name)
    return values


def config_from_args(args: argparse.Namespace, option_names: Sequence[str] | None = None, *,
                     train: bool = False):
    """defaults < TOML file < command line → a validated RunConfig. ``train``: ``scalesgd train``'s defaults
    (:func:`scalesgd.config.train_defaults`: goodput and ``--lr auto``) replace RunConfig's where they apply."""
    from scalesgd.config import RunConfig, train_defaults

    values = given_options(args)
    if train:
        values = {**train_defaults(values), **values}
    try:
        return RunConfig(**values)
    except TypeError as e:  # a TOML value of the wrong type reaches a comparison
        raise ConfigError(f"invalid value in the configuration: {e}") from None
    except ConfigError as e:  # a value the --config file gave ("--lr must be ..."): name the file and its key
        raise _in_config_file(e, args) from None


def _in_config_file(error: ConfigError, args: argparse.Namespace) -> ConfigError:
    """``error`` prefixed with the --config file and its key when the option it names (``--lr must be …``) took
    its value from that file; else ``error`` as it is."""
    from scalesgd.config import load_toml

    text = str(error)
    key = text.split()[0].rstrip(":").lstrip("-").replace("-", "_") if text.startswith("--") else None
    if key is None or not getattr(args, "config", None) or key in vars(args):  # the command line's value
        return error
    in_file = {k.replace("-", "_") for k in load_toml(Path(args.config), what="config file (--config)")}
    return ConfigError(f"{args.config}: key {key!r}: {text}") if key in in_file else error


def check_launch(args: argparse.Namespace, cfg) -> None:
    """Under torchrun, a ``--workers`` the user gave (option or config file) must match the launch's world
    size; a partial torchrun environment is refused (:func:`scalesgd.distributed.torchrun_rendezvous`)."""
    from scalesgd.config import load_toml
    from scalesgd.distributed import check_workers_match, torchrun_rendezvous

    rdv = torchrun_rendezvous()
    given = "workers" in vars(args) or (getattr(args, "config", None) is not None and "workers" in load_toml(
        Path(args.config), what="config file (--config)"))
    if given:
        check_workers_match(rdv, cfg.workers)


def cmd_train(args: argparse.Namespace) -> int:
    from scalesgd.distributed import torchrun_rendezvous
    from scalesgd.run import train

    if getattr(args, "resume", None):
        from scalesgd.checkpoint import resume_config

        cfg = resume_config(Path(args.resume), given_options(args))
    else:
        cfg = config_from_args(args, train=True)
    check_launch(args, cfg)
    summary = train(cfg, resume=bool(getattr(args, "resume", None)))
    rdv = torchrun_rendezvous()
    if rdv is None or rdv.rank == 0:
        _print_summary(summary)
    return 0


def _print_summary(s: dict[str, Any]) -> None:
    acc = s.get("final_test_accuracy")
    lines = [
        f"steps {s['steps']}, epochs {s['epochs']:.2f}, wall {s['wall_s']:.1f} s "
        f"(training {s['train_time_s']:.1f} s) on {s['world_size']} worker(s), {s['backend']}",
        f"final test accuracy {acc:.4f}" if acc is not None else f"final test loss {s['final_test_loss']:.5g}",
    ]
    if s.get("target_accuracy") is not None:
        if s.get("time_to_target_s") is not None:
            lines.append(f"reached target {s['target_accuracy']:.4f} after {s['time_to_target_s']:.1f} s")
        else:
            lines.append(f"did not reach target {s['target_accuracy']:.4f}")
    if s.get("staleness_mean") is not None:  # --algorithm async-ps / hogwild
        lines.append(f"{s['algorithm']}: {s['updates']} updates, staleness mean {s['staleness_mean']:.2f}, "
                     f"max {s['staleness_max']}")
    lines.append(f"run directory: {s['run_dir']}")
    print("\n".join(lines))


def cmd_diversity(args: argparse.Namespace) -> int:
    """Exact whole-data diversity along a training run, or at a saved checkpoint."""
    from scalesgd import plots
    from scalesgd.rundata import RunData

    if args.checkpoint:
        from scalesgd.diversity import diversity_at_checkpoint

        stats = diversity_at_checkpoint(Path(args.checkpoint))
        print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
        return 0
    from scalesgd.run import train

    if args.every < 1:  # 0 would train, measure nothing exact and plot an empty diversity.png
        raise ConfigError(f"--every {args.every}: steps between exact measurements must be a positive integer; "
                          "e.g. --every 100")
    cfg = config_from_args(args)
    check_launch(args, cfg)
    if not cfg.exact_diversity_every:
        cfg = cfg.replace(exact_diversity_every=args.every)
    summary = train(cfg)
    run = RunData.open(summary["run_dir"])
    png = plots.diversity_along_training(run, run.path / "diversity.png")
    rows = [r for r in run.records if r.get("kind") == "diversity"]
    print(f"{'step':>6} {'epoch':>6} {'B_S exact':>10} {'estimate':>10} {'delta':>10} {'M2':>10} {'|grad F|^2':>11}")
    for r in rows:
        est = r.get("batch_bound_est")
        print(f"{r['step']:6d} {r['epoch']:6.2f} {r['batch_bound']:10.1f} "
              f"{(f'{est:10.1f}' if est is not None else '         -')} {r['delta']:10.4g} {r['m2']:10.4g} "
              f"{r['mean_grad_sq_norm']:11.4g}")
    _print_summary(summary)
    print(f"plot: {png}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from scalesgd.report import write_report

    out = write_report([Path(p) for p in args.run_dirs], out_dir=Path(args.out) if args.out else None)
    print(f"report: {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# sweep


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


def _add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    from scalesgd.sweep import BOUND_MODES, GRID_OWNED, TARGET_METRICS, TUNE_MODES

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


def sweep_spec_from_args(args: argparse.Namespace):
    """TOML spec < command line → a validated :class:`scalesgd.sweep.SweepSpec`."""
    from scalesgd.sweep import read_spec_file, spec_from_mappings

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
    from scalesgd.sweep import run_sweep

    spec = sweep_spec_from_args(args)
    run_sweep(spec, Path(args.out), report_dir=Path(args.report_dir) if args.report_dir else None,
              train_missing=not args.report_only, log=lambda line: print(line, flush=True))
    return 0


# ---------------------------------------------------------------------------------------------------------
# predict

_PREDICT_ARGS = ("model", "dataset", "n_train", "width", "dropout", "norm", "network", "comm", "batch_sizes",
                 "max_workers", "batch_bound", "passes_at_small_batch", "small_batch_size", "from_run", "target",
                 "profile_batch_sizes", "profile_steps", "compute_curve", "overhead_s", "tolerance", "seed", "out",
                 "straggler", "sync_every", "passes_vs_h")


def _add_predict_parser(subparsers) -> argparse.ArgumentParser:
    from scalesgd import perf_model as pm
    from scalesgd.comm_registry import COMM_CHOICES
    from scalesgd.models import MODELS

    p = subparsers.add_parser(
        "predict", help="predict time per pass, passes and time to accuracy for up to 1024 workers",
        description="Profile this machine (compute at a few local batch sizes, all-reduce alpha/beta), "
                    "then predict time to accuracy = (n/B)*T_step(B,P) * passes(B) over a (B, P) grid, with "
                    "T_step = T_compute(ceil(B/P)) + 2(P-1)alpha + 2(P-1)/P*N*beta and "
                    "passes(B) = passes_min*(1 + B/(B_S-1)).")
    p.add_argument("--model", default=None, help=f"model: {', '.join(sorted(MODELS))} or MODULE:FUNCTION "
                   "(default: cnn1d, or with --from-run the run's own; a different one is an error)")
    p.add_argument("--dataset", default=None, help="data set spec, for input shape, n and outputs "
                   "(default: mnist1d, or with --from-run the run's own)")
    p.add_argument("--n-train", type=int, default=None, help="training examples (default: the data set's)")
    p.add_argument("--width", type=int, default=None, help="model width (default: the model's own)")
    p.add_argument("--dropout", type=float, default=None, help="dropout (default: 0, or the run's own)")
    p.add_argument("--norm", default=None, help="normalisation (default: none, or the run's own)")
    p.add_argument("--network", default=None, metavar="'BW, LATENCY'",
                   help="target network, e.g. '25 Gbit/s, 10 us' (default: measured here with gloo)")
    p.add_argument("--comm", default="auto", choices=COMM_CHOICES,
                   help="communication strategy: its alpha and beta are measured here when --network is not "
                        "given, and ring/ring-tcp are modelled with their recursive doubling for small messages "
                        "(default: auto: the --from-run run's own, else what `scalesgd train` runs: ring-tcp "
                        "measured here, the built-in allreduce on a --network)")
    p.add_argument("--batch-sizes", type=_positive_int_list, default=[2 ** k for k in range(4, 17)],
                   help="global batch sizes to predict (default: 16,32,...,65536)")
    p.add_argument("--max-workers", type=int, default=1024, help="largest P; the grid is 1,2,4,... (default 1024)")
    p.add_argument("--batch-bound", type=float, default=None,
                   help="diversity batch bound B_S = n*Delta from a measured run (or use --from-run)")
    p.add_argument("--passes-at-small-batch", type=float, default=None,
                   help="passes to the target accuracy measured at --small-batch-size (or use --from-run)")
    p.add_argument("--small-batch-size", type=int, default=32,
                   help="the batch size --passes-at-small-batch was measured at (default 32)")
    p.add_argument("--from-run", default=None, metavar="RUN_DIR",
                   help="take B_S (the run's diversity estimates, averaged over the run) and the passes to its target "
                        "from a run directory")
    p.add_argument("--target", type=float, default=None, metavar="ACC",
                   help="with --from-run: the passes to this accuracy, read from the run's evaluations on its "
                        "target metric (default: the run's own --target-accuracy)")
    p.add_argument("--profile-batch-sizes", type=_positive_int_list, default=[8, 32, 128, 512, 2048],
                   help="local batch sizes to profile (default 8,32,128,512,2048)")
    p.add_argument("--profile-steps", type=int, default=20, help="timed steps per profiled size (default 20)")
    p.add_argument("--compute-curve", default="auto", choices=pm.COMPUTE_KINDS,
                   help="compute curve: affine t0 + t1*b, piecewise through the profile, or auto (affine "
                        "when it fits every profiled point within 5%%; default)")
    p.add_argument("--overhead-s", type=float, default=0.0, help="fixed extra seconds per step (default 0)")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="the cheapest recommendation may be this much slower than the fastest (default 0.10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="write predictions.csv, prediction.json and "
                   "PNG plots here")
    p.add_argument("--straggler", default=None, metavar="SPEC",
                   help="price injected delays: rank1x1.5, exp:mean=5ms, lognormal:mean=5ms,sigma=1, "
                        "pause:p=0.01,s=0.5 (E[max of P step times]; default: none)")
    p.add_argument("--sync-every", type=int, default=1, metavar="H",
                   help="local SGD: parameters averaged every H steps (communication / H; default 1)")
    p.add_argument("--passes-vs-h", default=None, metavar="H:PASSES,...",
                   help="local SGD's measured passes to accuracy against H, e.g. 1:4.2,4:4.4,16:5.1 (H = 1 "
                        "synchronous): passes at --sync-every scale by passes(H)/passes(1), and the H of the "
                        "curve with the least time to accuracy is recommended")
    p.set_defaults(func=cmd_predict)
    return p


def cmd_predict(args: argparse.Namespace) -> int:
    from scalesgd.predict import predict

    return predict(**{name: getattr(args, name) for name in _PREDICT_ARGS})


# ---------------------------------------------------------------------------------------------------------
# allreduce-bench


def _add_allreduce_bench_parser(subparsers) -> argparse.ArgumentParser:
    from scalesgd import allreduce_bench

    p = subparsers.add_parser(
        "allreduce-bench", help="time the communication strategies against loopback TCP, nccl-tests style",
        description=allreduce_bench.__doc__.split("\n\n")[1] if allreduce_bench.__doc__ else None)
    p.add_argument("--strategies", nargs="+", default=list(allreduce_bench.DEFAULT_STRATEGIES), metavar="NAME",
                   help="strategies to time (default: %(default)s)")
    p.add_argument("--sizes", nargs="+", default=None, metavar="SIZE",
                   help="buffer sizes: 4096, 64KB, 16MB, or LO:HI for a doubling sweep (default 4KB:64MB; "
                        "with --quick 4KB 64KB 1MB 8MB)")
    p.add_argument("--workers", nargs="+", type=int, default=None, metavar="P",
                   help="world sizes, one local job each (default 2 4; with --quick 2)")
    p.add_argument("--iters", type=int, default=None, help="timed rounds per size (default 30; --quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per size (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="a small sweep that finishes in well under a minute")
    p.add_argument("--json", default=None, metavar="FILE", help="also write rows, link and fits here (bench/allreduce_targets.py reads it)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw time and busbw against message size per P, with the fitted model and the "
                        "TCP ceiling")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl", "auto"))
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default cores // P)")
    p.add_argument("--comm-option", action="append", metavar="STRATEGY.KEY=VALUE",
                   help="strategy option, e.g. qsgd.levels=127 or ring.chunk_bytes=1048576 (repeatable)")
    p.add_argument("--budget-s", type=float, default=8.0,
                   help="stop timing a size after this many seconds once 3 calls are in (default %(default)s)")
    p.add_argument("--settle-ms", type=float, default=5.0,
                   help="busy pause in milliseconds before each timing, so a strategy's after-effects (gloo keeps "
                        "the host busy for a few ms after a burst) stay out of the next one's timing "
                        "(default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=1800.0, help="bound on each P's job (default %(default)s)")
    p.set_defaults(func=cmd_allreduce_bench)
    return p


def cmd_allreduce_bench(args: argparse.Namespace) -> int:
    from scalesgd.allreduce_bench import run_from_args

    return run_from_args(args)


# ---------------------------------------------------------------------------------------------------------
# theory: the convergence table of Yin et al. 2018 with numbers (scalesgd.theory)


def cmd_theory(args: argparse.Namespace) -> int:
    """Print the serial-vs-minibatch convergence table for given or estimated constants."""
    from scalesgd import theory

    result = theory.run_theory(
        epsilon=args.epsilon, delta=args.delta, batch=args.batch, m2=args.m2, batch_bound=args.batch_bound,
        beta=args.beta, mu=args.mu, d0=args.d0, f0=args.f0, dataset=args.dataset, model=args.model,
        n_train=args.n_train, data_seed=args.data_seed, dim=args.dim, noise=args.noise, seed=args.seed,
        weight_decay=args.weight_decay)
    print(result.text())
    return 0


def add_theory_parser(sub) -> None:
    p = sub.add_parser("theory", help="gradient evaluations and step sizes of serial vs minibatch SGD (Yin et al.)",
                       description="The convergence table of Yin et al. 2018 (strongly convex, convex, smooth, "
                       "smooth PL): gradient evaluations and step sizes of serial SGD to reach --epsilon, and of "
                       "minibatch SGD at B <= delta*B_S + 1 with step/(1 + (B-1)/B_S). Constants are given, or "
                       "estimated from --dataset and --model at the initial weights; given ones win.")
    p.add_argument("--epsilon", type=float, required=True, help="the target of each row (see its 'target')")
    p.add_argument("--delta", type=float, default=None, help="slack: B <= delta*B_S + 1 costs <= (1+delta)x "
                   "serial gradient evaluations (default: 1)")
    p.add_argument("--batch", type=int, default=None, help="B of the minibatch column (default: delta*B_S + 1)")
    for name, text in (("m2", "M2 = mean per-example squared gradient norm"),
                       ("batch-bound", "B_S = M2/|grad F|^2 = n*Delta"), ("beta", "smoothness"),
                       ("mu", "strong convexity / PL constant"), ("d0", "initial distance^2 |w0 - w*|^2"),
                       ("f0", "initial suboptimality F(w0) - F*")):
        p.add_argument(f"--{name}", type=float, default=None, help=f"{text} (default: estimated or unknown)")
    p.add_argument("--dataset", default=None, help="estimate the constants on this data set (load_dataset's spec)")
    p.add_argument("--model", default="logreg", help="model of the estimate (default: logreg)")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--data-seed", type=int, default=None)
    p.add_argument("--dim", type=int, default=None, help="input dimension of synthetic data sets")
    p.add_argument("--noise", type=float, default=None, help="label noise of synthetic data sets")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default: 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay added to beta and mu")
    p.set_defaults(func=cmd_theory)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scalesgd", description="Synchronous data-parallel minibatch SGD with gradient "
                     "diversity: how many workers, what batch size, what learning rate, how long.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("train", help="train a model with synchronous data-parallel SGD",
                       description="Train with P synchronous workers (spawned locally, or as torchrun's ranks).")
    add_train_options(p, train=True)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint, "
                   "with its own config.json; only options that do not change the maths (--workers, --timeout-s, "
                   "--no-progress, the checkpoint and restart options) may be given")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("diversity", help="measure the exact whole-data gradient diversity along training",
                       description="Train as `scalesgd train` does and, every --every steps, measure the exact "
                       "whole-data diversity Delta_S, M2, |grad F|^2 and B_S = n*Delta_S next to the online "
                       "estimate; writes them to the run directory (kind=diversity lines in metrics.jsonl) and "
                       "plots diversity.png. With --checkpoint, measure once at a saved checkpoint instead.")
    add_train_options(p)
    p.add_argument("--every", type=int, default=100, help="steps between exact measurements (default: 100)")
    p.add_argument("--checkpoint", metavar="RUN_DIR_OR_FILE", help="measure once at this run's checkpoint.pt")
    p.set_defaults(func=cmd_diversity)

    p = sub.add_parser("report", help="write report.md with plots from run directories")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output directory (default: the first run directory)")
    p.set_defaults(func=cmd_report)

    _add_allreduce_bench_parser(sub)
    _add_predict_parser(sub)
    _add_sweep_parser(sub)
    add_theory_parser(sub)
    return parser


def _starts_workers(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for training on local workers: ``train`` or ``diversity`` (not at a checkpoint)
    without ``--workers 1``. A guess from the words alone (a --config file may still say workers = 1): it only
    decides whether the fork server starts early."""
    if not argv or argv[0] not in ("train", "diversity"):
        return False
    words = list(argv)
    if any(w in ("-h", "--help", "--checkpoint") or w.startswith("--checkpoint=") for w in words):
        return False
    for i, w in enumerate(words):
        if (w == "--workers" and words[i + 1:i + 2] == ["1"]) or w == "--workers=1":
            return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _starts_workers(argv):
        # Before the imports below bring in torch: the fork server imports torch and the training code on
        # another core meanwhile, and forks the workers when they are due (scalesgd.launch).
        from scalesgd.launch import prestart

        prestart()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except StoppedError as e:  # a stop asked for, with a checkpoint to resume from: not an error
        print(f"scalesgd: {e}", file=sys.stderr)
        return e.exit_code
    except ScalesgdError as e:
        print(f"scalesgd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scalesgd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
