"""Steady-state examples/s of scalesgd's training step against plain PyTorch DDP + torch.optim.SGD.

Same model, same data, same global batch, P processes (default 2), in the same run: the two loops
alternate in blocks of steps on the same processes, warm-up excluded, and the medians over blocks are
compared. Target: scalesgd ≥ 0.95× DDP for the MLP and the CNN (stretch ≥ 1.0×).

``--loop`` compares the whole training loops instead of the step alone: ``scalesgd train``'s loop
(:func:`scalesgd.run._train`: batch policy, sharding, the step with its statistics tail, the cheap noise
estimate, the metrics line, loss watch, checkpoint polling) against the DDP baseline's loop
(:func:`scalesgd.baselines.ddp_train`), both on a built-in task with its real data, at a few global batches,
alternating on the same processes (the order flips every repeat). Each loop runs ``--steps`` and then
2 × ``--steps`` steps; the difference of the two runs' times over ``--steps`` is the steady per-step cost, free
of each loop's set-up (model, files, DDP's broadcast and first-iteration work; scalesgd's warm-up step and its
one evaluation at the end), which is printed apart. Both the wall time and the CPU time of the process
(``time.process_time``: what the loop itself costs, less sensitive than the wall clock to other jobs on a
shared machine) are reported, with the medians of the paired scalesgd/DDP ratios.

    python bench/throughput.py --loop                                   # mnist1d/cnn1d and digits/mlp, B 128 512
    python bench/throughput.py --loop --batch-policy goodput --batches 128
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
import statistics
import tempfile
import time
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scalesgd import distributed
from scalesgd.baselines import ddp_train
from scalesgd.comm import make_comm
from scalesgd.comm_registry import COMM_CHOICES, resolve_comm
from scalesgd.config import RunConfig
from scalesgd.data import load_data
from scalesgd.models import MODELS
from scalesgd.models import loss_function
from scalesgd.step import FlatModel, train_step
from scalesgd.transforms import Hyper, sgd
from scalesgd.writer import write_json_atomic

CASES = {
    "mlp": dict(model="mlp", input_shape=(784,), width=256, batch=128),
    "cnn": dict(model="cnn", input_shape=(3, 32, 32), width=32, batch=64),
    "cnn1d": dict(model="cnn1d", input_shape=(40,), width=32, batch=128),
}
LR, MOMENTUM, WD = 0.01, 0.9, 5e-4
LOOP_TASKS = {"mnist1d-cnn1d": ("mnist1d", "cnn1d"), "digits-mlp": ("digits", "mlp")}


def _build(case: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[case["model"]](input_shape=case["input_shape"], num_outputs=10, width=case["width"])


def compare_steps(world, build_model: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor,
                  global_batch_size: int, shard_sizes: list[int], *, blocks: int, steps_per_block: int,
                  warmup_steps: int, comm_name: str = "auto", wrap_ddp: bool | None = None) -> dict:
    """examples/s of scalesgd's train_step and of DDP + torch.optim.SGD on this rank's shard ``x, y``.

    Both loops run on the same process, alternating in blocks (the order flips every block), after
    ``warmup_steps`` untimed steps each. ``build_model()`` must give the same initial model on every call.
    ``wrap_ddp``: wrap the reference in DDP (needs an initialised default process group); None: when P > 1.
    ``comm_name``: scalesgd's strategy, ``auto`` resolved as the trainer resolves it (ring-tcp on CPU workers).
    Returns ``{"ours": [ex/s per block], "ddp": [...], "device": str, "comm": the strategy that ran}``.
    """
    B = global_batch_size
    loss_fn = loss_function("classification")

    # scalesgd
    model = build_model().to(world.device)
    flat = FlatModel(model, world.size, world.device)
    comm_name = resolve_comm(comm_name, backend=world.backend, device_type=world.device.type,
                             world_size=world.size)
    comm = make_comm(comm_name, world)
    tx = sgd(momentum=MOMENTUM, weight_decay=WD)
    state = {"tx": tx.init(flat.params), "step": 0}

    def ours(n: int) -> None:
        for _ in range(n):
            _, state["tx"] = train_step(flat=flat, loss_fn=loss_fn, x=x, y=y, global_batch_size=B,
                                        shard_sizes=shard_sizes, rank=world.rank, comm=comm, tx=tx,
                                        tx_state=state["tx"], hyper=Hyper(lr=LR, step=state["step"]))
            state["step"] += 1

    # plain DDP + torch.optim.SGD, as a user would write it
    ref_model = build_model().to(world.device)
    ddp = DDP(ref_model) if (world.size > 1 if wrap_ddp is None else wrap_ddp) else ref_model
    opt = torch.optim.SGD(ref_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)

    def ddp_steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(ddp(x), y) * (world.size / B)
            loss.backward()
            opt.step()
            _ = loss.item()  # the loss a progress bar shows; scalesgd's step reports it too

    def timed(fn, n: int) -> float:
        distributed.barrier(world)
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(n)
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        distributed.barrier(world)
        return time.perf_counter() - t0

    ours(warmup_steps)
    ddp_steps(warmup_steps)
    ours_rates, ddp_rates = [], []
    for block in range(blocks):
        order = (("ours", ours), ("ddp", ddp_steps)) if block % 2 == 0 else (("ddp", ddp_steps), ("ours", ours))
        for name, fn in order:
            rate = B * steps_per_block / timed(fn, steps_per_block)
            (ours_rates if name == "ours" else ddp_rates).append(rate)
    return {"ours": ours_rates, "ddp": ddp_rates, "device": str(world.device), "comm": comm_name}


def bench_worker(rdv, case_name: str, blocks: int, steps_per_block: int, warmup_steps: int,
                 backend: str, comm_name: str = "auto") -> dict:
    world = distributed.init_world(rdv, backend, timeout_s=300)
    try:
        torch.set_num_threads(1)
        case = CASES[case_name]
        B = case["batch"]
        local = torch.tensor_split(torch.arange(B), world.size)[world.rank]
        shard_sizes = [int(t.numel()) for t in torch.tensor_split(torch.arange(B), world.size)]
        g = torch.Generator().manual_seed(100 + world.rank)
        x = torch.randn(len(local), *case["input_shape"], generator=g).to(world.device)
        y = torch.randint(0, 10, (len(local),), generator=g).to(world.device)
        return compare_steps(world, lambda: _build(case), x, y, B, shard_sizes, blocks=blocks,
                             steps_per_block=steps_per_block, warmup_steps=warmup_steps, comm_name=comm_name)
    finally:
        distributed.shutdown_world()


def loop_worker(rdv, dataset: str, model: str, batches: list[int], steps: int, repeats: int,
                batch_policy: str) -> dict:
    """One rank: for every global batch, ``repeats`` pairs of (scalesgd's loop, DDP's loop), each run for
    ``steps`` and for 2·``steps`` steps, the order flipped every repeat. Returns, by batch, per repeat: the
    steady per-step wall and CPU time (s) of each loop (the two runs' difference over ``steps``) and its
    set-up (the shorter run less ``steps`` steady steps)."""
    from scalesgd import run

    world = distributed.init_world(rdv, "gloo", timeout_s=600)
    out: dict[int, dict[str, list[float]]] = {}
    try:
        torch.set_num_threads(1)
        ds = None
        with tempfile.TemporaryDirectory(prefix="loop-bench-") as tmp:
            # untimed: the first DDP model of a process pays a one-time start-up of seconds
            warm = dict(dataset=dataset, model=model, global_batch_size=batches[0], lr=0.1, steps=2,
                        workers=world.size, threads_per_worker=1, progress=False, eval_train_examples=0)
            ds = load_data(RunConfig(**warm))
            ddp_train(world, RunConfig(**warm, diversity="off"), ds, eval_every_epoch=False)
            for b in batches:
                rows = out.setdefault(b, {})
                for r in range(repeats):
                    for who in (("ours", "ddp") if r % 2 == 0 else ("ddp", "ours")):
                        spent = []
                        for n in (steps, 2 * steps):
                            common = dict(dataset=dataset, model=model, global_batch_size=b, lr=0.1, steps=n,
                                          workers=world.size, threads_per_worker=1, progress=False,
                                          eval_train_examples=0, eval_every=n + 1)
                            distributed.barrier(world)
                            c0, t0 = time.process_time(), time.perf_counter()
                            if who == "ours":
                                # goodput held at b (min = max): its per-step work (timings, fit, estimate) is
                                # measured at the batch DDP runs, though its search then has one candidate
                                pin = dict(min_batch=b, max_batch=b) if batch_policy == "goodput" else {}
                                cfg = RunConfig(**common, batch_policy=batch_policy, **pin,
                                                run_dir=f"{tmp}/B{b}-r{r}-{n}")
                                run._train(cfg, world, ds, run.preflight(cfg, ds))
                            else:
                                ddp_train(world, RunConfig(**common, diversity="off"), ds, eval_every_epoch=False)
                            spent.append((time.perf_counter() - t0, time.process_time() - c0))
                        (wall1, cpu1), (wall2, cpu2) = spent
                        for key, value in (("wall", (wall2 - wall1) / steps), ("cpu", (cpu2 - cpu1) / steps)):
                            rows.setdefault(f"{who}_{key}", []).append(value)
                        rows.setdefault(f"{who}_setup_wall", []).append(wall1 - (wall2 - wall1))
        return out
    finally:
        distributed.shutdown_world()


def loop_main(args) -> int:
    results = {}
    for task in args.tasks:
        dataset, model = LOOP_TASKS[task]
        out = distributed.spawn(loop_worker, args.workers, (dataset, model, args.batches, args.steps, args.repeats,
                                                            args.batch_policy), timeout_s=3600)
        for b in args.batches:
            ranks = [o[b] for o in out]
            med = {k: statistics.median(v for rank in ranks for v in rank[k]) for k in ranks[0]}
            # a pair with a difference that is not positive (a stall in the shorter run) has no ratio
            pairs = {key: [o / d for rank in ranks for o, d in zip(rank[f"ours_{key}"], rank[f"ddp_{key}"])
                           if o > 0 and d > 0]
                     for key in ("wall", "cpu")}
            ratio = {key: statistics.median(v) if v else math.nan for key, v in pairs.items()}
            print(f"loop {task:14s} B={b:<4d} P={args.workers} --batch-policy {args.batch_policy}: per step scalesgd "
                  f"{med['ours_wall'] * 1e3:6.2f} ms wall {med['ours_cpu'] * 1e3:6.2f} ms CPU, DDP "
                  f"{med['ddp_wall'] * 1e3:6.2f} ms wall {med['ddp_cpu'] * 1e3:6.2f} ms CPU; scalesgd/DDP paired "
                  f"medians: wall {ratio['wall']:.2f}, CPU {ratio['cpu']:.2f}; set-up {med['ours_setup_wall']:.2f} s "
                  f"vs {med['ddp_setup_wall']:.2f} s ({args.repeats} repeats of {args.steps} and {2 * args.steps} "
                  f"steps, load {os.getloadavg()[0]:.1f})", flush=True)
            results[f"{task} B={b}"] = {"task": task, "global_batch_size": b, "workers": args.workers,
                                        "batch_policy": args.batch_policy, "steps": args.steps,
                                        **{f"{key}_ratio": v if math.isfinite(v) else None for key, v in ratio.items()},
                                        **{f"{k}_s": v for k, v in med.items()}, "per_rank": ranks}
    if args.json:
        write_json_atomic(Path(args.json), results)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(CASES))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--steps-per-block", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--backend", default="auto")
    p.add_argument("--comm", default="auto", choices=COMM_CHOICES,
                   help="scalesgd's communication strategy (DDP keeps its own); auto: what the trainer runs, "
                        "ring-tcp on CPU workers")
    p.add_argument("--quick", action="store_true", help="few short blocks (smoke test)")
    p.add_argument("--json", metavar="FILE")
    loop = p.add_argument_group("--loop: the whole training loops on a built-in task")
    loop.add_argument("--loop", action="store_true", help="compare scalesgd's training loop with DDP's")
    loop.add_argument("--tasks", nargs="+", default=list(LOOP_TASKS), choices=sorted(LOOP_TASKS))
    loop.add_argument("--batches", nargs="+", type=int, default=[128, 512], help="global batches")
    loop.add_argument("--steps", type=int, default=300, help="steps per loop run")
    loop.add_argument("--repeats", type=int, default=4, help="(scalesgd, DDP) pairs per batch")
    loop.add_argument("--batch-policy", default="fixed", choices=["fixed", "goodput"],
                      help="scalesgd's batch policy (goodput: held at each batch by --min-batch = --max-batch)")
    args = p.parse_args()
    if args.loop:
        if args.quick:
            args.steps, args.repeats = 30, 2
        return loop_main(args)
    if args.quick:
        args.blocks, args.steps_per_block, args.warmup_steps = 4, 10, 5
    results = {}
    for name in args.models:
        out = distributed.spawn(bench_worker, args.workers,
                                (name, args.blocks, args.steps_per_block, args.warmup_steps, args.backend,
                                         args.comm),
                                timeout_s=900)[0]
        ours, ddp = statistics.median(out["ours"]), statistics.median(out["ddp"])
        ratio = ours / ddp
        verdict = "MET (stretch met)" if ratio >= 1.0 else "MET" if ratio >= 0.95 else "MISSED"
        case = CASES[name]
        print(f"throughput {name:6s} B={case['batch']:<4d} P={args.workers} {out['device']} --comm {out['comm']}: "
              f"scalesgd {ours:10.0f} ex/s   DDP {ddp:10.0f} ex/s   ratio {ratio:.3f}  "
              f"(target >= 0.95, stretch >= 1.0: {verdict})", flush=True)
        results[name] = {"global_batch_size": case["batch"], "workers": args.workers, "device": out["device"],
                         "comm": out["comm"],
                         "scalesgd_examples_per_s": ours, "ddp_examples_per_s": ddp, "ratio": ratio,
                         "blocks_scalesgd": out["ours"], "blocks_ddp": out["ddp"], "verdict": verdict}
    if args.json:
        write_json_atomic(Path(args.json), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
