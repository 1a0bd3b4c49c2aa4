"""The thin training loop over one :class:`~scalesgd.train_state.TrainState`. No maths and no builders of its own.

:func:`train` is what ``scalesgd train`` calls: it checks and builds what one build can serve (model, lr rule,
batch policy) once, then spawns local workers (or, under torchrun, runs as the rank torchrun made) and
returns rank 0's summary. :func:`worker` is one rank's whole job. Each step reads top to bottom in named
stages, each taking the state and returning the next one:

    [find the base lr: ``--lr auto``, once] → adapt (batch size, lr) → shard → step → estimate → log → evaluate
    → checkpoint (when due) → …

Checkpoints (:mod:`scalesgd.checkpoint`) fall due every ``--checkpoint-every-steps`` steps, every
``--checkpoint-every-s`` seconds (rank 0's clock) and on a stop signal to any process; time and signal
requests ride in the step's all-reduce, so every rank checkpoints after the same step. ``--resume`` (and a
restart) reads the newest checkpoint back into the state and continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from scalesgd import checkpoint, distributed
from scalesgd.backup_comm import BackupWorkers
from scalesgd.batch_policy import BatchPolicy, StepObservation, run_batch_policy
from scalesgd.comm import CommStrategy, comm_settings, make_comm
from scalesgd.comm_registry import resolve_comm
from scalesgd.config import RunConfig
from scalesgd.data import Dataset, load_data
from scalesgd.data.sharding import BatchStream, Cursor, GlobalBatch, shard
from scalesgd.diversity import DiversityEstimate, NoiseEstimate, NoiseScaleEMA, measure_exact_diversity
from scalesgd.distributed import Rendezvous, StopRequest, World
from scalesgd.errors import ConfigError, DistributedError, DivergedError, StoppedError, WorkerFailedError
from scalesgd.goodput import GoodputObservation, LrRangeTest
from scalesgd import lr_probe
from scalesgd.local_sgd import NO_COMM, average_parameters_, averaged_parameters, averaging_due
from scalesgd.lr_rules import LrConfig, LrTerms, lr_terms
from scalesgd.mechanisms import ExampleQSGD, check_per_example_affordable
from scalesgd.models import example_randomness
from scalesgd.data.user import ShardReader, to_device
from scalesgd.step import FlatModel, NoiseTap, StepResult, evaluate, train_step
from scalesgd.stragglers import StragglerSpec, check_ranks, parse_straggler, sample_delay
from scalesgd.train_state import LossWatch, TrainState
from scalesgd.transforms import GradientTransformation, Hyper, sgd, state_from_tree, state_to_tree
from scalesgd.user_code import build_run_model, canonical, is_import_string, loss_for, short_name
from scalesgd.writer import (RunWriter, check_run_dir_is_new, default_run_dir, environment, lock_run_dir,
                             truncate_metrics)

# A time-based checkpoint waits at least this many times its own last saving time, so saving costs at most
# 1/CHECKPOINT_COST_FACTOR (2%) of the run whatever --checkpoint-every-s says.
CHECKPOINT_COST_FACTOR = 50


@dataclass(frozen=True)
class Prepared:
    """What :func:`preflight` builds once and every rank starts from.

    Attributes:
        model: the initialised model (the same weights on every rank).
        torch_rng_state: torch's global CPU RNG state right after the model's initialisation (restored in
            every rank, exactly as if each rank had built the model itself).
        lr_config: the learning-rate rule and base schedule.
        policy: the batch-size policy.
        loss: a per-example loss handed over as an object (``scalesgd.fit(loss=...)``); None: ``cfg.loss`` or
            the task's built-in loss.
    """

    model: nn.Module
    torch_rng_state: torch.Tensor
    lr_config: LrConfig
    policy: BatchPolicy
    loss: Callable | None = None


def preflight(cfg: RunConfig, ds: Dataset, *, model: nn.Module | None = None, model_factory: Callable | None = None,
              loss: Callable | None = None) -> Prepared:
    """Build what the run needs from the config and the data set, before anything is spawned or written:
    the model (it must fit the data), the lr rule and the batch policy (they must accept their options).

    A user's model, data or loss (import strings, or the objects :func:`scalesgd.fit` passes: ``model`` an
    instance used as it is, ``model_factory`` called like an import string's function, ``loss``) is tried
    on the first two training examples here, so a wrong type or loss shape is one error before any spawn.

    Raises:
        ConfigError: the model cannot take the data or its options; the lr rule or policy rejects theirs;
            a user's model or loss fails on two examples.
    """
    if cfg.target_accuracy is not None and ds.task != "classification":
        raise ConfigError(f"--target-accuracy needs a classification data set; {cfg.dataset} is a {ds.task} task, "
                          "whose evaluations have no accuracy to reach: drop --target-accuracy")
    if model is None:
        model = build_run_model(cfg, input_shape=ds.input_shape, num_outputs=ds.num_outputs, factory=model_factory)
    else:
        torch.manual_seed(cfg.seed)  # the RNG where a factory would have left it for dropout to continue from
    torch_rng_state = torch.get_rng_state()
    if (model_factory is not None or loss is not None or cfg.loss or is_import_string(cfg.model)
            or is_import_string(cfg.dataset) or not ds.in_memory):
        _try_on_two_examples(model, loss_for(cfg.loss, ds.task, fn=loss), ds)
        torch.set_rng_state(torch_rng_state)
    policy = run_batch_policy(cfg.batch_policy, global_batch_size=cfg.global_batch_size, n_train=ds.n_train,
                              delta=cfg.delta, min_batch=cfg.min_batch, max_batch=cfg.max_batch,
                              schedule=cfg.batch_schedule, base_batch_size=cfg.base_batch_size)
    # With --lr auto the base rate is unknown until find_base_lr has run: the range test's first rate stands in
    # (so the rule and schedule are checked now); the loop replaces it before the first training step.
    base_lr = LrRangeTest(**lr_probe.LR_PROBE).start_lr if cfg.lr == "auto" else None
    if cfg.example_qsgd_levels:
        largest = cfg.global_batch_size if cfg.batch_policy == "fixed" else (cfg.max_batch or ds.n_train)
        # an adaptive policy (goodput is train's default) may grow the batch to --max-batch, else the training set
        smaller = ("batch" if cfg.batch_policy == "fixed" else
                   f"--max-batch (--batch-policy {cfg.batch_policy} may grow the global batch to {largest}), or "
                   f"--batch-policy fixed")
        check_per_example_affordable(model, -(-largest // cfg.workers), option="--example-qsgd-levels",
                                     smaller_batch=smaller)
    return Prepared(model=model, torch_rng_state=torch_rng_state,
                    lr_config=LrConfig.from_run_config(cfg, base_lr=base_lr), policy=policy, loss=loss)


def _try_on_two_examples(model: nn.Module, loss_fn: Callable, ds: Dataset) -> None:
    """Forward the first two training examples (eval mode, no gradients) and the loss on them."""
    x, y = ds.train_batch(torch.arange(min(2, ds.n_train)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
            if not isinstance(out, torch.Tensor):
                raise ConfigError(f"the model returned a {type(out).__name__} for a batch; it must return a tensor "
                                  "of outputs (B, ...) that the loss takes")
            loss_fn(out, y)
    finally:
        model.train(was_training)


def _threads(cfg: RunConfig, world: World) -> int:
    """Torch threads of this worker: ``--threads-per-worker``, else the machine's cores shared equally by its
    local workers, at least one."""
    if cfg.threads_per_worker is not None:
        return cfg.threads_per_worker
    # Every local worker gets an equal share of the cores; with as many workers as cores (or more) that is one
    # thread each: more would make the workers preempt each other at every all-reduce.
    return max(1, world.cpu_count // max(world.local_size, 1))


def _comm(cfg: RunConfig, world: World, generator: torch.Generator) -> CommStrategy:
    """The run's communication strategy (the one place the trainer calls :func:`make_comm`); with
    ``--backup-workers`` the parameter-server path that drops the slowest b (:mod:`scalesgd.backup_comm`)."""
    if cfg.backup_workers:
        return BackupWorkers(world, backups=cfg.backup_workers, timeout_s=cfg.timeout_s)
    # an asynchronous run reduces nothing through it (evaluation only): the engine's, with no connections to make
    name = comm_name(cfg, world) or "allreduce"
    return make_comm(name, world, generator=generator,
                     **comm_settings(name, levels=cfg.qsgd_levels, timeout_s=cfg.timeout_s))


def comm_name(cfg: RunConfig, world: World) -> str | None:
    """The strategy the run uses: ``--comm``, with ``auto`` resolved for this job's backend, device and size
    (:func:`scalesgd.comm_registry.resolve_comm`); the run's config.json records it as ``comm_used``. None for
    the asynchronous algorithms, which send their gradients their own way (:mod:`scalesgd.async_sgd`)."""
    if cfg.algorithm != "sync":
        return None
    return resolve_comm(cfg.comm, backend=world.backend, device_type=world.device.type, world_size=world.size)


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


def worker(rdv: Rendezvous, cfg: RunConfig, ds: Dataset | None = None,
           prepared: Prepared | None = None, loss: Callable | None = None, resume: bool = False) -> dict[str, Any]:
    """One rank's whole job; returns the run summary (rank 0's is the one written). Without ``ds`` /
    ``prepared`` the worker loads the data / builds the model itself (``loss``: a loss object for then).
    With ``resume``, it continues from the newest checkpoint in ``cfg.run_dir`` (from the start if there is
    none yet)."""
    world = distributed.init_world(rdv, cfg.backend, timeout_s=cfg.timeout_s)
    try:
        return _train(cfg, world, ds, prepared, loss, resume=resume)
    finally:
        distributed.shutdown_world()


# --------------------------------------------------------------------------------------------------------
# The stages of one step


def finished(state: TrainState, *, steps: int | None, total_examples: int) -> bool:
    """Whether the budget is spent: ``steps`` optimizer steps if given, else ``total_examples`` examples."""
    return state.step >= steps if steps else state.examples >= total_examples


def smoothed_estimate(state: TrainState, ema: NoiseScaleEMA | None, n_train: int) -> DiversityEstimate | None:
    """The smoothed noise estimate the next step adapts to: None without a tap or before the first step."""
    if ema is None or state.step == 0:
        return None
    return ema.estimate(state.noise_ema, n_train)


@dataclass(frozen=True)
class StepTiming:
    """A step's timings as every rank sees them (seconds): compute is the slowest rank's, all-reduce and update
    the mean over ranks, so a decision made from them is the same on every rank. ``step``: the step timed."""

    step: int
    global_batch_size: int
    compute_s: float
    comm_s: float
    update_s: float


def pending_timing(state: TrainState, result: StepResult, part: Shard) -> StepTiming | None:
    """The step just taken as far as every rank knows its times yet, for the goodput policy's step-time fit: the
    slowest rank's compute time (from the step's own tail); its all-reduce and update times, means over ranks,
    ride in the next step's tail (:func:`completed_timing`), so agreeing on them costs no collective. None for
    a step the fit must not see: one of the first TIMING_WARMUP_STEPS, or a batch cut short by the end of an
    epoch (not the size the policy chose)."""
    if state.step <= TIMING_WARMUP_STEPS or int(part.batch.indices.numel()) != state.global_batch_size:
        return None
    return StepTiming(state.step - 1, state.global_batch_size,
                      max(result.compute_s_per_rank, default=result.compute_s), math.nan, math.nan)


def completed_timing(pending: StepTiming | None, result: StepResult) -> StepTiming | None:
    """``pending`` (the step before ``result``'s) with its all-reduce and update times from ``result``'s tail."""
    if pending is None:
        return None
    return dataclasses.replace(pending, comm_s=result.previous_comm_s, update_s=result.previous_update_s)


def adapt(state: TrainState, *, policy: BatchPolicy, lr_config: LrConfig, estimate: DiversityEstimate | None,
          n_train: int, world_size: int, writer: RunWriter,
          timing: StepTiming | None = None) -> tuple[TrainState, LrTerms]:
    """Choose this step's global batch (the policy, on the smoothed B̂_S; goodput also on the last step's
    ``timing``) and its learning rate."""
    epoch = state.epoch(n_train)
    if policy.name == "goodput":
        decision, policy_state = policy.next(state.policy, GoodputObservation(
            step=state.step, epoch=epoch, global_batch_size=state.global_batch_size, world_size=world_size,
            compute_s=timing.compute_s if timing is not None else None,
            comm_s=timing.comm_s if timing is not None else None,
            update_s=timing.update_s if timing is not None else 0.0,
            timed_step=timing.step if timing is not None else None,
            grad_sq_norm_est=estimate.grad_sq_norm_est if estimate is not None else None,
            trace_cov_est=estimate.trace_cov_est if estimate is not None else None,
            batch_bound_est=estimate.batch_bound_est if estimate is not None else None))
    else:
        decision, policy_state = policy.next(state.policy, StepObservation(
            step=state.step, epoch=epoch, global_batch_size=state.global_batch_size,
            batch_bound_est=estimate.batch_bound_est if estimate is not None else None, world_size=world_size))
    if decision.changed:
        writer.log({"kind": "batch_change", "step": state.step, "epoch": epoch, "from": state.global_batch_size,
                    "to": decision.global_batch_size, "reason": decision.reason})
    terms = lr_terms(lr_config, step=state.step, epoch=epoch, global_batch_size=decision.global_batch_size,
                     grad_sq_norm_est=estimate.grad_sq_norm_est if estimate is not None else None,
                     trace_cov_est=estimate.trace_cov_est if estimate is not None else None)
    return state.replace(policy=policy_state, global_batch_size=decision.global_batch_size), terms


TIMING_WARMUP_STEPS = 2  # goodput's step-time fit skips the first steps (allocator and thread-pool warm-up)


@dataclass(frozen=True)
class Shard:
    """This step's global batch, this rank's part of it and where the stream stands after it."""

    batch: GlobalBatch
    local: torch.Tensor  # (B_p,) this rank's example indices
    shard_sizes: list[int]  # (P,) every rank's B_p
    next_cursor: Cursor


def shard_batch(state: TrainState, *, stream: BatchStream, world: World, examples_left: int | None) -> Shard:
    """The next global batch of the policy's size (cut to ``examples_left`` on an epoch budget) and this
    rank's contiguous part of it."""
    want = state.global_batch_size if examples_left is None else min(state.global_batch_size, examples_left)
    batch, next_cursor = stream.next(state.cursor, want)
    return Shard(batch=batch, local=shard(batch.indices, world.rank, world.size),
                 shard_sizes=[int(t.numel()) for t in torch.tensor_split(batch.indices, world.size)],
                 next_cursor=next_cursor)


