"""Synchronous data parallelism is exact: P workers equal one process on the same global batches, the
replicas stay bit-identical after every step, and the result matches PyTorch's own DDP + torch.optim.SGD."""

from __future__ import annotations

import pytest
import torch

from scalesgd import distributed
from scalesgd.baselines import ddp_worker
from scalesgd.config import RunConfig
from scalesgd.data import Dataset
from scalesgd.run import train

STEPS = 20
BATCH = 21  # divisible by neither 2 nor 4


def _dataset(shape: tuple[int, ...], n: int = 150, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset("random", x, y, x[:40], y[:40], num_outputs=10)


CASES = {
    "mlp": (dict(model="mlp", width=32), (64,)),
    "cnn1d": (dict(model="cnn1d", width=8), (40,)),
}


def _config(tmp_path, model_kwargs, workers: int, tag: str) -> RunConfig:
    return RunConfig(**model_kwargs, global_batch_size=BATCH, steps=STEPS, lr=0.05, momentum=0.9,
                     weight_decay=1e-3, lr_schedule="constant", workers=workers, diversity="off",
                     eval_every=1000, eval_train_examples=20, progress=False, check_replicas_every=1,
                     threads_per_worker=1, timeout_s=60, run_dir=str(tmp_path / tag), seed=3)


def _params(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(f"{run_dir}/checkpoint.pt", weights_only=True)["model"]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.spawn
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(CASES))
def test_p_workers_equal_one_process_and_ddp(tmp_path, name):
    model_kwargs, shape = CASES[name]
    ds = _dataset(shape)
    single = _config(tmp_path, model_kwargs, 1, "p1")
    train(single, ds)
    reference = _params(single.run_dir)
    for workers in (2, 4):
        cfg = _config(tmp_path, model_kwargs, workers, f"p{workers}")
        summary = train(cfg, ds)  # check_replicas_every=1: bit-identical replicas after every step
        assert summary["steps"] == STEPS and summary["world_size"] == workers
        _assert_close(_params(cfg.run_dir), reference)
    # PyTorch's own DDP + torch.optim.SGD on the same seeds and global batches.
    cfg = _config(tmp_path, model_kwargs, 2, "ddp")
    results = distributed.spawn(_ddp_with_params, 2, (cfg, ds), timeout_s=180)
    _assert_close(results[0], reference)
    _assert_close(results[1], reference)


def _ddp_with_params(rdv, cfg, ds):
    return ddp_worker(rdv, cfg, ds, return_params=True, eval_every_epoch=False)["params"]


@pytest.mark.spawn
def test_initial_model_differs_from_trained(tmp_path):
    """Guards the comparison above: training for 20 steps really moves the parameters."""
    from scalesgd.models import build_model

    model_kwargs, shape = CASES["mlp"]
    ds = _dataset(shape)
    cfg = _config(tmp_path, model_kwargs, 1, "p1")
    train(cfg, ds)
    init = build_model(cfg.model, input_shape=ds.input_shape, num_outputs=ds.num_outputs, seed=cfg.seed,
                       width=cfg.width, depth=cfg.depth).state_dict()
    trained = _params(cfg.run_dir)
    assert max(float((init[k] - trained[k]).abs().max()) for k in init) > 1e-3
