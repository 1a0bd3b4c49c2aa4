"""Measure this machine (compute curve, all-reduce α and β) and predict time to accuracy for larger clusters.

``scalesgd predict`` profiles fwd+bwd+update of the model at a few local batch sizes, measures (or takes
from ``--network``) the all-reduce cost, takes the diversity batch bound B_S and the passes needed at a
small batch (from ``--from-run RUN_DIR`` or the command line), and prints the :mod:`scalesgd.perf_model`
predictions over a grid of global batch sizes B and worker counts P, with plots and a recommendation; at the
recommended worker counts it also prints the global batch ``--batch-policy goodput`` converges to
(:func:`goodput_batch`: the trainer's own step-time fit and goodput maximiser, :mod:`scalesgd.goodput`).

Timing follows the trainer's layout on one host: one worker process per core, each with
``torch.set_num_threads(1)``; warm-up steps are excluded and medians reported.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from scalesgd import goodput as gp
from scalesgd import perf_model as pm
from scalesgd.comm import strategy_info
from scalesgd.comm_registry import AUTO, resolve_comm
from scalesgd.diversity import batch_bound_over_run
from scalesgd.errors import ConfigError
from scalesgd.rundata import RunData, finite, passes_to_target
from scalesgd.stragglers import parse_straggler
from scalesgd.writer import atomic_path, check_output_dir, write_json_atomic

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
                    lr: float = 0.01, curve: str = "auto", seed: int = 0,
                    sample: Callable[[int], tuple[Any, torch.Tensor]] | None = None,
                    loss_fn: Callable | None = None) -> ComputeProfile:
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
        sample: ``sample(b) -> (inputs, targets)``, a batch of b real examples (what a user's model takes: token
            ids, dicts); None draws Gaussian inputs of ``input_shape`` and random targets.
        loss_fn: the sum-reduced loss; None: the task's built-in one.
        curve: ``auto``, ``affine`` or ``piecewise`` (see :func:`scalesgd.perf_model.fit_compute`).
    Returns:
        :class:`ComputeProfile` with medians and the fitted :class:`~scalesgd.perf_model.ComputeFit`.
    """
    from scalesgd.comm import make_comm
    from scalesgd.distributed import World
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
        comm = make_comm("allreduce", World(rank=0, size=1, local_rank=0, device=torch.device("cpu"),
                                            backend="gloo"))
        tx = sgd(momentum=momentum, weight_decay=weight_decay)
        tx_state = tx.init(flat.params)
        loss_fn = loss_fn if loss_fn is not None else loss_function(task)
        classification = task == "classification"
        batches = {}
        for b in sizes:
            if sample is not None:
                batches[b] = sample(b)
                continue
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
        world_size: local processes (one per core, like the trainer).
        repeats, warmup: timed and discarded samples per size (a sample of a small message is the mean of
            back-to-back calls).
        comm: the communication strategy timed (a name in :data:`scalesgd.comm_registry.COMM_NAMES`).
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