def step(state: TrainState, part: Shard, *, lr: float, flat: FlatModel, loss_fn: Callable,
         read: Callable[[torch.Tensor], tuple[Any, torch.Tensor]], rank: int, comm: CommStrategy,
         tx: GradientTransformation, tap: NoiseTap | None, classification: bool, seed: int, local: bool = False,
         delay: Callable[[float], float] | None = None, skip_compute: bool = False,
         requests: tuple[bool, bool] = (False, False),
         example_qsgd: ExampleQSGD | None = None) -> tuple[TrainState, StepResult]:
    """One step on ``part`` (:func:`scalesgd.step.train_step`); advances counters and cursor.
    ``read(indices)`` gives the (inputs, targets) of this rank's examples (:func:`_batch_reader`).

    Synchronous by default. ``local``: a local-SGD step — this rank's shard alone, its local *mean* gradient
    (as if the shard were the whole batch), no communication and no noise tap (the estimators need an
    all-reduced gradient); its loss and accuracy are this rank's. ``delay``: the injected straggler delay.
    ``skip_compute``: this rank is late (backup workers: the step's result is already there), so it
    contributes nothing and takes no delay. ``requests``: this rank's (checkpoint, stop) requests, summed over
    ranks with the step's all-reduce (a local step has none: :func:`average` carries them at the next average).
    ``example_qsgd``: each example's gradient quantized before the sum (``--example-qsgd-levels``), its
    rounding keyed by (seed, step, row of the global batch) like the dropout masks.
    """
    b = int(part.batch.indices.numel())
    idx = part.local[:0] if skip_compute else part.local
    local_b = int(idx.numel())
    x, y = read(idx)
    # Dropout masks belong to the examples (seed, step, row of the global batch): each rank's rows get their
    # own, and P workers draw what one worker would (models.ExampleDropout). The update's randomness
    # (Langevin noise) comes from the transformation's generator, the same on every rank.
    first_row = sum(part.shard_sizes[:rank])
    example_grad = None
    if example_qsgd is not None:
        def example_grad(xs, ys):
            return example_qsgd.summed_gradient(flat.model, loss_fn, xs, ys, seed=seed, step=state.step,
                                                first_row=first_row, global_rows=b)
    with example_randomness(flat.model, seed=seed, step=state.step, first_row=first_row, global_rows=b):
        result, tx_state = train_step(
            flat=flat, loss_fn=loss_fn, x=x, y=y,
            global_batch_size=max(local_b, 1) if local else b, shard_sizes=[local_b] if local else part.shard_sizes,
            rank=rank, comm=NO_COMM if local else comm, tx=tx, tx_state=state.tx_state,
            hyper=Hyper(lr=lr, step=state.step), tap=None if local else tap, classification=classification,
            delay=None if skip_compute else delay, requests=(False, False) if local else requests,
            example_grad=example_grad)
    step_s = result.compute_s + result.comm_s + result.update_s
    return state.replace(tx_state=tx_state, step=state.step + 1, examples=state.examples + b,
                         cursor=part.next_cursor, train_time_s=state.train_time_s + step_s,
                         torch_rng_state=torch.get_rng_state()), result


