"""Delayed nodes and local SGD through the trainer (2 gloo workers, digits + MLP).

* ``--straggler rank1x3``: rank 0's logged wait is large; with rank 0 the slow one it is small.
* ``--straggler exp:...``: two runs with the same seed inject the same delays.
* ``--sync-every 1`` (local steps, parameters averaged every step, local momentum) ends at synchronous SGD's
  parameters to float round-off.
* post-local SGD (``--sync-every 3 --sync-every-after E``) against a reference loop of plain ``torch.optim.SGD``
  on DDP-free local models with PyTorch's own ``PeriodicModelAverager(period=3, warmup_steps=W)`` on the same
  data order: the same final parameters.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from scalesgd import distributed
from scalesgd.config import RunConfig
from scalesgd.data import load_data
from scalesgd.data.sharding import BatchStream, Cursor, shard
from scalesgd.models import build_model, loss_function
from scalesgd.run import train
from scalesgd.rundata import RunData

pytestmark = pytest.mark.spawn

BASE = dict(dataset="digits", model="mlp", width=256, global_batch_size=256, lr=0.05, momentum=0.9,
            weight_decay=5e-4, lr_schedule="constant", diversity="off", workers=2, eval_every=1000,
            eval_train_examples=64, progress=False, threads_per_worker=1, timeout_s=120, seed=0)
STEPS = 20


def _run(tmp_path_factory, name, **overrides):
    run_dir = tmp_path_factory.mktemp(name) / "run"
    cfg = RunConfig(**{**BASE, "steps": STEPS, **overrides, "run_dir": str(run_dir)})
    train(cfg)
    # through the project's strict reader: a local-SGD step's flags must read back (reports, predict, sweeps)
    steps = RunData.open(run_dir).steps
    params = torch.load(run_dir / "checkpoint.pt", weights_only=True)["train_state"]["params"]
    return cfg, steps, params


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {
        "rank1_slow": _run(tmp_path_factory, "r1", straggler="rank1x3", check_replicas_every=1),
        "rank0_slow": _run(tmp_path_factory, "r0", straggler="rank0x3"),
        "exp_h1_a": _run(tmp_path_factory, "ea", straggler="exp:mean=2ms", sync_every=1, check_replicas_every=1),
        "exp_h1_b": _run(tmp_path_factory, "eb", straggler="exp:mean=2ms", sync_every=1),
    }


@pytest.mark.timeout(600)
def test_slow_rank_shows_as_the_other_ranks_wait(runs):
    slow1 = runs["rank1_slow"][1][1:]  # the first step warms up
    slow0 = runs["rank0_slow"][1][1:]
    for r in slow1 + slow0:  # the logged wait is the slowest peer's compute minus rank 0's own
        assert r["wait_s"] == pytest.approx(max(r["compute_s_rank0"], r["compute_s_rank1"]) - r["compute_s_rank0"],
                                             abs=1e-6)  # the tail is float32
    wait1 = statistics.median(r["wait_s"] for r in slow1)
    wait0 = statistics.median(r["wait_s"] for r in slow0)
    own0 = statistics.median(r["compute_s_rank0"] for r in slow1)
    # rank 1 sleeps 2x its compute: rank 0 waits about that long; when rank 0 is the slow one it hardly waits
    assert wait1 > own0 and wait1 > 5 * wait0
    assert statistics.median(r["compute_s_rank1"] / r["compute_s_rank0"] for r in slow1) > 2
    assert statistics.median(r["compute_s_rank0"] / r["compute_s_rank1"] for r in slow0) > 2


@pytest.mark.timeout(600)
def test_random_delays_are_identical_across_runs_with_the_same_seed(runs):
    a = [r["injected_delay_s"] for r in runs["exp_h1_a"][1]]
    b = [r["injected_delay_s"] for r in runs["exp_h1_b"][1]]
    assert len(a) == STEPS and a == b and len(set(a)) == STEPS


@pytest.mark.timeout(600)
def test_sync_every_1_equals_synchronous_sgd(runs):
    _, sync_records, sync_params = runs["rank1_slow"]
    _, local_records, local_params = runs["exp_h1_a"]
    assert all(r["local_sgd"] and r["averaged"] for r in local_records)
    assert not any("local_sgd" in r for r in sync_records)
    torch.testing.assert_close(local_params, sync_params, rtol=1e-5, atol=1e-6)


def _reference(rdv, cfg, ds, period):
    """Post-local SGD as PyTorch writes it: gradients all-reduced (sum of Σℓ/B over shards) before W, then
    local steps on Σℓ/B_p and ``PeriodicModelAverager``; the final model the average of the replicas."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    distributed.init_world(rdv, "gloo", timeout_s=120)  # the default group PeriodicModelAverager uses
    try:
        torch.set_num_threads(1)
        model = build_model(cfg.model, input_shape=ds.input_shape, num_outputs=ds.num_outputs, seed=cfg.seed,
                            width=cfg.width, depth=cfg.depth)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        loss_fn = loss_function(ds.task)
        stream = BatchStream(ds.n_train, cfg.seed)
        # W: the first step that starts at or after --sync-every-after epochs
        cursor, warmup = Cursor(), 0
        while cursor.epoch + cursor.offset / ds.n_train < cfg.sync_every_after:
            cursor, warmup = stream.next(cursor, cfg.global_batch_size)[1], warmup + 1
        averager = PeriodicModelAverager(period=period, warmup_steps=warmup)
        cursor = Cursor()
        for s in range(cfg.steps):
            batch, cursor = stream.next(cursor, cfg.global_batch_size)
            idx = shard(batch.indices, rdv.rank, rdv.size)
            opt.zero_grad()
            loss_sum = loss_fn(model(ds.x_train[idx]), ds.y_train[idx])
            if s < warmup:  # what DDP (or the post-local SGD comm hook before its start) does
                (loss_sum / batch.indices.numel()).backward()
                for p in model.parameters():
                    torch.distributed.all_reduce(p.grad)
            else:
                (loss_sum / idx.numel()).backward()
            opt.step()
            averager.average_parameters(model.parameters())  # a no-op before W, as in PyTorch's example
        if (cfg.steps - 1 - warmup) % period:
            average_parameters(iter(model.parameters()), None)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), warmup
    finally:
        distributed.shutdown_world()


@pytest.mark.timeout(600)
def test_post_local_sgd_matches_pytorchs_periodic_model_averager(tmp_path_factory):
    period, steps = 3, 16
    n_train = load_data(RunConfig(**BASE)).n_train
    after = 5.5 * BASE["global_batch_size"] / n_train  # local SGD from step 6 (epoch 0 ends at step 5)
    cfg, records, params = _run(tmp_path_factory, "post", sync_every=period, sync_every_after=after, steps=steps)
    ds = load_data(cfg)
    ref = distributed.spawn(_reference, 2, (cfg, ds, period), timeout_s=300)
    (ref0, warmup), (ref1, _) = ref
    assert warmup is not None and 0 < warmup < steps - period
    torch.testing.assert_close(ref0, ref1, rtol=0, atol=0)
    # the schedule: synchronous steps, then averages after step indices W, W+3, ... (logged step = index + 1)
    assert [r["step"] for r in records if "local_sgd" not in r] == list(range(1, warmup + 1))
    assert [r["step"] for r in records if r.get("averaged")] == list(range(warmup + 1, steps + 1, period))
    torch.testing.assert_close(params, ref0, rtol=1e-5, atol=1e-6)
