"""Backup workers (``--backup-workers b --comm ps``): 3 gloo workers with random injected delays, b = 1.

The replicas stay identical (``--check-replicas-every 1`` checks every step), each step uses rank 0 and the
first other gradient to arrive, and the trajectory is the one a plain loop computes from the logged used
ranks: ``torch.optim.SGD`` on P/(P − b) times the sum of those ranks' shard gradients (Σℓ/B each).
"""

from __future__ import annotations


import pytest
import torch

from scalesgd.config import RunConfig
from scalesgd.data import load_data
from scalesgd.data.sharding import BatchStream, Cursor, shard
from scalesgd.errors import ConfigError
from scalesgd.models import build_model, loss_function
from scalesgd.run import train
from scalesgd.rundata import RunData


def test_backup_workers_options_are_checked():
    with pytest.raises(ConfigError, match="add --comm ps"):
        RunConfig(backup_workers=1, diversity="off")
    with pytest.raises(ConfigError, match="--diversity off"):
        RunConfig(backup_workers=1, comm="ps")
    with pytest.raises(ConfigError, match=r"in \[0, 2\)"):
        RunConfig(backup_workers=2, comm="ps", diversity="off")
    with pytest.raises(ConfigError, match="choose one"):
        RunConfig(backup_workers=1, comm="ps", diversity="off", sync_every=2)


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_backup_workers_keep_replicas_identical_and_apply_the_rescaled_first_gradients(tmp_path):
    P, b, steps = 3, 1, 12
    run_dir = tmp_path / "run"
    cfg = RunConfig(dataset="digits", model="mlp", width=32, global_batch_size=96, steps=steps, lr=0.05, momentum=0.9,
                    weight_decay=5e-4, lr_schedule="constant", diversity="off", workers=P, comm="ps",
                    backup_workers=b, straggler="exp:mean=3ms", check_replicas_every=1, eval_every=1000,
                    eval_train_examples=64, progress=False, threads_per_worker=1, timeout_s=120, seed=2,
                    run_dir=str(run_dir))
    train(cfg)
    # through the project's strict reader: the list of used ranks must read back (reports, predict, sweeps)
    used = [r["backup_used_ranks"] for r in RunData.open(run_dir).steps]
    assert len(used) == steps and all(len(u) == P - b and u[0] == 0 and len(set(u)) == P - b for u in used)
    params = torch.load(run_dir / "checkpoint.pt", weights_only=True)["train_state"]["params"]

    ds = load_data(cfg)
    model = build_model(cfg.model, input_shape=ds.input_shape, num_outputs=ds.num_outputs, seed=cfg.seed,
                        width=cfg.width, depth=cfg.depth)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss_fn = loss_function(ds.task)
    stream, cursor = BatchStream(ds.n_train, cfg.seed), Cursor()
    for ranks in used:
        batch, cursor = stream.next(cursor, cfg.global_batch_size)
        opt.zero_grad()
        for r in ranks:
            idx = shard(batch.indices, r, P)
            (loss_fn(model(ds.x_train[idx]), ds.y_train[idx]) / batch.indices.numel() * P / (P - b)).backward()
        opt.step()
    ref = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(params, ref, rtol=1e-5, atol=1e-6)