def straggler_delay(spec: StragglerSpec | None, *, seed: int, rank: int,
                    step_index: int) -> Callable[[float], float] | None:
    """This rank's injected delay at this step as a function of its measured compute time (None: none);
    reproducible from (seed, rank, step) (:func:`scalesgd.stragglers.sample_delay`)."""
    if spec is None:
        return None
    return lambda compute_s: sample_delay(spec, seed=seed, rank=rank, step=step_index, compute_s=compute_s)


def local_phase(state: TrainState, *, sync_every: int | None, sync_every_after: float,
                n_train: int) -> TrainState:
    """Start local SGD (record its first step) once ``--sync-every`` is set and ``--sync-every-after`` epochs
    have passed; once started it stays on."""
    if sync_every is None or state.local_sgd_start is not None or state.epoch(n_train) < sync_every_after:
        return state
    return state.replace(local_sgd_start=state.step)


def average(state: TrainState, *, flat: FlatModel, comm: CommStrategy, world: World, sync_every: int | None,
            requests: tuple[bool, bool] = (False, False)) -> tuple[TrainState, dict[str, Any], tuple[bool, bool]]:
    """After a local step: average the parameters across ranks when the schedule says so
    (:func:`scalesgd.local_sgd.averaging_due`); returns the state, the step record's local-SGD fields and
    whether any rank asked for a (checkpoint, stop).

    ``requests``: this rank's (checkpoint, stop) requests. A local step has no all-reduce to carry them, so they
    are summed over ranks at the next average (a second, two-number all-reduce): a stop signal during local SGD
    is acted on within ``sync_every`` steps, on every rank after the same step.
    """
    if state.local_sgd_start is None or sync_every is None:
        return state, {}, (False, False)
    if not averaging_due(state.step - 1, state.local_sgd_start, sync_every):
        return state, {"local_sgd": True, "averaged": False}, (False, False)
    t0 = time.perf_counter()
    stats = average_parameters_(flat.params, comm, world.size)
    average_s = time.perf_counter() - t0
    summed = distributed.all_reduce_scalars([float(requests[0]), float(requests[1])], world)
    return state.replace(train_time_s=state.train_time_s + average_s), {
        "local_sgd": True, "averaged": True, "average_s": average_s, "average_bytes_sent": stats.bytes_sent}, (
        summed[0] > 0.5, summed[1] > 0.5)


def warm_up(state: TrainState, part: Shard, *, flat: FlatModel, loss_fn: Callable,
            read: Callable[[torch.Tensor], tuple[Any, torch.Tensor]], comm: CommStrategy) -> None:
    """One untimed forward/backward and all-reduce on ``part``, then undone: no clock of the run (training
    time, time to target) pays for one-time costs such as first-use allocations and kernel choices or a
    transport's first exchange, which made the first point of a sweep look many times slower than the same
    point with another seed. Parameters, optimizer state and every generator are as they were before; the
    gradient buffer is zeroed (the step zeroes it anyway)."""
    torch_rng, comm_rng = torch.get_rng_state(), state.comm_generator.get_state()
    flat.buffer.zero_()
    if part.local.numel() > 0:
        x, y = read(part.local)
        loss = loss_fn(flat.model(x), y)
        (loss / int(part.batch.indices.numel())).backward()
    comm.allreduce_(flat.buffer, exact_tail=flat.tail)
    flat.buffer.zero_()
    torch.set_rng_state(torch_rng)
    state.comm_generator.set_state(comm_rng)


def _batch_reader(ds: Dataset, reader: ShardReader,
                  device: torch.device) -> Callable[[torch.Tensor], tuple[Any, torch.Tensor]]:
    """``read(indices) -> (inputs, targets)`` on ``device``: tensors in memory are moved once and indexed (the
    fast path); an indexed set reads each step's shard through ``reader``. An empty shard (a tiny last batch)
    gives no inputs and empty targets."""
    if ds.in_memory:
        x_train, y_train = ds.x_train.to(device), ds.y_train.to(device)
        return lambda idx: (x_train[idx], y_train[idx])

    def read(idx: torch.Tensor) -> tuple[Any, torch.Tensor]:
        if idx.numel() == 0:
            return None, torch.empty(0, device=device)
        x, y = reader.read(idx)
        return to_device(x, device), y.to(device)

    return read


