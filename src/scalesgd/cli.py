"""Command-line interface: the only reader of ``sys.argv``.

Each subcommand fills a config and calls one function. Errors of the user's making (:class:`ScalesgdError`)
become one line on stderr and exit code 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from scalesgd.errors import ConfigError, ScalesgdError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


# (option, type, help). Every RunConfig field the user may set; defaults come from RunConfig itself.
def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


TRAIN_OPTIONS: list[tuple[str, Any, str]] = [
    ("dataset", str, "data set: mnist1d, digits, idx:PATH, cifar10:PATH, synthetic-linreg, synthetic-logreg"),
    ("n-train", int, "training examples to generate (mnist1d, synthetic-*)"),
    ("dim", int, "input dimension of synthetic data sets"),
    ("noise", float, "label noise of synthetic data sets"),
    ("replicate", int, "keep n/r distinct training examples and refill to n (lowers gradient diversity)"),
    ("data-seed", int, "seed of generated data sets and splits"),
    ("model", str, "model: logreg, mlp, cnn1d, cnn"),
    ("width", int, "channels / hidden units (default: the model's own)"),
    ("depth", int, "hidden layers of the mlp"),
    ("dropout", float, "dropout probability"),
    ("norm", str, "normalisation: none or group (GroupNorm/LayerNorm; BatchNorm is not offered)"),
    ("global-batch-size", int, "examples per step, summed over all workers"),
    ("lr", float, "learning rate (of the mean loss) at the base batch size"),
    ("momentum", float, "heavy-ball momentum"),
    ("weight-decay", float, "L2 weight decay"),
    ("lr-schedule", str, "base schedule: constant, cosine, step"),
    ("lr-milestones", _float_list, "epochs at which the step schedule multiplies the lr by --lr-gamma"),
    ("lr-gamma", float, "factor of the step schedule"),
    ("lr-rule", str, "lr as the batch changes: constant, linear, sqrt, adascale"),
    ("warmup-epochs", float, "gradual warm-up of the lr rule (Goyal et al.)"),
    ("base-batch-size", int, "B0 of the lr rule (default: the starting global batch)"),
    ("langevin-noise", float, "Gaussian noise std per sqrt(lr) added to each update (SGLD-style)"),
    ("batch-policy", str, "fixed, diversity (batch = delta*B_S + 1), schedule"),
    ("batch-schedule", str, "for --batch-policy schedule: epoch:batch pairs, e.g. 0:64,5:256"),
    ("delta", float, "for --batch-policy diversity: batch = delta * B_S + 1"),
    ("min-batch", int, "smallest global batch a policy may choose (diversity policy: default the starting "
                       "batch, since below it per-step overhead outweighs sample efficiency; 1 lets it shrink)"),
    ("max-batch", int, "largest global batch a policy may choose"),
    ("epochs", float, "passes over the training set"),
    ("steps", int, "number of steps (overrides --epochs)"),
    ("target-accuracy", float, "stop when test accuracy reaches this fraction; records the time to get there"),
    ("target-metric", str, "what --target-accuracy applies to: test_accuracy or train_accuracy"),
    ("eval-every", int, "steps between evaluations (default: every epoch)"),
    ("eval-train-examples", int, "training examples used to measure train accuracy"),
    ("diversity", str, "online gradient-diversity estimate: off, cheap (two batch sizes; with one worker: "
                       "exact), exact (per-example ghost norms)"),
    ("diversity-decay", float, "EMA decay of the diversity estimators"),
    ("exact-diversity-every", int, "measure the exact whole-data diversity every k steps (0: never)"),
    ("workers", int, "local worker processes (ignored under torchrun)"),
    ("backend", str, "auto (nccl with CUDA, else gloo), gloo, nccl"),
    ("comm", str, "gradient communication: allreduce (built-in), ring (ours, over torch.distributed), "
                 "ring-tcp (ours, over our own sockets; CPU), ps, qsgd"),
    ("qsgd-levels", int, "quantisation levels of --comm qsgd"),
    ("master-addr", str, "rendezvous address for local workers"),
    ("master-port", int, "rendezvous port for local workers (default: a free one)"),
    ("threads-per-worker", int, "torch threads per worker (default: cores / local workers)"),
    ("timeout-s", float, "collective timeout: a worker silent this long ends the job with an error"),
    ("check-replicas-every", int, "check every k steps that all ranks hold identical parameters (0: off)"),
    ("seed", int, "seed of model init and data order"),
    ("run-dir", str, "where to write the run (default: runs/<time>-<model>-<data>-B<b>-P<p>-s<seed>)"),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other input error
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_train_options(p: argparse.ArgumentParser) -> None:
    from scalesgd.config import FIELDS

    p.add_argument("--config", metavar="FILE.toml", help="TOML file whose keys mirror these options; "
                   "options given on the command line win")
    for option, typ, help_text in TRAIN_OPTIONS:
        default = FIELDS[option.replace("-", "_")].default
        p.add_argument(f"--{option}", type=typ, default=argparse.SUPPRESS,
                       help=f"{help_text} (default: {default})")
    p.add_argument("--nesterov", action="store_true", default=argparse.SUPPRESS, help="Nesterov momentum")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bar")


def config_from_args(args: argparse.Namespace, option_names: Sequence[str] | None = None):
    """defaults < TOML file < command line → a validated RunConfig."""
    from scalesgd.config import FIELDS, RunConfig, config_from_mapping

    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            with open(path, "rb") as f:
                values.update(config_from_mapping(tomllib.load(f), source=str(path)))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found; check the path given to --config") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML ({e}); fix the line it names") from None
    for name in FIELDS:
        if name in vars(args):
            values[name] = getattr(args, name)
    try:
        return RunConfig(**values)
    except TypeError as e:  # a TOML value of the wrong type reaches a comparison
        raise ConfigError(f"invalid value in the configuration: {e}") from None


def cmd_train(args: argparse.Namespace) -> int:
    from scalesgd.distributed import torchrun_rendezvous
    from scalesgd.run import train

    cfg = config_from_args(args)
    summary = train(cfg)
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
    lines.append(f"run directory: {s['run_dir']}")
    print("\n".join(lines))


def cmd_diversity(args: argparse.Namespace) -> int:
    """Exact whole-data diversity along a training run, or at a saved checkpoint."""
    from scalesgd import plots
    from scalesgd.rundata import RunData

    if args.checkpoint:
        from scalesgd.run import diversity_at_checkpoint

        stats = diversity_at_checkpoint(Path(args.checkpoint))
        print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
        return 0
    from scalesgd.run import train

    cfg = config_from_args(args)
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scalesgd", description="Synchronous data-parallel minibatch SGD with gradient "
                     "diversity: how many workers, what batch size, what learning rate, how long.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("train", help="train a model with synchronous data-parallel SGD",
                       description="Train with P synchronous workers (spawned locally, or as torchrun's ranks).")
    add_train_options(p)
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

    from scalesgd import allreduce_bench, predict, sweep

    allreduce_bench.add_parser(sub)
    predict.add_parser(sub)
    sweep.add_parser(sub)
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
    except ScalesgdError as e:
        print(f"scalesgd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scalesgd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
