"""A plain PyTorch DDP training loop with scalesgd's adaptive global batch and learning rate.

    python examples/ddp_loop.py                        # spawns 2 gloo workers on this CPU
    torchrun --nproc-per-node 2 examples/ddp_loop.py   # or let torchrun start them

The lines marked ``# scalesgd`` are all that differs from the usual DistributedSampler loop (README,
"Inside your own DDP loop"): AdaptiveBatch registers a DDP communication hook that estimates the gradient
noise scale B_S, serves each rank its shard of a global batch chosen by the diversity policy, and sets the
optimizer's lr by the AdaScale rule before each step.
"""

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import scalesgd.ddp  # scalesgd


def synthetic_data(n: int, dim: int = 20, classes: int = 4) -> TensorDataset:
    """Gaussian inputs, labels from a random linear teacher with 20% of them flipped (a noisy problem)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, dim, generator=g)
    y = (x @ torch.randn(dim, classes, generator=g)).argmax(1)
    flip = torch.rand(n, generator=g) < 0.2
    y[flip] = torch.randint(0, classes, (int(flip.sum()),), generator=g)
    return TensorDataset(x, y)


def train(rank: int, world_size: int, args: argparse.Namespace) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                                world_size=world_size)
    torch.manual_seed(0)
    data = synthetic_data(args.n)
    model = DDP(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    ab = scalesgd.ddp.AdaptiveBatch(model, data, optimizer=opt, global_batch_size=32, lr_rule="adascale",  # scalesgd
                                    policy_options=dict(min_steps=20, min_interval_steps=20, patience_steps=5))
    loader = DataLoader(data, batch_sampler=ab)  # scalesgd (was: batch_size=16, sampler=DistributedSampler(data))
    for epoch in range(args.epochs):
        sizes = []
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sizes.append(ab.last.global_batch_size)
        if rank == 0:
            est = ab.estimate()
            print(f"epoch {epoch}: loss {loss.item():.3f}, {len(sizes)} steps, global batch sizes used "
                  f"{sorted(set(sizes))}, B_S estimate {est['batch_bound_est']:.1f}, lr {ab.lr:.4f}", flush=True)
    dist.barrier()  # every rank done with its collectives before any tears its connections down
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n", type=int, default=4096, help="training examples")
    parser.add_argument("--workers", type=int, default=2, help="processes to spawn (without torchrun)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")
        train(dist.get_rank(), dist.get_world_size(), args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        args.port = s.getsockname()[1]
    mp.spawn(train, args=(args.workers, args), nprocs=args.workers)


if __name__ == "__main__":
    main()