def loop_inputs(cfg: RunConfig, ds: Dataset, world: World, loss: Callable | None = None) -> tuple[
        Callable, Callable, ShardReader, Callable[[torch.Tensor], tuple[Any, torch.Tensor]], BatchStream, int,
        torch.Tensor]:
    """What every training loop (synchronous, or :mod:`scalesgd.async_sgd`'s) reads the run through:
    ``(loss_fn, example_loss_fn, reader, read, stream, total_examples, eval_train_idx)`` — the mean and
    per-example losses, the shard reader (close it) and ``read(indices)``, the global-batch order, the run's
    length in examples, and the fixed training subset evaluated (its indices, (eval_train_examples,))."""
    reader = ShardReader(ds, cfg.loader_workers)
    total_examples = cfg.steps * cfg.global_batch_size if cfg.steps else int(math.ceil(cfg.epochs * ds.n_train))
    eval_train_idx = torch.randperm(ds.n_train, generator=torch.Generator().manual_seed(cfg.seed + 17))[
        : cfg.eval_train_examples]
    return (loss_for(cfg.loss, ds.task, fn=loss), loss_for(cfg.loss, ds.task, "none", fn=loss), reader,
            _batch_reader(ds, reader, world.device), BatchStream(ds.n_train, cfg.seed), total_examples, eval_train_idx)


def estimate(state: TrainState, result: StepResult, *, ema: NoiseScaleEMA | None,
             n_train: int) -> tuple[TrainState, NoiseEstimate | None]:
    """Fold the step's unbiased ‖G‖², tr Σ into the EMA carried in the state (:meth:`NoiseScaleEMA.fold`)."""
    if ema is None:
        return state, None
    noise_ema, noise = ema.fold(state.noise_ema, result.noise, n_train)
    return state.replace(noise_ema=noise_ema), noise


def log_step(state: TrainState, result: StepResult, part: Shard, terms: LrTerms, noise: NoiseEstimate | None, *,
             n_train: int, classification: bool, adascale: bool, start_s: float, writer: RunWriter,
             extra: dict[str, Any] | None = None) -> None:
    """Write the step's line to ``metrics.jsonl`` (``extra``: fields a stage adds, e.g. local SGD's)."""
    b = int(part.batch.indices.numel())
    step_s = result.compute_s + result.comm_s + result.update_s
    record = {
        "kind": "step", "step": state.step, "epoch": state.epoch(n_train), "global_batch_size": b,
        "local_batch_size": int(part.local.numel()), "lr": terms.lr, "loss": result.loss,
        "train_batch_accuracy": result.correct / b if classification else None,
        "examples_per_s": b / step_s if step_s > 0 else None,
        "time_s": time.perf_counter() - start_s, "step_time_s": step_s,
        "compute_s": result.compute_s, "comm_s": result.comm_s, "update_s": result.update_s,
        "wait_s": result.wait_s, "bytes_sent": result.bytes_sent,
        **{f"compute_s_rank{r}": t for r, t in enumerate(result.compute_s_per_rank)},
        # each rank's own all-reduce and update seconds of the step before (they ride in this step's tail)
        **{f"prev_comm_s_rank{r}": t for r, t in enumerate(result.prev_comm_s_per_rank) if t >= 0},
        **{f"prev_update_s_rank{r}": t for r, t in enumerate(result.prev_update_s_per_rank) if t >= 0},
        **(noise.metrics() if noise is not None else {}),
        **({"injected_delay_s": result.injected_delay_s} if result.injected_delay_s else {}),
        **(extra or {}),
    }
    if adascale:
        record["adascale_gain"] = terms.gain
    writer.log(record)


# Divergence: the smoothed training loss (EMA with this decay) above EXPLOSION_FACTOR times the first step's
# loss for EXPLOSION_STEPS steps in a row. A run that recovers from a spike (digits/mlp at --lr 0.5 peaks at
# ~10x its first loss for a step) stays under it; one that blows up (--lr 5: ~50x and more) does not.
LOSS_EMA_DECAY, EXPLOSION_FACTOR, EXPLOSION_STEPS = 0.9, 10.0, 5


def divergence_advice(cfg: RunConfig, base_lr: float | None = None) -> str:
    """What to change after a divergence, as options that change the learning rates the run uses (each is
    tested to do so): a tenth of the rate, and warm-up (longer, if it was already on). Under ``--lr auto``
    ``base_lr`` is the rate the search chose (the advice then names an explicit rate)."""
    warmup = max(1.0, 2 * cfg.warmup_epochs)
    rate = base_lr if cfg.lr == "auto" and base_lr is not None else (cfg.lr if cfg.lr != "auto" else 0.05)
    return (f"lower the learning rate (e.g. --lr {rate / 10:.3g}) or ramp it up over more of the start "
            f"(--warmup-epochs {warmup:g})")


def watch_loss(state: TrainState, loss: float, *, lr: float, cfg: RunConfig, writer: RunWriter) -> TrainState:
    """Stop the run when its training loss is no longer finite or has exploded (see EXPLOSION_FACTOR).

    Raises:
        DivergedError: one line with the step, the loss and the advice (:func:`divergence_advice`).
    """
    where = f"the metrics so far are in {writer.run_dir or 'the run directory'}"
    if not math.isfinite(loss):
        raise DivergedError(f"the loss became {loss} at step {state.step} (lr {lr:.4g}); training stopped. "
                            f"{divergence_advice(cfg, state.base_lr).capitalize()}; {where}")
    w = state.loss_watch
    first = loss if w.first_loss is None else w.first_loss
    smoothed = loss if w.smoothed_loss is None else LOSS_EMA_DECAY * w.smoothed_loss + (1 - LOSS_EMA_DECAY) * loss
    above = w.steps_above + 1 if smoothed > EXPLOSION_FACTOR * abs(first) else 0
    if above >= EXPLOSION_STEPS:
        raise DivergedError(f"the training loss exploded: smoothed {smoothed:.4g} at step {state.step} (lr {lr:.4g}), "
                            f"over {EXPLOSION_FACTOR:g}x the first step's {first:.4g} for {above} steps; training "
                            f"stopped. {divergence_advice(cfg, state.base_lr).capitalize()}; {where}")
    return state.replace(loss_watch=LossWatch(first_loss=first, smoothed_loss=smoothed, steps_above=above))


def log_exact_diversity(state: TrainState, *, model: nn.Module, loss_fn: Callable, ds: Dataset, world: World,
                        estimate: DiversityEstimate | None, start_s: float, writer: RunWriter) -> None:
    """Measure the exact whole-data Δ_S, B_S at the current weights (all ranks) and log it beside the estimate.
    ``loss_fn`` gives per-example losses (B,)."""
    t0 = time.perf_counter()
    rec = {"kind": "diversity", "step": state.step, "epoch": state.epoch(ds.n_train),
           **measure_exact_diversity(model, loss_fn, ds.x_train, ds.y_train, world=world, dataset=ds),
           "batch_bound_est": estimate.batch_bound_est if estimate is not None else None,
           "time_s": time.perf_counter() - start_s}
    rec["measure_s"] = time.perf_counter() - t0
    writer.log(rec)


