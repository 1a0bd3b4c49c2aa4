"""Plain PyTorch DistributedDataParallel + ``torch.optim.SGD``: the reference a user would compare with.

Used by the equivalence tests (same seeds, same global batches → same parameters), by
``bench/throughput.py`` and by ``bench/time_to_accuracy.py``. It is deliberately the textbook DDP loop,
with one difference that makes it exact for shards of unequal size: DDP averages the ranks' gradients,
so each rank backpropagates ``P · Σ_{i∈shard} ℓᵢ / B``, which averages to the mean loss of the global batch.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from scalesgd import distributed
from scalesgd.config import RunConfig
from scalesgd.data import Dataset
from scalesgd.data.sharding import BatchStream, Cursor, shard
from scalesgd.distributed import Rendezvous
from scalesgd.errors import ConfigError


def ddp_worker(rdv: Rendezvous, cfg: RunConfig, ds: Dataset, *, return_params: bool = False,
               eval_every_epoch: bool = True, eval_every_epochs: float | None = None,
               max_wall_s: float | None = None) -> dict[str, Any]:
    """Train ``cfg`` with DDP + torch.optim.SGD (constant or cosine lr); returns timings and accuracy.

    Evaluates test accuracy at the end of every epoch (``eval_every_epoch``), or, with
    ``eval_every_epochs=g``, after the step that first crosses each multiple of g·n_train examples.
    The result lists every evaluation (``evals``: step, epoch, test accuracy, wall time at its end and
    the evaluation's own duration), so time to a target can be read with or without evaluation time.
    At an evaluation the run also stops (``stopped``) if its loss is no longer finite ("diverged") or its
    wall time passed ``max_wall_s`` ("time limit"), so a tuning grid does not wait on hopeless settings.
    """
    world = distributed.init_world(rdv, cfg.backend, timeout_s=cfg.timeout_s)
    try:
        return ddp_train(world, cfg, ds, return_params=return_params, eval_every_epoch=eval_every_epoch,
                         eval_every_epochs=eval_every_epochs, max_wall_s=max_wall_s)
    finally:
        distributed.shutdown_world()


def ddp_train(world: distributed.World, cfg: RunConfig, ds: Dataset, *, return_params: bool = False,
              eval_every_epoch: bool = True, eval_every_epochs: float | None = None,
              max_wall_s: float | None = None) -> dict[str, Any]:
    """:func:`ddp_worker`'s training on a process group that is already up (``world``); left up on return, so a
    bench can alternate this loop with the scalesgd trainer's on the same processes."""
    from scalesgd.lr_rules import LrConfig, learning_rate
    from scalesgd.models import build_model, loss_function

    if cfg.lr == "auto":
        raise ConfigError("the DDP baseline trains at an explicit --lr; 'auto' (the range test) is the scalesgd "
                          "trainer's: give a number")
    torch.set_num_threads(cfg.threads_per_worker or 1)
    model = build_model(cfg.model, input_shape=ds.input_shape, num_outputs=ds.num_outputs, seed=cfg.seed,
                        width=cfg.width, depth=cfg.depth, dropout=cfg.dropout, norm=cfg.norm).to(world.device)
    ddp = DDP(model) if world.size > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    loss_fn = loss_function(ds.task)
    classification = ds.task == "classification"
    x_train, y_train = ds.x_train.to(world.device), ds.y_train.to(world.device)
    stream = BatchStream(ds.n_train, cfg.seed)
    total = cfg.steps * cfg.global_batch_size if cfg.steps else int(math.ceil(cfg.epochs * ds.n_train))
    lr_cfg = LrConfig.from_run_config(cfg)
    cursor, step, examples, train_time = Cursor(), 0, 0, 0.0
    start = time.perf_counter()
    time_to_target = None
    accuracy = None
    evals: list[dict[str, float]] = []
    stopped = None
    eval_examples = None if eval_every_epochs is None else eval_every_epochs * ds.n_train
    while (step < cfg.steps) if cfg.steps else (examples < total):
        epoch_float = cursor.epoch + cursor.offset / ds.n_train
        want = cfg.global_batch_size if cfg.steps else min(cfg.global_batch_size, total - examples)
        batch, cursor = stream.next(cursor, want)
        b = int(batch.indices.numel())
        local = shard(batch.indices, world.rank, world.size)
        for group in opt.param_groups:
            group["lr"] = learning_rate(lr_cfg, step=step, epoch=epoch_float,
                                          global_batch_size=cfg.global_batch_size)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        out = ddp(x_train[local])
        loss = loss_fn(out, y_train[local]) * (world.size / b)
        loss.backward()
        opt.step()
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        step += 1
        examples += b
        last = (step >= cfg.steps) if cfg.steps else (examples >= total)
        if eval_examples is not None:
            due = int(examples // eval_examples) > int((examples - b) // eval_examples) or last
        else:
            due = eval_every_epoch and (batch.epoch_end or last)
        if due and classification:
            t_eval = time.perf_counter()
            accuracy = _accuracy(model, ds, world)
            # Every rank must take the same decision to stop, or the one that goes on waits forever.
            flags = distributed.all_reduce_scalars(
                [float(not math.isfinite(loss.item())),
                 float(max_wall_s is not None and t_eval - start > max_wall_s)], world)
            now = time.perf_counter()
            evals.append({"step": step, "epoch": examples / ds.n_train, "test_accuracy": accuracy,
                          "time_s": now - start, "eval_s": now - t_eval})
            if cfg.target_accuracy is not None and accuracy >= cfg.target_accuracy:
                time_to_target = now - start
                break
            stopped = "diverged" if flags[0] else "time limit" if flags[1] else None
            if stopped:
                break
    out: dict[str, Any] = {"steps": step, "train_time_s": train_time, "wall_s": time.perf_counter() - start,
                           "final_test_accuracy": accuracy, "time_to_target_s": time_to_target,
                           "epochs": cursor.epoch + cursor.offset / ds.n_train, "evals": evals,
                           "stopped": stopped}
    if return_params:
        out["params"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return out


@torch.no_grad()
def _accuracy(model: nn.Module, ds: Dataset, world) -> float:
    from scalesgd.step import evaluate

    loss_sum, correct, count = evaluate(model, lambda o, y: torch.zeros(()), ds.x_test, ds.y_test,
                                        rank=world.rank, world_size=world.size, device=world.device,
                                        classification=True)
    total = distributed.all_reduce_scalars([correct, count], world)
    return total[0] / max(total[1], 1.0)