def read_run(run_dir: str | Path, target: float | None = None) -> RunFacts:
    """B_S over the whole run and the passes to the target accuracy.

    B_S = 1 + Σ tr Σ̂ / Σ ‖G‖²̂ over the per-step estimates the diversity tap logged (``trace_cov_step``,
    ``grad_sq_norm_step``): numerator and denominator averaged over the run and the ratio taken last,
    the trainer's own EMA with the whole run as its horizon. Runs that logged only the
    smoothed ``batch_bound_est`` give its median. The passes to ``target_accuracy`` (from summary.json,
    else config.json) on the run's ``target_metric`` are :func:`scalesgd.rundata.passes_to_target`'s,
    interpolated between evaluations; None when the run never reached it. ``target`` given: the passes to
    that accuracy instead, from the same evaluations (a run trained without a target has them too).

    Raises:
        DataError: ``run_dir`` is not a run directory, or one of its files is damaged (one line naming it).
    """
    run = RunData.open(run_dir)
    rows = run.records
    steps = [r for r in rows if finite(r.get("grad_sq_norm_step")) and finite(r.get("trace_cov_step"))]
    batch_bound = batch_bound_over_run([r["grad_sq_norm_step"] for r in steps], [r["trace_cov_step"] for r in steps])
    how = f"1 + mean tr Sigma / mean |G|^2 over the run's {len(steps)} per-step estimates"
    if batch_bound is None:
        bounds = [float(r["batch_bound_est"]) for r in rows
                  if finite(r.get("batch_bound_est")) and r["batch_bound_est"] > 1]
        batch_bound = float(np.median(bounds)) if bounds else None
        how = (f"median batch_bound_est of {len(bounds)} steps" if bounds else
               f"its {len(steps)} per-step estimates sum to |G|^2 <= 0: gradient noise swamps the signal, so "
               "B_S is beyond what the run measured; train longer or give --batch-bound" if steps else "")
    summary, config = run.summary or {}, run.config
    target_acc = target if target is not None else summary.get("target_accuracy", config.get("target_accuracy"))
    passes = None
    if target_acc is not None:
        hit = passes_to_target(run.evals, config.get("target_metric", "test_accuracy"), target_acc)
        passes = hit.passes if hit is not None else None
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

    from scalesgd.plots import save_figure

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
        return save_figure(fig, out_dir / name, dpi=120)

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
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        fields = list(asdict(table[0]).keys()) + ["worker_seconds"]
        w.writerow(fields)
        for r in table:
            w.writerow(list(asdict(r).values()) + [r.worker_seconds])


def goodput_batch(prof: ComputeProfile, *, workers: int, network: pm.Network, grad_bytes: float,
                  batch_bound: float, n_train: int, base_batch_size: int, overhead_s: float = 0.0
                  ) -> tuple[gp.GoodputChoice, gp.StepTimeModel]:
    """The global batch ``--batch-policy goodput`` converges to on P = ``workers`` of these machines.

    The same model as the trainer's policy: :func:`scalesgd.goodput.fit_step_time` fitted to the profiled
    medians (each one a timed step at its local batch, the modelled all-reduce of the gradient at P as its
    communication time), B_noise = B_S − 1, and :func:`scalesgd.goodput.choose_global_batch` over the
    multiples of P up to n_train (the policy's cap; it walks there by at most 2× per change).

    Returns:
        (the choice, the step-time model it maximised over).
    """
    comm_s = float(pm.allreduce_time(grad_bytes, workers, network))
    state = gp.StepTimeState()
    for i, (b, t) in enumerate(zip(prof.local_batch_sizes, prof.median_s)):
        state = gp.update_step_times(state, local_batch_size=b, world_size=workers, compute_s=t + overhead_s,
                                     comm_s=comm_s, step=i, max_bins=max(len(prof.local_batch_sizes), 1))
    model = gp.fit_step_time(state, step=len(prof.local_batch_sizes))
    choice = gp.choose_global_batch(model=model, b_noise=pm.batch_crit_from_bound(batch_bound), world_size=workers,
                                    base_batch_size=base_batch_size, min_batch=workers, max_batch=max(n_train, workers))
    return choice, model


# ---------------------------------------------------------------------------------------------------------
# Command line