def log_eval(state: TrainState, *, model: nn.Module, loss_fn: Callable, ds: Dataset, eval_train_idx: torch.Tensor,
             world: World, classification: bool, start_s: float, writer: RunWriter) -> dict[str, Any]:
    """Test loss/accuracy and loss/accuracy on a fixed training subset, summed over ranks; logged and returned."""
    t0 = time.perf_counter()
    if ds.in_memory:
        test = evaluate(model, loss_fn, ds.x_test, ds.y_test, rank=world.rank, world_size=world.size,
                        device=world.device, classification=classification)
        train = evaluate(model, loss_fn, ds.x_train[eval_train_idx], ds.y_train[eval_train_idx], rank=world.rank,
                         world_size=world.size, device=world.device, classification=classification)
    else:  # read by index, a chunk at a time
        test = evaluate(model, loss_fn, read=ds.test_batch, n=ds.n_test, rank=world.rank, world_size=world.size,
                        device=world.device, classification=classification, batch_size=256)
        train = evaluate(model, loss_fn, read=lambda i: ds.train_batch(eval_train_idx[i]), n=len(eval_train_idx),
                         rank=world.rank, world_size=world.size, device=world.device,
                         classification=classification, batch_size=256)
    s = distributed.all_reduce_scalars([*test, *train], world)
    rec = {"kind": "eval", "step": state.step, "epoch": state.epoch(ds.n_train),
           "test_loss": s[0] / max(s[2], 1), "train_loss": s[3] / max(s[5], 1),
           "test_accuracy": s[1] / max(s[2], 1) if classification else None,
           "train_accuracy": s[4] / max(s[5], 1) if classification else None,
           "time_s": time.perf_counter() - start_s, "train_time_s": state.train_time_s,
           "eval_s": time.perf_counter() - t0}
    writer.log(rec)
    return rec


def run_summary(state: TrainState, last_eval: dict[str, Any], *, cfg: RunConfig, world: World, n_train: int,
                num_parameters: int, start_s: float, checkpoints: int, checkpoint_s: float) -> dict[str, Any]:
    """The run's ``summary.json`` fields common to every algorithm: the final evaluation, counters, clocks
    (seconds) and time to target. ``checkpoints``/``checkpoint_s``: those written by this job (a resumed run
    counts from its resume) and the seconds they took."""
    return {
        "final_test_accuracy": last_eval.get("test_accuracy"),
        "final_train_accuracy": last_eval.get("train_accuracy"),
        "final_test_loss": last_eval.get("test_loss"),
        "steps": state.step,
        "epochs": state.epoch(n_train),
        "examples": state.examples,
        "wall_s": time.perf_counter() - start_s,
        "train_time_s": state.train_time_s,
        "target_accuracy": cfg.target_accuracy,
        "target_metric": cfg.target_metric,
        "time_to_target_s": state.time_to_target_s,
        "train_time_to_target_s": state.train_time_to_target_s,
        "world_size": world.size,
        "backend": world.backend,
        "num_parameters": num_parameters,
        "checkpoints": checkpoints,
        "checkpoint_s": checkpoint_s,
    }


def reached_target(state: TrainState, eval_record: dict[str, Any], *, target: float | None,
                   metric: str) -> TrainState:
    """Record the time to target the first time the evaluated ``metric`` reaches ``target``."""
    value = eval_record.get(metric)
    if target is None or value is None or value < target or state.time_to_target_s is not None:
        return state
    return state.replace(time_to_target_s=eval_record["time_s"], train_time_to_target_s=state.train_time_s)


@dataclass
class Checkpointing:
    """When the next checkpoint falls due and what saving has cost so far (this job)."""

    every_steps: int
    every_s: float
    keep: int
    last_at: float  # perf_counter of the last checkpoint (or of the start)
    last_save_s: float = 0.0
    saves: int = 0
    save_s: float = 0.0

    def time_due(self, now: float) -> bool:
        """Rank 0's clock: ``every_s`` since the last one, stretched to CHECKPOINT_COST_FACTOR × its cost."""
        return self.every_s > 0 and now - self.last_at >= max(self.every_s, CHECKPOINT_COST_FACTOR * self.last_save_s)

    def step_due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0


def save_train_checkpoint(state: TrainState, *, flat: FlatModel, config: dict[str, Any], world: World,
                          writer: RunWriter, elapsed_s: float, last_eval: dict[str, Any], keep: int,
                          base_lr: float) -> None:
    """All ranks: gather every rank's RNG states to rank 0, which writes ``checkpoints/step-<step>.pt``
    (:func:`scalesgd.checkpoint.save`, keeping the newest ``keep``).

    Under local SGD (once ``--sync-every`` has started) each rank's parameters differ between two averages and
    its momentum always: every rank's own parameters and transformation state go in too (``ranks[r]["own"]``),
    so a checkpoint taken at any step resumes each rank exactly where it was."""
    own = checkpoint.rng_state(state.comm_generator)
    if state.local_sgd_start is not None:
        own["own"] = {"params": state.params.detach().cpu().clone(), "tx_state": state_to_tree(state.tx_state)}
    ranks = distributed.gather_objects(own, world)
    if not world.is_main or writer.run_dir is None:
        return
    # torch's generator as it is now: an exact-diversity measurement after the step may have drawn from it
    now = state.replace(torch_rng_state=torch.get_rng_state())
    checkpoint.save(writer.run_dir, {
        "step": state.step, "model": flat.model.state_dict(), "config": config, "train_state": now.to_checkpoint(),
        "ranks": ranks, "world_size": world.size, "elapsed_s": elapsed_s, "last_eval": last_eval,
        "metrics_bytes": writer.metrics_bytes(), "base_lr": float(base_lr)}, keep=keep)


def restore(blob: dict[str, Any], *, flat: FlatModel, comm_generator: torch.Generator, world: World,
            seed: int) -> TrainState:
    """The :class:`TrainState` of a checkpoint, with this rank's RNG states set: parameters copied into the
    flat vector the model views, buffers into the model, torch's, numpy's, Python's and the communication
    generator's states restored. A rank the checkpoint did not have (a resume on more workers) starts its
    generators from the seed. A checkpoint taken during local SGD gives each rank its own parameters and
    transformation state (momentum).

    Raises:
        ConfigError: a local-SGD checkpoint resumed on another number of workers (each had its own model).
    """
    saved = TrainState.from_checkpoint(blob["train_state"], device=world.device)
    own = [r.get("own") for r in blob["ranks"]]
    if any(o is not None for o in own):  # local SGD: every rank has parameters and momentum of its own
        if len(own) != world.size:
            raise ConfigError(f"the checkpoint was taken during local SGD (--sync-every) on {len(own)} workers, each "
                              f"with parameters and momentum of its own; resume it with --workers {len(own)}")
        mine = own[world.rank]
        saved = saved.replace(params=mine["params"].to(world.device),
                              tx_state=state_from_tree(mine["tx_state"], world.device))
    with torch.no_grad():
        flat.params.copy_(saved.params)
        buffers = dict(flat.model.named_buffers())
        for name, value in blob["model"].items():
            if name in buffers:
                buffers[name].copy_(value)
    torch.manual_seed(seed)
    if world.rank < len(blob["ranks"]):
        checkpoint.set_rng_state(blob["ranks"][world.rank], comm_generator)
    return saved.replace(params=flat.params, comm_generator=comm_generator, torch_rng_state=torch.get_rng_state())


