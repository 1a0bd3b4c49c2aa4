"""Training end to end with every communication strategy: ring, ring-tcp and ps give the built-in all-reduce's
parameters; qsgd trains (the loss falls) and keeps the replicas identical, over the built-in all-reduce and
over our ring."""

from __future__ import annotations

import json

import pytest
import torch

from scalesgd.config import RunConfig
from scalesgd.run import train


def _cfg(tmp_path, comm):
    return RunConfig(dataset="digits", model="mlp", width=32, workers=2, global_batch_size=63, steps=30,
                     lr=0.1, lr_schedule="constant", comm=comm, diversity="off", eval_every=1000,
                     progress=False, check_replicas_every=1, threads_per_worker=1, timeout_s=60,
                     run_dir=str(tmp_path / comm))


def _params(cfg):
    return torch.load(f"{cfg.run_dir}/checkpoint.pt", weights_only=True)["model"]


@pytest.mark.spawn
@pytest.mark.timeout(240)
def test_every_strategy_trains(tmp_path):
    train(_cfg(tmp_path, "allreduce"))
    reference = _params(_cfg(tmp_path, "allreduce"))
    for comm in ("ring", "ring-tcp", "ps"):
        cfg = _cfg(tmp_path, comm)
        train(cfg)
        for k, v in _params(cfg).items():
            torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6)
    cfg = _cfg(tmp_path, "qsgd").replace(steps=100)
    summary = train(cfg)
    steps = [json.loads(line) for line in open(f"{cfg.run_dir}/metrics.jsonl") if '"kind": "step"' in line]
    first, last = sum(s["loss"] for s in steps[:5]) / 5, sum(s["loss"] for s in steps[-5:]) / 5
    assert last < 0.5 * first
    assert summary["final_test_accuracy"] > 0.7
    ref_bytes = json.loads(open(tmp_path / "allreduce" / "metrics.jsonl").readline())["bytes_sent"]
    assert steps[0]["bytes_sent"] < ref_bytes / 2  # quantized payload is smaller than float32
    # over ring-tcp the decoded values travel as float32 (replicas checked identical every step)
    cfg = _cfg(tmp_path, "qsgd+ring-tcp").replace(steps=10, qsgd_levels=127)
    train(cfg)
    steps = [json.loads(line) for line in open(f"{cfg.run_dir}/metrics.jsonl") if '"kind": "step"' in line]
    assert len(steps) == 10 and steps[0]["bytes_sent"] == ref_bytes


@pytest.mark.spawn
@pytest.mark.timeout(120)
def test_more_local_workers_than_cores_warns(tmp_path, monkeypatch, capsys):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # only the parent's check sees it
    train(_cfg(tmp_path, "allreduce").replace(steps=2))
    err = capsys.readouterr().err
    assert "2 local workers on 1 CPU cores" in err and "--workers 1" in err


def test_ring_tcp_reads_its_address_and_local_worker_count_from_the_environment_in_one_place(monkeypatch):
    from scalesgd import distributed

    monkeypatch.delenv("SCALESGD_TCP_HOST", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert distributed.reachable_host() == "127.0.0.1"  # the interface that routes to the master
    monkeypatch.setenv("SCALESGD_TCP_HOST", "10.1.2.3")
    assert distributed.reachable_host() == "10.1.2.3"  # the user's choice wins
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert distributed.local_world_size(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert distributed.local_world_size(3) == 8
    # ... and hands them to the strategies in World, filled by init_world (a torchrun rank's)
    world = distributed.init_world(distributed.Rendezvous("127.0.0.1", 0, rank=0, size=1, local_rank=0,
                                                          from_env=True), "gloo")
    assert (world.local_size, world.host) == (8, "10.1.2.3") and world.cpu_count >= 1
    assert world.core_per_local_worker == (8 <= world.cpu_count)
    # a local job's workers listen on the address they meet on, whatever the environment says (issue 18, 9)
    local = distributed.init_world(distributed.Rendezvous("127.0.0.1", 0, rank=0, size=1, local_rank=0), "gloo")
    assert local.host == "127.0.0.1"
