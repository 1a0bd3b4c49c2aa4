"""The thin training loop: build, step, evaluate, adapt, write. No maths of its own.

:func:`train` is what ``scalesgd train`` calls: it spawns local workers (or, under torchrun, runs as the
rank torchrun made) and returns rank 0's summary. :func:`worker` is one rank's whole job.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scalesgd import distributed
from scalesgd.comm import comm_settings, make_comm
from scalesgd.config import RunConfig, check_against_data
from scalesgd.data import Dataset, load_dataset
from scalesgd.data.sharding import BatchStream, Cursor, shard
from scalesgd.diversity import gradient_diversity
from scalesgd.distributed import Rendezvous, World
from scalesgd.errors import ConfigError, DivergedError, DistributedError
from scalesgd.batch_policy import BatchPolicy, StepObservation, make_batch_policy
from scalesgd.lr_rules import LrConfig, lr_terms
from scalesgd.models import DEFAULT_WIDTH, MODELS
from scalesgd.step import FlatModel, evaluate, train_step
from scalesgd.tracking import DiversityTracker
from scalesgd.transforms import Hyper, sgd
from scalesgd.writer import RunWriter, check_run_dir_is_new, default_run_dir, environment


def load_data(cfg: RunConfig) -> Dataset:
    """The data set a config names, checked against the batch size."""
    options = {k: v for k, v in (("n_train", cfg.n_train), ("seed", cfg.data_seed), ("dim", cfg.dim),
                                 ("noise", cfg.noise)) if v is not None}
    ds = load_dataset(cfg.dataset, replicate=cfg.replicate, **options)
    check_against_data(cfg, ds.n_train)
    return ds


def build_model(cfg: RunConfig, ds: Dataset, seed: int) -> nn.Module:
    """The model of ``cfg`` for ``ds``, initialised from ``seed`` (the same on every rank)."""
    torch.manual_seed(seed)
    width = cfg.width if cfg.width is not None else DEFAULT_WIDTH[cfg.model]
    kwargs: dict[str, Any] = dict(input_shape=ds.input_shape, num_outputs=ds.num_outputs, width=width,
                                  dropout=cfg.dropout, norm=cfg.norm)
    if cfg.model == "mlp":
        kwargs["depth"] = cfg.depth
    return MODELS[cfg.model](**kwargs)


def loss_function(task: str, reduction: str = "sum"):
    """The loss of ``task``: ``reduction="sum"`` gives Σᵢ ℓᵢ (the convention of :mod:`scalesgd.step`),
    ``"none"`` the per-example losses (B,) that :mod:`scalesgd.diversity` wants."""
    if task == "classification":
        return lambda out, y: nn.functional.cross_entropy(out, y, reduction=reduction)
    if reduction == "none":
        return lambda out, y: 0.5 * (out - y).pow(2).reshape(out.shape[0], -1).sum(1)
    return lambda out, y: 0.5 * nn.functional.mse_loss(out, y, reduction="sum")


def measure_exact_diversity(model: nn.Module, ds: Dataset, world: World) -> dict[str, float]:
    """Exact Δ_S, M2, ‖∇F‖² and B_S over the whole training set at the current weights; every rank streams
    its contiguous part of the data and the sums are all-reduced (Yin et al. 2018)."""
    part = torch.tensor_split(torch.arange(ds.n_train), world.size)[world.rank]
    x, y = ds.x_train[part].to(world.device), ds.y_train[part].to(world.device)
    stats = gradient_diversity(model, loss_function(ds.task, "none"), x, y, world=world, batch_size=1024)
    return {"delta": stats.delta, "m2": stats.m2, "mean_grad_sq_norm": stats.mean_grad_sq_norm,
            "trace_cov": stats.trace_cov, "batch_bound": stats.batch_bound, "b_simple": stats.b_simple,
            "n": stats.n}


def lr_config(cfg: RunConfig) -> LrConfig:
    """The learning-rate rule and base schedule of ``cfg`` (cosine spans the whole run)."""
    return LrConfig(base_lr=cfg.lr, base_batch_size=cfg.base_batch_size or cfg.global_batch_size,
                    rule=cfg.lr_rule, schedule=cfg.lr_schedule, warmup_epochs=cfg.warmup_epochs,
                    total_steps=cfg.steps if cfg.lr_schedule == "cosine" and cfg.steps else None,
                    total_epochs=cfg.epochs if cfg.lr_schedule == "cosine" and not cfg.steps else None,
                    milestone_epochs=cfg.lr_milestones if cfg.lr_schedule == "step" else (),
                    gamma=cfg.lr_gamma)


def batch_policy(cfg: RunConfig, n_train: int) -> BatchPolicy:
    """The batch-size policy of ``cfg``; the diversity policy never asks for more than the data set.

    Without ``--min-batch`` the diversity policy's floor is the starting global batch: it grows the batch
    when δ·B̂_S + 1 rises above it and never shrinks below it. Why: wall time to a target is
    T(B) ∝ (1 + B_noise/B)·(t0 + c·B) (steps from McCandlish et al. 2018 times an affine step time), least
    at B* = √(B_h·B_noise) with B_h = t0/c, the batch whose per-example cost equals the fixed per-step
    cost (all-reduce latency, launches, Python). The δ-bound counts examples only, so it sits below B*
    whenever B_h > δ²·B_noise, and the policy has no throughput model to tell. The starting batch is the
    one the user picked for the hardware and tuned the lr at, so, as Pollux does (AdaptDL's goodput
    optimiser searches [init_batch_size, max_batch_size] only), it is the floor. Measured on the 2-core
    CPU (bench/time_to_accuracy.py, P = 2, 3 seeds): B_h ≈ 300–1100 and B_noise ≈ 45–120, so B* ≈ 220–320
    while δ·B̂_S + 1 ≈ 25–60; this floor cut the policy's wall time to target on every seed, by a median
    13% (MNIST-1D CNN, though it took 2× the epochs) and 38% (digits MLP). Pass ``--min-batch`` to let it
    shrink (worth it where the per-step overhead is small next to per-example compute).
    """
    if cfg.batch_policy == "diversity":
        max_batch = min(cfg.max_batch or n_train, n_train)
        min_batch = cfg.min_batch or min(cfg.global_batch_size, max_batch)
        return make_batch_policy("diversity", delta=cfg.delta, min_batch=min_batch, max_batch=max_batch)
    if cfg.batch_policy == "schedule":
        return make_batch_policy("schedule", schedule=cfg.batch_schedule)
    return make_batch_policy("fixed", global_batch_size=cfg.global_batch_size)


@dataclass
class Progress:
    """Where the loop is; returned by the loop body, never hidden in globals."""

    step: int = 0
    examples: int = 0
    cursor: Cursor = Cursor()
    train_time_s: float = 0.0  # wall time spent in training steps (evaluation excluded)


def _threads(cfg: RunConfig, world: World) -> int:
    if cfg.threads_per_worker is not None:
        return cfg.threads_per_worker
    local = distributed.local_world_size(world.size if world.size <= (os.cpu_count() or 1) else 1)
    return max(1, (os.cpu_count() or 1) // max(local, 1))


def verify_replicas(params: torch.Tensor, world: World, step: int) -> None:
    """Check that every rank holds bit-identical parameters; name the first rank that differs."""
    if world.size == 1:
        return
    gathered = [torch.empty_like(params) for _ in range(world.size)]
    torch.distributed.all_gather(gathered, params)
    for r, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise DistributedError(f"rank {r}'s parameters differ from rank 0's after step {step}: the "
                                   "replicas diverged; check that all ranks run the same code and data")


def worker(rdv: Rendezvous, cfg: RunConfig, ds: Dataset | None = None) -> dict[str, Any]:
    """One rank's whole job; returns the run summary (rank 0's is the one written)."""
    world = distributed.init_world(rdv, cfg.backend, timeout_s=cfg.timeout_s)
    try:
        return _train(cfg, world, ds)
    finally:
        distributed.shutdown_world()


def _train(cfg: RunConfig, world: World, ds: Dataset | None) -> dict[str, Any]:
    torch.set_num_threads(_threads(cfg, world))
    if ds is None:
        ds = load_data(cfg)
    classification = ds.task == "classification"
    model = build_model(cfg, ds, cfg.seed).to(world.device)
    model.train()
    flat = FlatModel(model, world.size, world.device)
    loss_fn = loss_function(ds.task)
    comm = make_comm(cfg.comm, world, generator=torch.Generator().manual_seed(cfg.seed * 1000 + world.rank),
                     **comm_settings(cfg.comm, levels=cfg.qsgd_levels, timeout_s=cfg.timeout_s))
    tx = sgd(momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
             langevin_noise=cfg.langevin_noise, seed=cfg.seed)
    tx_state = tx.init(flat.params)

    run_dir = None
    if world.is_main:
        run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(
            cfg.model, cfg.dataset, cfg.global_batch_size, world.size, cfg.seed)
    writer = RunWriter(run_dir, enabled=world.is_main)
    try:
        resolved = cfg.replace(workers=world.size, run_dir=str(run_dir) if run_dir else cfg.run_dir)
        writer.write_json("config.json", {**resolved.to_dict(), "n_train": ds.n_train, "n_test": ds.n_test,
                                          "input_shape": list(ds.input_shape), "num_outputs": ds.num_outputs,
                                          "num_parameters": flat.numel})
        writer.write_json("env.json", environment(world_size=world.size, backend=world.backend,
                                                  device=world.device))
        summary = _loop(cfg, world, ds, flat, loss_fn, comm, tx, tx_state, writer, classification)
        summary["run_dir"] = str(run_dir) if run_dir else None
        writer.save_checkpoint({"model": model.state_dict(), "step": summary["steps"],
                                "config": resolved.to_dict()})
        writer.write_json("summary.json", summary)
        return summary
    finally:
        writer.close()
        comm.close()


def _loop(cfg, world, ds, flat, loss_fn, comm, tx, tx_state, writer, classification) -> dict[str, Any]:
    x_train, y_train = ds.x_train.to(world.device), ds.y_train.to(world.device)
    stream = BatchStream(ds.n_train, cfg.seed)
    total_examples = cfg.steps * cfg.global_batch_size if cfg.steps else int(math.ceil(cfg.epochs * ds.n_train))
    eval_train_idx = torch.randperm(ds.n_train, generator=torch.Generator().manual_seed(cfg.seed + 17))[
        : cfg.eval_train_examples]
    bar = _progress_bar(cfg, world, total_examples)
    prog = Progress()
    time_to_target_s = train_time_to_target_s = None
    last_eval: dict[str, Any] = {}
    start = time.perf_counter()
    global_batch_size = cfg.global_batch_size
    diverged_at = None
    lr_cfg = lr_config(cfg)
    policy = batch_policy(cfg, ds.n_train)
    policy_state = policy.init_state()
    estimates: dict[str, float] = {}  # latest smoothed gradient statistics from the tap
    tracker = (DiversityTracker(cfg.diversity, flat.model, world_size=world.size, n_train=ds.n_train,
                                decay=cfg.diversity_decay) if cfg.diversity != "off" else None)

    def run_eval(epoch_float: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        test = evaluate(flat.model, loss_fn, ds.x_test, ds.y_test, rank=world.rank, world_size=world.size,
                        device=world.device, classification=classification)
        train = evaluate(flat.model, loss_fn, ds.x_train[eval_train_idx], ds.y_train[eval_train_idx],
                         rank=world.rank, world_size=world.size, device=world.device,
                         classification=classification)
        s = distributed.all_reduce_scalars([*test, *train], world)
        rec = {"kind": "eval", "step": prog.step, "epoch": epoch_float,
               "test_loss": s[0] / max(s[2], 1), "train_loss": s[3] / max(s[5], 1),
               "test_accuracy": s[1] / max(s[2], 1) if classification else None,
               "train_accuracy": s[4] / max(s[5], 1) if classification else None,
               "time_s": time.perf_counter() - start, "train_time_s": prog.train_time_s,
               "eval_s": time.perf_counter() - t0}
        writer.log(rec)
        return rec

    def finished() -> bool:
        return prog.step >= cfg.steps if cfg.steps else prog.examples >= total_examples

    def run_exact_diversity(epoch_float: float) -> None:
        t0 = time.perf_counter()
        rec = {"kind": "diversity", "step": prog.step, "epoch": epoch_float,
               **measure_exact_diversity(flat.model, ds, world),
               "batch_bound_est": estimates.get("batch_bound_est"), "time_s": time.perf_counter() - start}
        rec["measure_s"] = time.perf_counter() - t0
        writer.log(rec)

    try:
        if cfg.exact_diversity_every:
            run_exact_diversity(0.0)
        while not finished():
            epoch_float = prog.cursor.epoch + prog.cursor.offset / ds.n_train
            decision, policy_state = policy.next(policy_state, StepObservation(
                step=prog.step, epoch=epoch_float, global_batch_size=global_batch_size,
                batch_bound_est=estimates.get("batch_bound_est"), world_size=world.size))
            if decision.changed:
                writer.log({"kind": "batch_change", "step": prog.step, "epoch": epoch_float,
                            "from": global_batch_size, "to": decision.global_batch_size,
                            "reason": decision.reason})
            global_batch_size = decision.global_batch_size
            want = min(global_batch_size, total_examples - prog.examples) if cfg.steps is None else global_batch_size
            batch, next_cursor = stream.next(prog.cursor, want)
            b = int(batch.indices.numel())
            local = shard(batch.indices, world.rank, world.size)
            shard_sizes = [int(t.numel()) for t in torch.tensor_split(batch.indices, world.size)]
            terms = lr_terms(lr_cfg, step=prog.step, epoch=epoch_float, global_batch_size=global_batch_size,
                             grad_sq_norm_est=estimates.get("grad_sq_norm_est"),
                             trace_cov_est=estimates.get("trace_cov_est"))
            lr = terms.lr
            result, tx_state = train_step(
                flat=flat, loss_fn=loss_fn, x=x_train[local], y=y_train[local], global_batch_size=b,
                shard_sizes=shard_sizes, rank=world.rank, comm=comm, tx=tx, tx_state=tx_state,
                hyper=Hyper(lr=lr, step=prog.step), tap=tracker, classification=classification)
            step_s = result.compute_s + result.comm_s + result.update_s
            prog = Progress(step=prog.step + 1, examples=prog.examples + b, cursor=next_cursor,
                            train_time_s=prog.train_time_s + step_s)
            epoch_now = next_cursor.epoch + next_cursor.offset / ds.n_train
            record = {
                "kind": "step", "step": prog.step, "epoch": epoch_now, "global_batch_size": b,
                "local_batch_size": int(local.numel()), "lr": lr, "loss": result.loss,
                "train_batch_accuracy": result.correct / b if classification else None,
                "examples_per_s": b / step_s if step_s > 0 else None,
                "time_s": time.perf_counter() - start, "step_time_s": step_s,
                "compute_s": result.compute_s, "comm_s": result.comm_s, "update_s": result.update_s,
                "wait_s": result.wait_s, "bytes_sent": result.bytes_sent,
                **{f"compute_s_rank{r}": t for r, t in enumerate(result.compute_s_per_rank)},
                **result.extra,
            }
            if cfg.lr_rule == "adascale":
                record["adascale_gain"] = terms.gain
            estimates = result.extra or estimates
            writer.log(record)
            if not math.isfinite(result.loss):
                diverged_at = prog.step
                raise DivergedError(
                    f"the loss became {result.loss} at step {prog.step} (lr {lr:.4g}); training stopped. "
                    f"Lower the learning rate (e.g. --lr {cfg.lr / 4:.3g}) or add warm-up "
                    f"(--warmup-epochs 1); the metrics so far are in {writer.run_dir or 'the run directory'}")
            if cfg.exact_diversity_every and prog.step % cfg.exact_diversity_every == 0:
                run_exact_diversity(epoch_now)
            if cfg.check_replicas_every and prog.step % cfg.check_replicas_every == 0:
                verify_replicas(flat.params, world, prog.step)
            if bar is not None:
                bar.update(b)
                postfix = {"loss": f"{result.loss:.3f}", "ex/s": f"{b / step_s:,.0f}" if step_s > 0 else "-"}
                if last_eval.get("test_accuracy") is not None:
                    postfix["test_acc"] = f"{last_eval['test_accuracy']:.3f}"
                bar.set_postfix(postfix, refresh=False)
            due = (cfg.eval_every is not None and prog.step % cfg.eval_every == 0) or (
                cfg.eval_every is None and batch.epoch_end)
            if due or finished():
                last_eval = run_eval(epoch_now)
                acc = last_eval.get(cfg.target_metric)
                if (cfg.target_accuracy is not None and acc is not None and acc >= cfg.target_accuracy
                        and time_to_target_s is None):
                    time_to_target_s = last_eval["time_s"]
                    train_time_to_target_s = prog.train_time_s
                    break
    finally:
        if bar is not None:
            bar.close()
        if tracker is not None:
            tracker.close()
    if diverged_at is not None:  # pragma: no cover - raised above
        raise AssertionError("unreachable")
    if not last_eval or last_eval["step"] != prog.step:
        last_eval = run_eval(prog.cursor.epoch + prog.cursor.offset / ds.n_train)
    wall_s = time.perf_counter() - start
    return {
        "final_test_accuracy": last_eval.get("test_accuracy"),
        "final_train_accuracy": last_eval.get("train_accuracy"),
        "final_test_loss": last_eval.get("test_loss"),
        "steps": prog.step,
        "epochs": prog.cursor.epoch + prog.cursor.offset / ds.n_train,
        "examples": prog.examples,
        "wall_s": wall_s,
        "train_time_s": prog.train_time_s,
        "target_accuracy": cfg.target_accuracy,
        "target_metric": cfg.target_metric,
        "time_to_target_s": time_to_target_s,
        "train_time_to_target_s": train_time_to_target_s,
        "world_size": world.size,
        "backend": world.backend,
        "num_parameters": flat.numel,
    }


def _progress_bar(cfg: RunConfig, world: World, total_examples: int):
    if not (cfg.progress and world.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_examples, unit="ex", unit_scale=True, dynamic_ncols=True, leave=True,
                desc=f"train P={world.size}", mininterval=0.5)


def diversity_at_checkpoint(path: Path) -> dict[str, float]:
    """Exact whole-data diversity at a run's saved checkpoint (``RUN_DIR`` or ``RUN_DIR/checkpoint.pt``).

    Writes ``diversity_checkpoint.json`` next to the checkpoint and returns the figures.
    """
    from scalesgd.errors import ScalesgdError
    from scalesgd.writer import write_json_atomic

    path = Path(path)
    ckpt_path = path / "checkpoint.pt" if path.is_dir() else path
    if not ckpt_path.exists():
        raise ScalesgdError(f"no checkpoint at {ckpt_path}; pass a run directory written by `scalesgd train`")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    known = {k: v for k, v in ckpt["config"].items() if k in RunConfig.__dataclass_fields__}
    known["lr_milestones"] = tuple(known.get("lr_milestones", ()))
    cfg = RunConfig(**known)
    ds = load_data(cfg)
    model = build_model(cfg, ds, cfg.seed)
    model.load_state_dict(ckpt["model"])
    model.train()
    world = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    stats = {"step": ckpt["step"], **measure_exact_diversity(model, ds, world)}
    write_json_atomic(ckpt_path.parent / "diversity_checkpoint.json", stats)
    return stats


def preflight(cfg: RunConfig, ds: Dataset) -> None:
    """Checks that need the data set, run before anything is spawned or written: the model fits the data,
    the lr rule and the batch policy accept their options."""
    try:
        build_model(cfg, ds, cfg.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    lr_config(cfg)
    batch_policy(cfg, ds.n_train)


def train(cfg: RunConfig, ds: Dataset | None = None) -> dict[str, Any]:
    """Run ``cfg``: under torchrun as the rank it made, otherwise on ``cfg.workers`` local processes.

    Returns rank 0's summary (under torchrun: this rank's).
    """
    rdv = distributed.torchrun_rendezvous()
    if rdv is None or rdv.rank == 0:  # only rank 0 writes the run directory
        check_run_dir_is_new(cfg.run_dir)
    if ds is None:
        ds = load_data(cfg)
    preflight(cfg, ds)
    if rdv is not None:
        return worker(rdv, cfg, ds)
    if cfg.workers == 1:
        return worker(Rendezvous("127.0.0.1", 0, 0, 1, 0), cfg, ds)
    cores = os.cpu_count() or 1
    if cfg.workers > cores and distributed.resolve_backend(cfg.backend) == "gloo":
        # Measured on 2 cores: P = 4 trained 12-16x slower than P = 2, every blocking call waiting for a time slice.
        print(f"warning: {cfg.workers} local workers on {cores} CPU cores; each worker waits for a time slice "
              f"at every all-reduce, so steps slow down many-fold. Use --workers {cores} or fewer here, or "
              "run the extra workers on other machines with torchrun.", file=sys.stderr, flush=True)
    results = distributed.spawn(worker, cfg.workers, (cfg, ds), port=cfg.master_port, addr=cfg.master_addr,
                                timeout_s=None)
    return results[0]