def save_checkpoint(state: TrainState, *, model: nn.Module, config: dict[str, Any], writer: RunWriter) -> None:
    """``checkpoint.pt``: the model's state_dict, the step and the config (what ``diversity --checkpoint``
    reads), plus the whole :class:`TrainState` (``train_state``, see :meth:`TrainState.to_checkpoint`)."""
    writer.save_checkpoint({"model": model.state_dict(), "step": state.step, "config": config,
                            "train_state": state.to_checkpoint()})


# --------------------------------------------------------------------------------------------------------
# The run


def _train(cfg: RunConfig, world: World, ds: Dataset | None, prepared: Prepared | None,
           loss: Callable | None = None, *, resume: bool = False) -> dict[str, Any]:
    torch.set_num_threads(_threads(cfg, world))
    if ds is None:  # this worker calls the data (and below the model) functions itself
        ds = load_data(cfg)
    if prepared is None:
        prepared = preflight(cfg, ds, loss=loss)
    model = prepared.model.to(world.device)
    model.train()
    flat = FlatModel(model, world.size, world.device)
    comm_generator = torch.Generator().manual_seed(cfg.seed * 1000 + world.rank)
    comm = _comm(cfg, world, comm_generator)
    tx = sgd(momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
             langevin_noise=cfg.langevin_noise, seed=cfg.seed)
    tap = NoiseTap(cfg.diversity, model, world_size=world.size) if cfg.diversity != "off" else None
    ema = NoiseScaleEMA(cfg.diversity_decay) if tap is not None else None
    state = TrainState(params=flat.params, tx_state=tx.init(flat.params), noise_ema=ema.init() if ema else None,
                       policy=prepared.policy.init_state(), global_batch_size=cfg.global_batch_size,
                       cursor=Cursor(), torch_rng_state=prepared.torch_rng_state, comm_generator=comm_generator)
    # As if this rank had built the model itself: every generator seeded from the seed (CUDA's too), torch's
    # CPU generator where the model's initialisation left it.
    torch.manual_seed(cfg.seed)
    torch.set_rng_state(state.torch_rng_state)

    run_dir = None
    if world.is_main:
        run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(
            short_name(cfg.model), short_name(cfg.dataset), cfg.global_batch_size, world.size, cfg.seed)
    resumed: dict[str, Any] = {}
    if resume:
        if not cfg.run_dir:
            raise ConfigError("a resumed run needs its run directory; pass --run-dir (the same on every rank)")
        newest = checkpoint.latest_checkpoint(cfg.run_dir)
        if newest is not None:
            blob = checkpoint.load(newest, num_parameters=flat.numel)
            state = restore(blob, flat=flat, comm_generator=comm_generator, world=world, seed=cfg.seed)
            resumed = {"elapsed_s": float(blob["elapsed_s"]), "last_eval": dict(blob["last_eval"] or {}),
                       "base_lr": float(blob["base_lr"])}
        if world.is_main:  # the metrics the interrupted job wrote after its checkpoint are written again
            truncate_metrics(cfg.run_dir, int(blob["metrics_bytes"]) if newest is not None else 0)
            checkpoint.remove_partial_writes(cfg.run_dir)  # a checkpoint the kill cut off mid-write
    writer = RunWriter(run_dir, enabled=world.is_main, purge_step=state.step + 1 if state.step else None)
    try:
        resolved = cfg.replace(workers=world.size, run_dir=str(run_dir) if run_dir else cfg.run_dir)
        writer.write_json("config.json", {**resolved.to_dict(), "comm_used": comm_name(cfg, world),
                                          "n_train": ds.n_train, "n_test": ds.n_test,
                                          "input_shape": list(ds.input_shape), "num_outputs": ds.num_outputs,
                                          "num_parameters": flat.numel})
        if writer.enabled:
            checkpoint.write_run_config(writer.run_dir, resolved.to_dict())
        writer.write_json("env.json", environment(world_size=world.size, backend=world.backend,
                                                  device=world.device))
        # A stop signal is recorded (and acted on at the next step) only while the loop runs; before it, the
        # default action ends the process at once (a rank blocked in a rendezvous would not see the request).
        try:
            with StopRequest() as stop:
                state, summary = _loop(state, cfg=cfg, world=world, ds=ds, flat=flat, comm=comm, tx=tx, tap=tap,
                                       ema=ema, lr_config=prepared.lr_config, policy=prepared.policy,
                                       loss=prepared.loss, writer=writer, config=resolved.to_dict(), stop=stop,
                                       resumed=resumed)
        finally:
            if tap is not None:
                tap.close()
        summary["run_dir"] = str(run_dir) if run_dir else None
        save_checkpoint(state, model=model, config=resolved.to_dict(), writer=writer)
        writer.write_json("summary.json", summary)
        return summary
    finally:
        writer.close()
        comm.close()


