"""Measure this machine (compute curve, all-reduce α and β) and predict time to accuracy for larger clusters.

``scalesgd predict`` profiles fwd+bwd+update of the model at a few local batch sizes, measures (or takes
from ``--network``) the all-reduce cost, takes the diversity batch bound B_S and the passes needed at a
small batch (from ``--from-run RUN_DIR`` or the command line), and prints the :mod:`scalesgd.perf_model`
predictions over a grid of global batch sizes B and worker counts P, with plots and a recommendation.

Timing follows the trainer's layout on one host: one worker process per core, each with
``torch.set_num_threads(1)``; warm-up steps are excluded and medians reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from scalesgd import perf_model as pm
from scalesgd.comm import COMM_STRATEGIES, OUR_RINGS, RingAllReduce
from scalesgd.diversity import batch_bound_over_run
from scalesgd.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------------------
# Compute profile


@dataclass(frozen=True)
class ComputeProfile:
    """Median seconds per fwd+bwd+update at each local batch size, and the affine fit to them."""

    local_batch_sizes: tuple[int, ...]
    median_s: tuple[float, ...]
    fit: pm.ComputeFit
    threads: int


PROFILE_BLOCK_STEPS = 5  # timed steps per size before the next size takes its turn


def profile_compute(model: nn.Module, input_shape: Sequence[int], num_outputs: int,
                    batch_sizes: Sequence[int], steps: int = 20, *, warmup_steps: int = 3, threads: int = 1,
                    task: str = "classification", momentum: float = 0.9, weight_decay: float = 5e-4,
                    lr: float = 0.01, curve: str = "auto", seed: int = 0) -> ComputeProfile:
    """Median seconds of one training step without communication, at each local batch size.

    Runs the trainer's own :func:`scalesgd.step.train_step` on one process (the all-reduce is a no-op at
    P = 1), so the time covers exactly what the trainer labels ``compute_s + comm_s + update_s``:
    forward, sum-reduced loss, backward into the flat buffer, the statistics tail, and the SGD update
    (momentum and weight decay as the trainer's defaults). CPU, ``threads`` torch threads (restored
    afterwards). Sizes take turns in blocks of ``warmup_steps`` discarded + up to
    :data:`PROFILE_BLOCK_STEPS` timed steps until each has ``steps`` timings (interleaved, so load from
    other jobs biases no size in particular); the median per size is reported.

    Args:
        model: the network; it is re-laid out onto flat parameters and updated, so pass a fresh one.
        input_shape: one example's shape, without the batch axis.
        num_outputs: classes (classification) or regression outputs.
        batch_sizes: local batch sizes to profile (at least two distinct).
        steps: timed steps per size.
        curve: ``auto``, ``affine`` or ``piecewise`` (see :func:`scalesgd.perf_model.fit_compute`).
    Returns:
        :class:`ComputeProfile` with medians and the fitted :class:`~scalesgd.perf_model.ComputeFit`.
    """
    from scalesgd.comm import make_comm
    from scalesgd.models import loss_function
    from scalesgd.step import FlatModel, train_step
    from scalesgd.transforms import Hyper, sgd

    sizes = sorted({int(b) for b in batch_sizes})
    if len(sizes) < 2 or sizes[0] < 1:
        raise ConfigError(f"profile needs at least two distinct positive local batch sizes, got {list(batch_sizes)}")
    if steps < 1 or warmup_steps < 0 or threads < 1:
        raise ConfigError(f"profile needs steps >= 1, warm-up >= 0 and threads >= 1, got {steps}, "
                          f"{warmup_steps}, {threads}")
    gen = torch.Generator().manual_seed(seed)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.train()
        flat = FlatModel(model, 1, torch.device("cpu"))
        comm = make_comm("allreduce", world_size=1, rank=0)
        tx = sgd(momentum=momentum, weight_decay=weight_decay)
        tx_state = tx.init(flat.params)
        loss_fn = loss_function(task)
        classification = task == "classification"
        batches = {}
        for b in sizes:
            x = torch.randn((b, *input_shape), generator=gen)  # (b, *input_shape)
            if classification:
                y = torch.randint(0, num_outputs, (b,), generator=gen)  # (b,)
            else:
                y = torch.randn((b, num_outputs), generator=gen)  # (b, num_outputs)
            batches[b] = (x, y)
        times: dict[int, list[float]] = {b: [] for b in sizes}
        # Sizes take turns in short blocks, so a burst of load from other jobs lands on all of them alike
        # instead of inflating whichever size happened to be running. The first ``warmup_steps`` of each
        # block are discarded: they run with the caches the previous size left behind, which a trainer
        # repeating one size never sees.
        keep = min(steps, PROFILE_BLOCK_STEPS)
        step = 0
        while min(len(v) for v in times.values()) < steps:
            for b in sizes:
                x, y = batches[b]
                for i in range(warmup_steps + keep):
                    result, tx_state = train_step(flat=flat, loss_fn=loss_fn, x=x, y=y, global_batch_size=b,
                                                  shard_sizes=[b], rank=0, comm=comm, tx=tx, tx_state=tx_state,
                                                  hyper=Hyper(lr=lr, step=step), classification=classification)
                    step += 1
                    if i >= warmup_steps and len(times[b]) < steps:
                        times[b].append(result.compute_s + result.comm_s + result.update_s)
        medians = [statistics.median(times[b]) for b in sizes]
    finally:
        torch.set_num_threads(old_threads)
    fit = pm.fit_compute(sizes, medians, kind=curve)
    return ComputeProfile(local_batch_sizes=tuple(sizes), median_s=tuple(medians), fit=fit, threads=threads)


# ---------------------------------------------------------------------------------------------------------
# All-reduce α, β on this machine


@dataclass(frozen=True)
class AllreduceSweep:
    """Median seconds per gloo all-reduce at each message size, on ``world_size`` local processes."""

    sizes_bytes: tuple[int, ...]
    world_size: int
    median_s: tuple[float, ...]
    network: pm.Network


DEFAULT_SWEEP_BYTES = (4, 1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22)


def measure_allreduce(sizes_bytes: Sequence[int] = DEFAULT_SWEEP_BYTES, *, world_size: int = 2,
                      repeats: int = 20, warmup: int = 3, timeout_s: float = 300.0,
                      comm: str = "allreduce") -> AllreduceSweep:
    """Time the all-reduce of float32 buffers on ``world_size`` local gloo processes; fit α and β.

    The timings are ``allreduce-bench``'s (:func:`scalesgd.allreduce_bench.run_allreduce_bench`, one thread
    per process), so ``predict`` and the bench fit the same numbers.

    Args:
        sizes_bytes: message sizes in bytes, multiples of 4 (at least two distinct): small ones pin α, big ones β.
        world_size: local processes (2 on a 2-core box: one per core, like the trainer).
        repeats, warmup: timed and discarded samples per size (a sample of a small message is the mean of
            back-to-back calls).
        comm: the communication strategy timed (a name in :data:`scalesgd.comm.COMM_STRATEGIES`).
    Returns:
        :class:`AllreduceSweep` with the medians over samples of the slowest rank's time, and the fitted
        :class:`~scalesgd.perf_model.Network` (with the strategy's recursive-doubling threshold).
    """
    from scalesgd.allreduce_bench import run_allreduce_bench

    sizes = tuple(int(s) for s in sizes_bytes)
    if world_size < 2:
        raise ConfigError(f"measuring the all-reduce needs >= 2 workers, got {world_size}")
    rows = run_allreduce_bench([comm], sizes, [world_size], iters=repeats, warmup=warmup, threads=1,
                               timeout_s=timeout_s)
    medians = tuple(r["time_s"] for r in rows)
    alpha, beta = pm.fit_alpha_beta(sizes, [world_size] * len(sizes), medians,
                                    doubling_max_bytes=[r["doubling_max_bytes"] for r in rows])
    net = pm.Network(alpha_s=alpha, beta_s_per_byte=beta, doubling_max_bytes=rows[0]["doubling_p2_bytes"],
                     source=f"measured here: --comm {comm} on gloo, {world_size} local processes")
    return AllreduceSweep(sizes_bytes=sizes, world_size=world_size, median_s=medians, network=net)


# ---------------------------------------------------------------------------------------------------------
# Reading a measured run


@dataclass(frozen=True)
class RunFacts:
    """What a run directory says about statistical efficiency: B_S and the passes it needed at its batch."""

    batch_bound: float | None
    passes_to_target: float | None
    global_batch_size: int | None
    target_accuracy: float | None
    batch_bound_how: str = ""  # which estimator gave batch_bound, for the printout


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no} is not valid JSON ({e}); is the run directory complete?") from None
    return rows


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)  # JSON null (None), strings and NaN are not


def read_run(run_dir: str | Path) -> RunFacts:
    """B_S over the whole run and the passes to the target accuracy.

    B_S = 1 + Σ tr Σ̂ / Σ ‖G‖²̂ over the per-step estimates the diversity tap logged (``trace_cov_step``,
    ``grad_sq_norm_step``): numerator and denominator averaged over the run and the ratio taken last
    (REFERENCES §3), the trainer's own EMA with the whole run as its horizon. Runs that logged only the
    smoothed ``batch_bound_est`` give its median. The passes are the ``epoch`` of the first evaluation that
    reached ``target_accuracy`` (from summary.json, else config.json); None when the run never reached it.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.exists():
        raise DataError(f"{metrics_path} not found; --from-run needs a run directory written by `scalesgd train`")
    rows = _read_jsonl(metrics_path)
    steps = [r for r in rows if _finite_number(r.get("grad_sq_norm_step")) and _finite_number(r.get("trace_cov_step"))]
    batch_bound = batch_bound_over_run([r["grad_sq_norm_step"] for r in steps], [r["trace_cov_step"] for r in steps])
    how = f"1 + mean tr Sigma / mean |G|^2 over the run's {len(steps)} per-step estimates"
    if batch_bound is None:
        bounds = [float(r["batch_bound_est"]) for r in rows
                  if _finite_number(r.get("batch_bound_est")) and r["batch_bound_est"] > 1]
        batch_bound = float(np.median(bounds)) if bounds else None
        how = (f"median batch_bound_est of {len(bounds)} steps" if bounds else
               f"its {len(steps)} per-step estimates sum to |G|^2 <= 0: gradient noise swamps the signal, so "
               "B_S is beyond what the run measured; train longer or give --batch-bound" if steps else "")
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for name, target in (("summary.json", summary), ("config.json", config)):
        if (run_dir / name).exists():
            with open(run_dir / name) as f:
                target.update(json.load(f))
    target_acc = summary.get("target_accuracy", config.get("target_accuracy"))
    passes = None
    if target_acc is not None:
        for r in rows:
            acc = r.get("test_accuracy")
            if acc is not None and acc >= target_acc and r.get("epoch") is not None:
                passes = float(r["epoch"])
                break
    batch = config.get("global_batch_size")
    if batch is None:
        steps = [r for r in rows if r.get("global_batch_size") is not None]
        batch = steps[0]["global_batch_size"] if steps else None
    return RunFacts(batch_bound=batch_bound, passes_to_target=passes,
                    global_batch_size=int(batch) if batch is not None else None,
                    target_accuracy=float(target_acc) if target_acc is not None else None, batch_bound_how=how)


# ---------------------------------------------------------------------------------------------------------
# Plots


def plot_predictions(table: Sequence[pm.Prediction], out_dir: Path) -> list[Path]:
    """Two PNGs: time to accuracy vs B for several P, and vs P for several B (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    batch_sizes = sorted({r.global_batch_size for r in table})
    workers = sorted({r.workers for r in table})

    def pick(values: list[int], k: int = 6) -> list[int]:
        if len(values) <= k:
            return values
        idx = np.unique(np.round(np.linspace(0, len(values) - 1, k)).astype(int))
        return [values[i] for i in idx]

    by_key = {(r.global_batch_size, r.workers): r for r in table}

    def figure(lines: dict[str, list[tuple[float, float]]], xlabel: str, title: str, name: str) -> Path:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for label, pts in lines.items():
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="predicted time to accuracy (s)", title=title)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        return out_dir / name

    paths = [
        figure({f"P = {p}": [(b, by_key[b, p].time_to_accuracy_s) for b in batch_sizes if (b, p) in by_key]
                for p in pick(workers)}, "global batch size B", "Time to accuracy vs batch size",
               "time_to_accuracy_vs_batch.png"),
        figure({f"B = {b}": [(p, by_key[b, p].time_to_accuracy_s) for p in workers if (b, p) in by_key]
                for b in pick(batch_sizes)}, "workers P", "Time to accuracy vs workers",
               "time_to_accuracy_vs_workers.png"),
    ]
    return paths


def write_table(table: Sequence[pm.Prediction], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        fields = list(asdict(table[0]).keys()) + ["worker_seconds"]
        w.writerow(fields)
        for r in table:
            w.writerow(list(asdict(r).values()) + [r.worker_seconds])


# ---------------------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``predict`` on the CLI's subparsers; ``set_defaults(func=cmd_predict)``."""
    from scalesgd.models import MODELS

    p = subparsers.add_parser(
        "predict", help="predict time per pass, passes and time to accuracy for up to 1024 workers",
        description="Profile this machine (compute at a few local batch sizes, all-reduce alpha/beta), "
                    "then predict time to accuracy = (n/B)*T_step(B,P) * passes(B) over a (B, P) grid, with "
                    "T_step = T_compute(ceil(B/P)) + 2(P-1)alpha + 2(P-1)/P*N*beta and "
                    "passes(B) = passes_min*(1 + B/(B_S-1)).")
    p.add_argument("--model", default="cnn1d", choices=sorted(MODELS), help="model (default: cnn1d)")
    p.add_argument("--dataset", default="mnist1d", help="data set spec, for input shape, n and outputs "
                   "(default: mnist1d)")
    p.add_argument("--n-train", type=int, default=None, help="training examples (default: the data set's)")
    p.add_argument("--width", type=int, default=None, help="model width (default: the model's own)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--norm", default="none")
    p.add_argument("--network", default=None, metavar="'BW, LATENCY'",
                   help="target network, e.g. '25 Gbit/s, 10 us' (default: measured here with gloo)")
    p.add_argument("--comm", default="allreduce", choices=sorted(COMM_STRATEGIES),
                   help="communication strategy: its alpha and beta are measured here when --network is not "
                        "given, and ring/ring-tcp are modelled with their recursive doubling for small messages "
                        "(default: allreduce)")
    p.add_argument("--batch-sizes", type=_int_list, default=[2 ** k for k in range(4, 17)],
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
    p.add_argument("--profile-batch-sizes", type=_int_list, default=[8, 32, 128, 512, 2048],
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
    p.set_defaults(func=cmd_predict)
    return p


def _statistical_inputs(args: argparse.Namespace) -> tuple[float, float, str]:
    """(B_S, passes_min, description) from the command line and/or a run directory."""
    facts = read_run(args.from_run) if args.from_run else None
    batch_bound = args.batch_bound if args.batch_bound is not None else (facts.batch_bound if facts else None)
    bound_how = "command line" if args.batch_bound is not None else (facts.batch_bound_how if facts else "")
    if batch_bound is None and facts is not None and facts.batch_bound_how:
        raise ConfigError(f"--from-run {args.from_run}: no diversity batch bound B_S: {facts.batch_bound_how}")
    if batch_bound is None:
        raise ConfigError("predict needs the diversity batch bound B_S: pass --batch-bound (from a run's "
                          "batch_bound_est) or --from-run RUN_DIR of a run trained with --diversity cheap")
    batch_crit = pm.batch_crit_from_bound(batch_bound)
    if args.passes_at_small_batch is not None:
        passes, batch, where = args.passes_at_small_batch, args.small_batch_size, "command line"
    elif facts is not None and facts.passes_to_target is not None and facts.global_batch_size:
        passes, batch, where = facts.passes_to_target, facts.global_batch_size, str(args.from_run)
    else:
        raise ConfigError("predict needs the passes to the target at a small batch: pass "
                          "--passes-at-small-batch P --small-batch-size B, or --from-run RUN_DIR of a run "
                          "trained with --target-accuracy that reached its target")
    passes_min = pm.passes_min_from_measurement(passes, batch, batch_crit)
    return batch_bound, passes_min, f"{passes:.3g} passes at B={batch} ({where}), B_S={batch_bound:.4g} ({bound_how})"


def cmd_predict(args: argparse.Namespace) -> int:
    """The ``predict`` subcommand: measure, predict, print, plot."""
    from scalesgd.data import load_dataset
    from scalesgd.models import DEFAULT_WIDTH, MODELS, count_parameters

    if args.max_workers < 1:
        raise ConfigError(f"--max-workers must be >= 1, got {args.max_workers}")
    network = pm.parse_network(args.network) if args.network else None  # fail fast on a bad string
    if network is not None:
        # our rings switch to recursive doubling for small messages on any network; the built-in is a ring
        doubling = RingAllReduce.DOUBLING_P2_BYTES if args.comm in OUR_RINGS else 0
        network = replace(network, doubling_max_bytes=doubling)
    batch_bound, passes_min, stat_source = _statistical_inputs(args)
    ds = load_dataset(args.dataset, n_train=args.n_train)
    width = args.width if args.width is not None else DEFAULT_WIDTH[args.model]
    torch.manual_seed(args.seed)
    try:
        model = MODELS[args.model](input_shape=ds.input_shape, num_outputs=ds.num_outputs, width=width,
                                   dropout=args.dropout, norm=args.norm)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    grad_bytes = 4 * count_parameters(model)
    prof = profile_compute(model, ds.input_shape, ds.num_outputs, args.profile_batch_sizes, args.profile_steps,
                           task=ds.task, curve=args.compute_curve, seed=args.seed)
    print(f"compute profile ({args.model}, {count_parameters(model):,} parameters, 1 thread): " + ", ".join(
        f"b={b}: {pm.format_seconds(t)}" for b, t in zip(prof.local_batch_sizes, prof.median_s)))
    print(f"  compute curve: {prof.fit.describe()}")
    sweep = None
    if network is None:
        sweep = measure_allreduce(comm=args.comm)
        network = sweep.network
    print(f"network: {network.describe()}; gradient {grad_bytes:,} bytes")
    print(f"statistics: {stat_source} -> passes_min {passes_min:.3g}")
    workers = [2 ** k for k in range(int(math.log2(args.max_workers)) + 1)]
    if workers[-1] != args.max_workers:
        workers.append(args.max_workers)
    table = pm.predict_grid(args.batch_sizes, workers, n_train=ds.n_train, compute=prof.fit, network=network,
                            grad_bytes=grad_bytes, passes_min=passes_min,
                            batch_crit=pm.batch_crit_from_bound(batch_bound), overhead_s=args.overhead_s)
    print(pm.format_table(table))
    rec = pm.recommend(table, tolerance=args.tolerance)
    print(pm.format_recommendation(rec))
    print("all-reduce of the gradient, as modelled: " + ", ".join(
        f"{pm.allreduce_algorithm(grad_bytes, p, network)} at P={p}"
        for p in dict.fromkeys((rec.fastest.workers, rec.cheapest.workers))))
    if args.out:
        out = Path(args.out)
        write_table(table, out / "predictions.csv")
        info = {
            "model": args.model, "dataset": args.dataset, "n_train": ds.n_train, "grad_bytes": grad_bytes,
            "compute_profile": {"local_batch_sizes": prof.local_batch_sizes, "median_s": prof.median_s,
                                "t0_s": prof.fit.t0_s, "t1_s": prof.fit.t1_s,
                                "max_rel_err": prof.fit.max_rel_err, "threads": prof.threads,
                                "kind": prof.fit.kind, "knots_b": prof.fit.knots_b, "knots_s": prof.fit.knots_s},
            "network": asdict(network),
            "allreduce_sweep": None if sweep is None else {"sizes_bytes": sweep.sizes_bytes,
                                                           "world_size": sweep.world_size,
                                                           "median_s": sweep.median_s},
            "batch_bound": batch_bound, "passes_min": passes_min, "overhead_s": args.overhead_s,
            "recommendation": {"tolerance": rec.tolerance, "fastest": asdict(rec.fastest),
                               "cheapest": asdict(rec.cheapest)},
        }
        with open(out / "prediction.json", "w") as f:
            json.dump(info, f, indent=2)
        for path in plot_predictions(table, out):
            print(f"plot: {path}")
        print(f"table: {out / 'predictions.csv'}")
    return 0