def statistical_inputs(*, batch_bound: float | None, passes_at_small_batch: float | None,
                       small_batch_size: int, from_run: str | Path | None,
                       target: float | None = None) -> tuple[float, float, str]:
    """(B_S, passes_min, description) from the given numbers and/or a run directory (given numbers win).

    passes_min = passes(B) / (1 + B/(B_S − 1)) (:func:`scalesgd.perf_model.passes_min_from_measurement`).

    Raises:
        ConfigError: B_S or the passes are neither given nor in the run; the message names the options.
            ``target`` (the accuracy whose passes ``from_run`` gives) without ``from_run``, or outside (0, 1].
    """
    if target is not None and (not from_run or not 0 < target <= 1):
        raise ConfigError(f"--target {target:g} needs --from-run RUN_DIR and an accuracy in (0, 1]: it reads the "
                          "passes to that accuracy from the run's evaluations")
    facts = read_run(from_run, target=target) if from_run else None
    given_bound = batch_bound
    batch_bound = given_bound if given_bound is not None else (facts.batch_bound if facts else None)
    bound_how = "command line" if given_bound is not None else (facts.batch_bound_how if facts else "")
    if batch_bound is None and facts is not None and facts.batch_bound_how:
        raise ConfigError(f"--from-run {from_run}: no diversity batch bound B_S: {facts.batch_bound_how}")
    if batch_bound is None:
        raise ConfigError("predict needs the diversity batch bound B_S: pass --batch-bound (from a run's "
                          "batch_bound_est) or --from-run RUN_DIR of a run trained with --diversity cheap")
    batch_crit = pm.batch_crit_from_bound(batch_bound)
    if passes_at_small_batch is not None:
        passes, batch, where = passes_at_small_batch, small_batch_size, "command line"
    elif facts is not None and facts.passes_to_target is not None and facts.global_batch_size:
        passes, batch, where = facts.passes_to_target, facts.global_batch_size, str(from_run)
    elif facts is not None:  # the run cannot say: say why, and how to get the passes from it
        why = ("was trained without --target-accuracy" if facts.target_accuracy is None else
               f"never reached its target {facts.target_accuracy:g}")
        raise ConfigError(f"--from-run {from_run} {why}, so it has no passes to a target: give --target ACC (an "
                          "accuracy its evaluations reach), re-run it with --target-accuracy ACC, or give "
                          f"--passes-at-small-batch P --small-batch-size {facts.global_batch_size or 'B'}")
    else:
        raise ConfigError("predict needs the passes to the target at a small batch: pass "
                          "--passes-at-small-batch P --small-batch-size B, or --from-run RUN_DIR of a run "
                          "trained with --target-accuracy that reached its target")
    passes_min = pm.passes_min_from_measurement(passes, batch, batch_crit)
    return batch_bound, passes_min, f"{passes:.3g} passes at B={batch} ({where}), B_S={batch_bound:.4g} ({bound_how})"


def model_config(from_run: str | Path | None, *, model: str | None, dataset: str | None, n_train: int | None,
                 width: int | None, dropout: float | None, norm: str | None, seed: int) -> Any:
    """The :class:`~scalesgd.config.RunConfig` whose model and data ``predict`` profiles.

    With ``from_run``, the run's own config (what it trained: import strings, loss and model options); an
    option given here must agree with it. Without, the options given here over the defaults.

    Raises:
        ConfigError: an option contradicts the run's config, or the run directory has no config.json.
    """
    from scalesgd.config import FIELDS, RunConfig

    given = {"model": model, "dataset": dataset, "n_train": n_train, "width": width, "dropout": dropout,
             "norm": norm}
    given = {k: v for k, v in given.items() if v is not None}
    if from_run is None:
        return RunConfig(**given, global_batch_size=1, workers=1, seed=seed)
    run_config = RunData.open(from_run).config
    if not run_config:
        raise ConfigError(f"--from-run {from_run}: no config.json; pass a run directory written by `scalesgd train`")
    for key, value in given.items():
        if key in run_config and run_config[key] != value:
            option = "--" + key.replace("_", "-")
            raise ConfigError(f"--from-run {from_run} trained {key} {run_config[key]!r}, but {option} {value!r} was "
                              f"given; leave {option} out (the run's own is profiled) or pick another run")
    known = {k: v for k, v in run_config.items() if k in FIELDS and k != "extra"}
    known["lr_milestones"] = tuple(known.get("lr_milestones", ()))
    return RunConfig(**known)