def _loop(state: TrainState, *, cfg: RunConfig, world: World, ds: Dataset, flat: FlatModel, comm: CommStrategy,
          tx: GradientTransformation, tap: NoiseTap | None, ema: NoiseScaleEMA | None, lr_config: LrConfig,
          policy: BatchPolicy, writer: RunWriter, config: dict[str, Any], stop: StopRequest,
          resumed: dict[str, Any], loss: Callable | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Train until the step or epoch budget is spent or the target is reached; returns the final state and
    the run summary. Checkpoints when due; after a stop signal, checkpoints and raises :class:`StoppedError`.
    ``resumed``: ``elapsed_s`` and ``last_eval`` of the checkpoint the state came from ({} on a fresh start)."""
    if cfg.algorithm != "sync":  # deferred: async_sgd is built on this module's stages
        from scalesgd import async_sgd

        return async_sgd.loop(state, cfg=cfg, world=world, ds=ds, flat=flat, tx=tx, lr_config=lr_config,
                              writer=writer, stop=stop, loss=loss)
    classification = ds.task == "classification"
    loss_fn, example_loss_fn, reader, read, stream, total_examples, eval_train_idx = loop_inputs(cfg, ds, world, loss)
    example_qsgd = ExampleQSGD(cfg.example_qsgd_levels) if cfg.example_qsgd_levels else None
    bar = _progress_bar(cfg, world, total_examples, state.examples)
    warm_up(state, shard_batch(state, stream=stream, world=world,
                               examples_left=None if cfg.steps else total_examples - state.examples),
            flat=flat, loss_fn=loss_fn, read=read, comm=comm)
    start_s = time.perf_counter() - resumed.get("elapsed_s", 0.0)  # wall time continues across a resume
    last_eval: dict[str, Any] = resumed.get("last_eval", {})
    ckpt = Checkpointing(cfg.checkpoint_every_steps, cfg.checkpoint_every_s, cfg.keep_checkpoints,
                         last_at=time.perf_counter())
    stragglers = parse_straggler(cfg.straggler)
    # whether every rank holds the same parameters (local SGD: only right after an average; a resume from a
    # checkpoint taken between two averages starts out of sync)
    in_sync = state.local_sgd_start is None or cfg.sync_every is None or state.step == 0 or averaging_due(
        state.step - 1, state.local_sgd_start, cfg.sync_every)

    # the goodput policy's step-time fit: the timing of the step before last, complete (its all-reduce and update
    # times came with the last step), and the last step's, waiting for those
    timing: StepTiming | None = None
    pending: StepTiming | None = None
    measured_at: int | None = None  # the step of the last exact diversity measurement

    try:
        if cfg.lr == "auto" and "base_lr" in resumed:  # the rate the interrupted run's probe found
            lr_config = dataclasses.replace(lr_config, base_lr=resumed["base_lr"])
        elif cfg.lr == "auto":
            # find the base lr: a range test from a saved copy of the state, inside the run's clock
            state, lr_config = lr_probe.find_base_lr(
                state, cfg=cfg, lr_config=lr_config, flat=flat, loss_fn=loss_fn, read=read, n_train=ds.n_train,
                world=world, comm=comm, tx=tx, classification=classification, start_s=start_s, writer=writer,
                total_steps=cfg.steps or math.ceil(total_examples / state.global_batch_size))
        if cfg.exact_diversity_every and state.step == 0:
            measured_at = 0
            log_exact_diversity(state, model=flat.model, loss_fn=example_loss_fn, ds=ds, world=world, estimate=None,
                                start_s=start_s, writer=writer)
        while not finished(state, steps=cfg.steps, total_examples=total_examples):
            # adapt: the batch size and learning rate for this step, from the estimates (and times) so far
            state, terms = adapt(state, policy=policy, lr_config=lr_config,
                                 estimate=smoothed_estimate(state, ema, ds.n_train), n_train=ds.n_train,
                                 world_size=world.size, writer=writer, timing=timing)
            # shard: the next global batch, in the same order whatever P is; this rank's part of it
            part = shard_batch(state, stream=stream, world=world,
                               examples_left=None if cfg.steps else total_examples - state.examples)
            # step: forward/backward, one all-reduce (gradient + statistics), the same update on every rank;
            # under local SGD (--sync-every) no communication, then the parameters averaged when due
            requests = (world.is_main and ckpt.time_due(time.perf_counter()), stop.signum is not None)
            state = local_phase(state, sync_every=cfg.sync_every, sync_every_after=cfg.sync_every_after,
                                n_train=ds.n_train)
            state, result = step(state, part, lr=terms.lr, flat=flat, loss_fn=loss_fn, read=read, rank=world.rank,
                                 comm=comm, tx=tx, tap=tap, classification=classification, seed=cfg.seed,
                                 local=state.local_sgd_start is not None,
                                 delay=straggler_delay(stragglers, seed=cfg.seed, rank=world.rank,
                                                       step_index=state.step),
                                 skip_compute=isinstance(comm, BackupWorkers) and comm.result_ready(),
                                 requests=requests, example_qsgd=example_qsgd)
            if policy.name == "goodput":  # step times for its fit, agreed one step late through the step's tail
                timing, pending = completed_timing(pending, result), pending_timing(state, result, part)
            state, local_record, agreed = average(state, flat=flat, comm=comm, world=world, sync_every=cfg.sync_every,
                                                  requests=requests)
            in_sync = local_record.get("averaged", True)
            checkpoint_requested, stop_requested = (result.checkpoint_requested or agreed[0],
                                                    result.stop_requested or agreed[1])
            if isinstance(comm, BackupWorkers):
                local_record = {"backup_used_ranks": list(comm.used_ranks)}
            # estimate: fold the step's unbiased ‖G‖², tr Σ into the smoothed estimates
            state, noise = estimate(state, result, ema=ema, n_train=ds.n_train)
            # log: the step's line; a non-finite or exploding loss stops the run here
            log_step(state, result, part, terms, noise, n_train=ds.n_train, classification=classification,
                     adascale=lr_config.rule == "adascale", start_s=start_s, writer=writer, extra=local_record)
            state = watch_loss(state, result.loss, lr=terms.lr, cfg=cfg, writer=writer)
            if bar is not None:
                _advance_bar(bar, part, result, last_eval)
            # evaluate: exact diversity, replica check and test accuracy when due
            # (between two local-SGD averages, on the average of the replicas, leaving each rank's own intact)
            if cfg.exact_diversity_every and state.step % cfg.exact_diversity_every == 0:
                measured_at = state.step
                with averaged_parameters(flat.params, comm, world.size, needed=not in_sync):
                    log_exact_diversity(state, model=flat.model, loss_fn=example_loss_fn, ds=ds, world=world,
                                        estimate=smoothed_estimate(state, ema, ds.n_train), start_s=start_s,
                                        writer=writer)
            if cfg.check_replicas_every and state.step % cfg.check_replicas_every == 0 and in_sync:
                verify_replicas(flat.params, world, state.step)
            due = (cfg.eval_every is not None and state.step % cfg.eval_every == 0) or (
                cfg.eval_every is None and part.batch.epoch_end)
            if due or finished(state, steps=cfg.steps, total_examples=total_examples):
                with averaged_parameters(flat.params, comm, world.size, needed=not in_sync):
                    last_eval = log_eval(state, model=flat.model, loss_fn=loss_fn, ds=ds,
                                         eval_train_idx=eval_train_idx, world=world, classification=classification,
                                         start_s=start_s, writer=writer)
                state = reached_target(state, last_eval, target=cfg.target_accuracy, metric=cfg.target_metric)
                if state.time_to_target_s is not None:
                    break
            # checkpoint: every k steps, when rank 0's clock says so, or on a stop signal to any rank
            done = finished(state, steps=cfg.steps, total_examples=total_examples)
            if not done and (ckpt.step_due(state.step) or checkpoint_requested or stop_requested):
                t0 = time.perf_counter()
                save_train_checkpoint(state, flat=flat, config=config, world=world, writer=writer,
                                      elapsed_s=t0 - start_s, last_eval=last_eval, keep=ckpt.keep,
                                      base_lr=lr_config.base_lr)
                ckpt.last_at = time.perf_counter()
                ckpt.last_save_s = ckpt.last_at - t0
                ckpt.saves += 1
                ckpt.save_s += ckpt.last_save_s
                if stop_requested:
                    raise StoppedError(
                        f"stopped by {stop.name or 'a signal to another worker'} after step {state.step}; "
                        f"checkpoint {checkpoint.checkpoint_path(cfg.run_dir or '.', state.step)}; resume with: "
                        f"scalesgd train --resume {cfg.run_dir}", signum=stop.signum)
    finally:
        reader.close()
        if bar is not None:
            bar.close()
    if not in_sync:  # local SGD ended between two averages: the run's model is the average of the replicas
        average_parameters_(flat.params, comm, world.size)
    if cfg.exact_diversity_every and measured_at != state.step:  # the final step too, a multiple of k or not
        log_exact_diversity(state, model=flat.model, loss_fn=example_loss_fn, ds=ds, world=world,
                            estimate=smoothed_estimate(state, ema, ds.n_train), start_s=start_s, writer=writer)
    if not last_eval or last_eval["step"] != state.step:
        last_eval = log_eval(state, model=flat.model, loss_fn=loss_fn, ds=ds, eval_train_idx=eval_train_idx,
                             world=world, classification=classification, start_s=start_s, writer=writer)
    return state, run_summary(state, last_eval, cfg=cfg, world=world, n_train=ds.n_train, num_parameters=flat.numel,
                              start_s=start_s, checkpoints=ckpt.saves, checkpoint_s=ckpt.save_s)


def _progress_bar(cfg: RunConfig, world: World, total_examples: int, done_examples: int = 0):
    """Rank 0's tqdm bar over the run's examples, starting at ``done_examples`` (a resumed run's progress)."""
    if not (cfg.progress and world.is_main):
        return None
    import threading

    from tqdm.auto import tqdm

    # Only rank 0 draws a bar: a thread lock does. tqdm's default lock adds a multiprocessing semaphore, which a
    # worker leaving through os._exit never unregisters, so the resource tracker warned of a leak at exit.
    tqdm.set_lock(threading.RLock())
    return tqdm(total=total_examples, initial=done_examples, unit="ex", unit_scale=True, dynamic_ncols=True, leave=True,
                desc=f"train P={world.size}", mininterval=0.5)


def _advance_bar(bar, part: Shard, result: StepResult, last_eval: dict[str, Any]) -> None:
    b = int(part.batch.indices.numel())
    step_s = result.compute_s + result.comm_s + result.update_s
    bar.update(b)
    postfix = {"loss": f"{result.loss:.3f}", "ex/s": f"{b / step_s:,.0f}" if step_s > 0 else "-"}
    if last_eval.get("test_accuracy") is not None:
        postfix["test_acc"] = f"{last_eval['test_accuracy']:.3f}"
    bar.set_postfix(postfix, refresh=False)


def train(cfg: RunConfig, ds: Dataset | None = None, *, model: nn.Module | None = None,
          model_factory: Callable | None = None, loss: Callable | None = None, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg``: under torchrun as the rank it made, otherwise on ``cfg.workers`` local processes.

    Import strings in ``cfg.model`` / ``cfg.dataset`` / ``cfg.loss`` are resolved here (to check them before
    anything starts) and again by every worker, which calls the functions itself: nothing of a user's
    model or data is pickled. Objects (``ds``, ``model``, ``model_factory``, ``loss``, as :func:`scalesgd.fit`
    passes them) travel pickled with the spawn payload.

    The launcher (rank 0 under torchrun) holds a lock on the run directory for the job's life. With
    ``resume`` (``scalesgd train --resume``), or when torchrun restarted the job
    (:func:`scalesgd.distributed.torchrun_restarted`), the run continues from the newest checkpoint in
    ``cfg.run_dir``. Local workers that die are
    restarted from the newest checkpoint up to ``cfg.max_restarts`` times.

    Returns rank 0's summary (under torchrun: this rank's).
    Raises:
        WorkerFailedError: a worker died (naming it and its signal or exit code) and no restart was left.
        StoppedError: the job was stopped by a signal after writing a checkpoint.
    """
    rdv = distributed.torchrun_rendezvous()
    check_ranks(parse_straggler(cfg.straggler), rdv.size if rdv is not None else cfg.workers)
    if rdv is not None:  # torchrun starts its workers in sessions of their own: stop when the agent dies
        distributed.stop_with_parent(os.getppid())
    main = rdv is None or rdv.rank == 0  # only rank 0 writes the run directory
    lock, locked = contextlib.ExitStack(), False
    if resume and cfg.algorithm != "sync":
        raise ConfigError(f"--algorithm {cfg.algorithm} writes no checkpoints, so there is nothing to --resume; "
                          "start the run again")
    if resume:
        if main and cfg.run_dir and Path(cfg.run_dir).is_dir():  # a run still going is named before anything
            lock.enter_context(lock_run_dir(cfg.run_dir))
            locked = True
        check_resumable(cfg.run_dir)
    elif rdv is not None and distributed.torchrun_restarted(rdv, cfg.timeout_s):
        if not cfg.run_dir:
            raise ConfigError("torchrun restarted the job, but it has no --run-dir to resume from; give every "
                              "rank the same --run-dir so a restart continues the run")
        resume = True  # from the newest checkpoint, or from the start if the first attempt wrote none
    elif main:
        check_run_dir_is_new(cfg.run_dir)
        if not cfg.run_dir:
            cfg = cfg.replace(run_dir=str(default_run_dir(short_name(cfg.model), short_name(cfg.dataset),
                                                          cfg.global_batch_size, rdv.size if rdv else cfg.workers,
                                                          cfg.seed)))
    # .py paths made absolute: config.json then names files that any later command can find
    cfg = cfg.replace(model=canonical(cfg.model), dataset=canonical(cfg.dataset), loss=canonical(cfg.loss))
    given_ds = ds is not None
    if ds is None:
        ds = load_data(cfg)
    prepared = preflight(cfg, ds, model=model, model_factory=model_factory, loss=loss)
    with lock:
        if main and not locked:
            lock.enter_context(lock_run_dir(cfg.run_dir))
        if main and not resume:
            check_run_dir_is_new(cfg.run_dir, locked=True)  # again under the lock: a run that finished meanwhile
        if rdv is not None:
            return worker(rdv, cfg, ds, prepared, resume=resume)
        if cfg.workers == 1 and cfg.max_restarts == 0:
            return worker(Rendezvous("127.0.0.1", 0, 0, 1, 0), cfg, ds, prepared, resume=resume)
        distributed.check_local_address(cfg.master_addr)
        cores = os.cpu_count() or 1
        if cfg.workers > cores and distributed.resolve_backend(cfg.backend) == "gloo":
            # More blocking workers than cores: every all-reduce waits for each peer's time slice.
            threads = cfg.threads_per_worker or 1
            print(f"warning: {cfg.workers} local workers on {cores} CPU cores, {threads} torch thread(s) each "
                  f"(--threads-per-worker {threads}); each worker waits for a time slice at every all-reduce, so "
                  f"steps slow down many-fold. Use --workers {cores} or fewer here, or run the extra workers on "
                  "other machines with torchrun.", file=sys.stderr, flush=True)
        # What the user named by import strings, every worker calls itself (nothing large is pickled, and a
        # class from a .py file loaded by path could not be unpickled by name); objects travel pickled.
        own_model = is_import_string(cfg.model) and model is None and model_factory is None
        restarts = 0
        while True:
            args = (cfg, None if is_import_string(cfg.dataset) and not given_ds else ds,
                    None if own_model else prepared, loss, resume)
            try:
                results = distributed.spawn(worker, cfg.workers, args, port=cfg.master_port, addr=cfg.master_addr,
                                            timeout_s=None)
                return results[0]
            except WorkerFailedError as e:
                if restarts >= cfg.max_restarts:
                    raise
                restarts += 1
                newest = checkpoint.latest_checkpoint(cfg.run_dir)
                where = f"checkpoint {newest.name}" if newest is not None else "the start (no checkpoint yet)"
                print(f"scalesgd: {str(e).splitlines()[0]}; restarting from {where} "
                      f"(restart {restarts} of {cfg.max_restarts})", file=sys.stderr, flush=True)
                resume = True


def check_resumable(run_dir: str | None) -> None:
    """Refuse to resume what is not an unfinished run directory.

    Raises:
        ConfigError: no such directory, no config.json in it, or the run already finished (summary.json).
    """
    if not run_dir or not Path(run_dir).is_dir():
        raise ConfigError(f"cannot resume {run_dir}: no such run directory; pass the directory `scalesgd train` "
                          "printed")
    if not (Path(run_dir) / "config.json").is_file():
        raise ConfigError(f"cannot resume {run_dir}: it has no config.json, so it is not a run directory")
    if (Path(run_dir) / "summary.json").exists():
        raise ConfigError(f"{run_dir} holds a finished run (summary.json); there is nothing to resume")
