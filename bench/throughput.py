"""Steady-state examples/s of scalesgd's training step against plain PyTorch DDP + torch.optim.SGD.

Same model, same data, same global batch, P processes (default 2), in the same run: the two loops
alternate in blocks of steps on the same processes, warm-up excluded, and the medians over blocks are
compared. Target: scalesgd ≥ 0.95× DDP for the MLP and the CNN (stretch ≥ 1.0×).

    python bench/throughput.py                 # MLP (784-256-256-10, B=128) and CNN (3x32x32, B=64)
    python bench/throughput.py --quick --json out.json
    python bench/throughput.py --comm ring-tcp  # scalesgd's step with another communication strategy
"""

from __future__ import annotations

import argparse
from pathlib import Path
import statistics
import time
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scalesgd import distributed
from scalesgd.comm import make_comm
from scalesgd.comm_registry import COMM_NAMES
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


def _build(case: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[case["model"]](input_shape=case["input_shape"], num_outputs=10, width=case["width"])


def compare_steps(world, build_model: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor,
                  global_batch_size: int, shard_sizes: list[int], *, blocks: int, steps_per_block: int,
                  warmup_steps: int, comm_name: str = "allreduce", wrap_ddp: bool | None = None) -> dict:
    """examples/s of scalesgd's train_step and of DDP + torch.optim.SGD on this rank's shard ``x, y``.

    Both loops run on the same process, alternating in blocks (the order flips every block), after
    ``warmup_steps`` untimed steps each. ``build_model()`` must give the same initial model on every call.
    ``wrap_ddp``: wrap the reference in DDP (needs an initialised default process group); None: when P > 1.
    Returns ``{"ours": [ex/s per block], "ddp": [...], "device": str}``.
    """
    B = global_batch_size
    loss_fn = loss_function("classification")

    # scalesgd
    model = build_model().to(world.device)
    flat = FlatModel(model, world.size, world.device)
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
    return {"ours": ours_rates, "ddp": ddp_rates, "device": str(world.device)}


def bench_worker(rdv, case_name: str, blocks: int, steps_per_block: int, warmup_steps: int,
                 backend: str, comm_name: str = "allreduce") -> dict:
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(CASES))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--steps-per-block", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--backend", default="auto")
    p.add_argument("--comm", default="allreduce", choices=COMM_NAMES,
                   help="scalesgd's communication strategy (DDP keeps its own)")
    p.add_argument("--quick", action="store_true", help="few short blocks (smoke test)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
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
        print(f"throughput {name:6s} B={case['batch']:<4d} P={args.workers} {out['device']} --comm {args.comm}: "
              f"scalesgd {ours:10.0f} ex/s   DDP {ddp:10.0f} ex/s   ratio {ratio:.3f}  "
              f"(target >= 0.95, stretch >= 1.0: {verdict})", flush=True)
        results[name] = {"global_batch_size": case["batch"], "workers": args.workers, "device": out["device"],
                         "comm": args.comm,
                         "scalesgd_examples_per_s": ours, "ddp_examples_per_s": ddp, "ratio": ratio,
                         "blocks_scalesgd": out["ours"], "blocks_ddp": out["ddp"], "verdict": verdict}
    if args.json:
        write_json_atomic(Path(args.json), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