def predict(*, model: str | None = None, dataset: str | None = None, n_train: int | None = None,
            width: int | None = None, dropout: float | None = None, norm: str | None = None, network: str | None = None,
            comm: str = "auto", batch_sizes: Sequence[int] = tuple(2 ** k for k in range(4, 17)),
            max_workers: int = 1024, batch_bound: float | None = None, passes_at_small_batch: float | None = None,
            small_batch_size: int = 32, from_run: str | Path | None = None, target: float | None = None,
            profile_batch_sizes: Sequence[int] = (8, 32, 128, 512, 2048), profile_steps: int = 20,
            compute_curve: str = "auto", overhead_s: float = 0.0, tolerance: float = 0.10, seed: int = 0,
            out: str | Path | None = None, straggler: str | None = None, sync_every: int = 1,
            passes_vs_h: str | None = None) -> int:
    """Measure this machine, predict time to accuracy over a (B, P) grid, print it, and write it to ``out``.

    time to accuracy = (n/B)·T_step(B, P)·passes(B), T_step = T_compute(⌈B/P⌉) + T_allreduce(N, P) + overhead,
    passes(B) = passes_min·(1 + B/(B_S − 1)) (:mod:`scalesgd.perf_model`).

    Args:
        model, dataset, n_train, width, dropout, norm: what is profiled (the data set gives the input shape,
            n and the outputs); None: the built-in defaults (cnn1d on mnist1d), or with ``from_run`` the run's
            own model and data (its config.json, import strings and loss included). With ``from_run`` a value
            that contradicts the run's is an error.
        network: the target network, e.g. ``"25 Gbit/s, 10 us"``; None measures ``comm`` here.
        comm: the communication strategy measured or modelled (our rings add recursive doubling); ``auto``:
            the ``from_run`` run's own (its config.json's ``comm_used``: what ``auto`` resolved to), else what
            ``scalesgd train`` runs on CPU workers (``ring-tcp``) when the network is measured here, and the
            built-in all-reduce on a given ``network`` (a cluster's engine collective, NCCL's on GPUs).
        batch_sizes: global batch sizes of the grid; ``max_workers``: P = 1, 2, 4, … up to it.
        batch_bound, passes_at_small_batch, small_batch_size, from_run, target: the statistics
            (see :func:`statistical_inputs`).
        profile_batch_sizes, profile_steps, compute_curve: the compute profile (:func:`profile_compute`).
        overhead_s: fixed seconds added per step; tolerance: how much slower the cheapest recommendation
            may be than the fastest; seed: model init and profile data.
        out: directory for predictions.csv, prediction.json and the plots (None: print only).
        straggler: injected delays priced into every step (``--straggler`` spec, :mod:`scalesgd.stragglers`).
        sync_every: local SGD's averaging period H (1: synchronous): compute waits per period, the
            all-reduce costs 1/H per step.
        passes_vs_h: local SGD's measured passes to accuracy against H (``"1:4.2,4:4.4,16:5.1"``): passes at
            ``sync_every`` are the synchronous ones times passes(H)/passes(1)
            (:func:`scalesgd.perf_model.local_sgd_passes_factor`), and for the fastest (B, P) every H of the
            curve is priced and the fastest recommended (:func:`scalesgd.perf_model.recommend_sync_every`).
    Returns:
        0 (the exit code).
    Raises:
        ConfigError: bad input, with the option to fix.
    """
    from scalesgd.data import load_data
    from scalesgd.models import count_parameters
    from scalesgd.user_code import build_run_model, loss_for

    if max_workers < 1:
        raise ConfigError(f"--max-workers must be >= 1, got {max_workers}")
    check_output_dir(out, "--out")  # before the minutes of profiling, not after
    if not isinstance(sync_every, int) or sync_every < 1:
        raise ConfigError(f"--sync-every must be a positive integer, got {sync_every!r}")
    straggler_spec = parse_straggler(straggler)
    curve = pm.parse_passes_curve(passes_vs_h) if passes_vs_h else None
    passes_factor = pm.local_sgd_passes_factor(sync_every, curve) if curve else 1.0
    network = pm.parse_network(network) if network else None  # fail fast on a bad string
    cfg = model_config(from_run, model=model, dataset=dataset, n_train=n_train, width=width, dropout=dropout,
                       norm=norm, seed=seed)
    if comm == AUTO:
        run_comm = (RunData.open(from_run).config.get("comm_used") or cfg.comm) if from_run else AUTO
        # measured here: what the trainer resolves auto to for CPU workers on this machine (gloo, several)
        here = resolve_comm(AUTO, backend="gloo", device_type="cpu", world_size=2)
        comm = run_comm if run_comm != AUTO else ("allreduce" if network is not None else here)
    if network is not None:
        # our rings switch to recursive doubling for small messages on any network; the built-in is a ring
        doubling = strategy_info(comm).doubling_p2_bytes
        network = replace(network, doubling_max_bytes=doubling)
    batch_bound, passes_min, stat_source = statistical_inputs(
        batch_bound=batch_bound, passes_at_small_batch=passes_at_small_batch, small_batch_size=small_batch_size,
        from_run=from_run, target=target)
    model, dataset = cfg.model, cfg.dataset
    ds = load_data(cfg)
    net = build_run_model(cfg, input_shape=ds.input_shape, num_outputs=ds.num_outputs)
    grad_bytes = 4 * count_parameters(net)
    grid = [b for b in batch_sizes if b <= ds.n_train]
    if not grid:
        raise ConfigError(f"every --batch-sizes value exceeds the training set ({ds.n_train} examples); predict "
                          f"batch sizes of at most {ds.n_train}")
    batch_sizes = grid  # a global batch cannot exceed the training set

    def sample(b: int) -> tuple[Any, torch.Tensor]:  # b real examples, wrapping around a small training set
        return ds.train_batch(torch.arange(b) % ds.n_train)

    prof = profile_compute(net, ds.input_shape, ds.num_outputs, profile_batch_sizes, profile_steps,
                           task=ds.task, curve=compute_curve, seed=seed, sample=sample,
                           loss_fn=loss_for(cfg.loss, ds.task))
    print(f"compute profile ({model}, {count_parameters(net):,} parameters, 1 thread): " + ", ".join(
        f"b={b}: {pm.format_seconds(t)}" for b, t in zip(prof.local_batch_sizes, prof.median_s)))
    print(f"  compute curve: {prof.fit.describe()}")
    sweep = None
    if network is None:
        sweep = measure_allreduce(comm=comm)
        network = sweep.network
    print(f"network: {network.describe()}; gradient {grad_bytes:,} bytes")
    print(f"statistics: {stat_source} -> passes_min {passes_min:.3g}")
    if straggler_spec is not None or sync_every > 1:
        print(f"delays: {straggler_spec.describe() if straggler_spec else 'none'}, parameters averaged every "
              f"{sync_every} step(s); passes to accuracy are the synchronous ones"
              + (f" x {passes_factor:.3g} (passes(H={sync_every})/passes(1) of --passes-vs-h)" if curve else ""))
    workers = [2 ** k for k in range(int(math.log2(max_workers)) + 1)]
    if workers[-1] != max_workers:
        workers.append(max_workers)
    table = pm.predict_grid(batch_sizes, workers, n_train=ds.n_train, compute=prof.fit, network=network,
                            grad_bytes=grad_bytes, passes_min=passes_min,
                            batch_crit=pm.batch_crit_from_bound(batch_bound), overhead_s=overhead_s,
                            straggler=straggler_spec, sync_every=sync_every, passes_factor=passes_factor)
    print(pm.format_table(table))
    rec = pm.recommend(table, tolerance=tolerance)
    print(pm.format_recommendation(rec))
    by_h = None
    # H is chosen where it matters: at one worker averaging is a no-op (every H is synchronous SGD), so at the
    # fastest configuration with several workers
    several = [r for r in table if r.workers > 1]
    if curve and not several:
        print("local SGD: every configuration has one worker, where --sync-every changes nothing")
    elif curve:
        f = rec.fastest if rec.fastest.workers > 1 else min(several, key=lambda r: r.time_to_accuracy_s)
        by_h = pm.recommend_sync_every(f.global_batch_size, f.workers, curve=curve, n_train=ds.n_train,
                                       compute=prof.fit, network=network, grad_bytes=grad_bytes,
                                       passes=f.passes / passes_factor, overhead_s=overhead_s,
                                       straggler=straggler_spec)
        print(f"local SGD at B={f.global_batch_size}, P={f.workers}, over the measured periods: " + "; ".join(
            f"H={h}: {pm.format_seconds(tta)} ({passes:.3g} passes)" for h, _, passes, tta in sorted(by_h)))
        print(f"recommended --sync-every {by_h[0][0]} ({pm.format_seconds(by_h[0][3])} to accuracy)")
    goodput = {}
    for p in dict.fromkeys((rec.fastest.workers, rec.cheapest.workers)):
        choice, step_model = goodput_batch(prof, workers=p, network=network, grad_bytes=grad_bytes, batch_bound=batch_bound,
                                      n_train=ds.n_train, base_batch_size=small_batch_size, overhead_s=overhead_s)
        goodput[p] = choice
        print(f"--batch-policy goodput at P={p} converges to B={choice.global_batch_size} (step "
              f"{pm.format_seconds(choice.step_time_s)}, statistical efficiency {choice.efficiency:.3g} vs "
              f"B0={small_batch_size}; {step_model.describe()})")
    print("all-reduce of the gradient, as modelled: " + ", ".join(
        f"{pm.allreduce_algorithm(grad_bytes, p, network)} at P={p}"
        for p in dict.fromkeys((rec.fastest.workers, rec.cheapest.workers))))
    if out:
        out = Path(out)
        write_table(table, out / "predictions.csv")
        info = {
            "model": model, "dataset": dataset, "n_train": ds.n_train, "grad_bytes": grad_bytes,
            "compute_profile": {"local_batch_sizes": prof.local_batch_sizes, "median_s": prof.median_s,
                                "t0_s": prof.fit.t0_s, "t1_s": prof.fit.t1_s,
                                "max_rel_err": prof.fit.max_rel_err, "threads": prof.threads,
                                "kind": prof.fit.kind, "knots_b": prof.fit.knots_b, "knots_s": prof.fit.knots_s},
            "network": asdict(network),
            "allreduce_sweep": None if sweep is None else {"sizes_bytes": sweep.sizes_bytes,
                                                           "world_size": sweep.world_size,
                                                           "median_s": sweep.median_s},
            "batch_bound": batch_bound, "passes_min": passes_min, "overhead_s": overhead_s,
            "straggler": straggler_spec.describe() if straggler_spec else None, "sync_every": sync_every,
            "passes_vs_h": {str(h): v for h, v in curve.items()} if curve else None,
            "sync_every_recommendation": None if by_h is None else [
                {"sync_every": h, "time_per_pass_s": tpp, "passes": passes, "time_to_accuracy_s": tta}
                for h, tpp, passes, tta in by_h],
            "recommendation": {"tolerance": rec.tolerance, "fastest": asdict(rec.fastest),
                               "cheapest": asdict(rec.cheapest)},
            "goodput": {str(p): asdict(c) for p, c in goodput.items()},
        }
        write_json_atomic(out / "prediction.json", info)
        for path in plot_predictions(table, out):
            print(f"plot: {path}")
        print(f"table: {out / 'predictions.csv'}")
    return 0
