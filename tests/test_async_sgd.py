"""The asynchronous baselines (``--algorithm async-ps`` and ``hogwild``, :mod:`scalesgd.async_sgd`).

* P = 1: both end at the parameters of a plain ``torch.optim.SGD`` loop over the same batches (and at the
  synchronous trainer's), every staleness 0.
* P = 2, async-ps: staleness > 0 is recorded, the run converges, and replaying the logged updates serially
  (each gradient taken at the server version it was computed on, applied in the logged order by
  ``torch.optim.SGD``) gives the server's final parameters.
* P = 2, Hogwild: converges; both processes update the one shared vector.
* every example once per epoch (the plan and the logged batch sizes); a dead worker ends the job with one
  line naming it and no process left; combinations that make no sense are refused with one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from scalesgd import distributed
from scalesgd.async_sgd import ParameterServer, plan_segment, share_parameters_, staleness_summary
from scalesgd.config import RunConfig
from scalesgd.data import load_data
from scalesgd.data.sharding import BatchStream, Cursor, shard
from scalesgd.distributed import World
from scalesgd.errors import ConfigError, DivergedError
from scalesgd.models import build_model, loss_function
from scalesgd.run import train
from scalesgd.step import FlatModel
from scalesgd.transforms import sgd

BASE = dict(dataset="digits", model="mlp", width=64, global_batch_size=64, lr=0.05, momentum=0.9,
            weight_decay=5e-4, lr_schedule="constant", diversity="off", eval_train_examples=64, progress=False,
            threads_per_worker=1, timeout_s=120, seed=0)


def _run(tmp_path, name, **overrides):
    run_dir = tmp_path / name
    cfg = RunConfig(**{**BASE, **overrides, "run_dir": str(run_dir)})
    summary = train(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    params = torch.load(run_dir / "checkpoint.pt", weights_only=True)["train_state"]["params"]
    return cfg, summary, records, params


def _sgd_reference(cfg, ds, updates):
    """``torch.optim.SGD`` applying, in order, the mean gradient of each ``(step, rank, world_size,
    computed_on)`` shard at the parameters after ``computed_on`` updates, at lr·b_p/B."""
    model = build_model(cfg.model, input_shape=ds.input_shape, num_outputs=ds.num_outputs, seed=cfg.seed,
                        width=cfg.width, depth=cfg.depth)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss_fn = loss_function(ds.task)
    stream, cursor, batches = BatchStream(ds.n_train, cfg.seed), Cursor(), []
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # noqa: E731
    versions = [flat()]
    for step, rank, size, computed_on in updates:
        while len(batches) <= step:
            batch, cursor = stream.next(cursor, cfg.global_batch_size)
            batches.append(batch.indices)
        idx = shard(batches[step], rank, size)
        now = flat()
        torch.nn.utils.vector_to_parameters(versions[computed_on], model.parameters())
        opt.zero_grad()
        (loss_fn(model(ds.x_train[idx]), ds.y_train[idx]) / idx.numel()).backward()
        torch.nn.utils.vector_to_parameters(now, model.parameters())
        opt.param_groups[0]["lr"] = cfg.lr * idx.numel() / batches[step].numel()
        opt.step()
        versions.append(flat())
    return versions[-1]


# --- P = 1: no staleness, serial SGD ------------------------------------------------------------------------


@pytest.mark.spawn  # a run records its git commit (a subprocess)
@pytest.mark.timeout(300)
def test_one_worker_async_ps_and_hogwild_are_serial_sgd(tmp_path):
    cfg, _, sync_records, sync_params = _run(tmp_path, "sync", workers=1, epochs=2)
    ds = load_data(cfg)
    steps = sum(r["kind"] == "step" for r in sync_records)
    ref = _sgd_reference(cfg, ds, [(k, 0, 1, k) for k in range(steps)])
    torch.testing.assert_close(sync_params, ref, rtol=1e-5, atol=1e-6)
    for algorithm in ("async-ps", "hogwild"):
        _, summary, records, params = _run(tmp_path, algorithm, workers=1, epochs=2, algorithm=algorithm)
        torch.testing.assert_close(params, ref, rtol=1e-5, atol=1e-6)
        updates = [r for r in records if r["kind"] == "update"]
        assert [r["step"] for r in updates] == list(range(1, steps + 1))
        assert all(r["staleness"] == 0 for r in updates)
        assert summary["staleness_max"] == 0 and summary["updates"] == steps
        assert summary["algorithm"] == algorithm
        # evaluated where the synchronous trainer evaluates, with the same results
        evals = [(r["step"], r["test_accuracy"]) for r in records if r["kind"] == "eval"]
        assert evals == [(r["step"], r["test_accuracy"]) for r in sync_records if r["kind"] == "eval"]


@pytest.mark.spawn
@pytest.mark.timeout(600)
@pytest.mark.parametrize("algorithm", ["sync", "async-ps", "hogwild"])
def test_an_exploding_loss_stops_every_algorithm_in_one_line(tmp_path, algorithm):
    # lr 20 on digits: the loss grows by orders of magnitude but stays finite; the asynchronous runs used to train
    # on to the end (final accuracy at chance) where the synchronous trainer stops with its advice. Hogwild's
    # racing writes can also make it overflow first, which stops it as well.
    words = r"the training loss exploded: smoothed .* at step \d+ " + (
        r"|the loss became (nan|inf|-inf) on rank \d at step \d+ " if algorithm == "hogwild" else "")
    # Hogwild's trajectory depends on how the processes' writes interleave: at lr 20 some interleavings stay below
    # the explosion threshold for 30 steps, so it gets a rate that explodes whatever the interleaving
    lr = 100.0 if algorithm == "hogwild" else 20.0
    with pytest.raises(DivergedError, match=words) as e:
        _run(tmp_path, algorithm, workers=2, steps=30, lr=lr, algorithm=algorithm)
    assert "\n" not in str(e.value) and f"(e.g. --lr {lr / 10:g})" in str(e.value)
    assert not (tmp_path / algorithm / "summary.json").exists()


# --- the plan: every example once per epoch, meetings where the synchronous trainer evaluates ----------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("eval_every,diversity_every", [(None, 0), (5, 0), (None, 4)])
def test_every_example_once_per_epoch_across_workers(world_size, eval_every, diversity_every):
    n, B, epochs = 103, 16, 3
    stream, cursor, step, examples = BatchStream(n, seed=3), Cursor(), 0, 0
    seen: dict[int, list[int]] = {}
    meetings = []
    while examples < epochs * n:
        rounds, cursor = plan_segment(stream, cursor, step=step, examples=examples, global_batch_size=B, steps=None,
                                      total_examples=epochs * n, eval_every=eval_every,
                                      diversity_every=diversity_every)
        assert [r.step for r in rounds] == list(range(step, step + len(rounds)))
        for r in rounds:
            for rank in range(world_size):
                seen.setdefault(r.batch.epoch, []).extend(shard(r.batch.indices, rank, world_size).tolist())
        step, examples = rounds[-1].step + 1, rounds[-1].examples + rounds[-1].batch.indices.numel()
        meetings.append((step, rounds[-1].batch.epoch_end))
    assert sorted(seen) == list(range(epochs))
    for epoch, indices in seen.items():
        assert sorted(indices) == list(range(n)), epoch
    for s, epoch_end in meetings[:-1]:
        assert (eval_every is None and epoch_end) or (eval_every and s % eval_every == 0) or (
            diversity_every and s % diversity_every == 0)
    assert examples == epochs * n


def test_the_server_applies_each_gradient_with_its_staleness():
    params = torch.tensor([1.0, -2.0])
    logged = []
    server = ParameterServer(params, sgd(momentum=0.5), world=World(0, 1, 0, torch.device("cpu"), "gloo"),
                             timeout_s=5, log=logged.append, start_s=0.0)
    ref = torch.nn.Parameter(params.clone())
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.5)
    for version, lr, g in [(0, 0.1, [1.0, 2.0]), (0, 0.1, [0.5, 0.0]), (1, 0.2, [-1.0, 1.0]), (3, 0.2, [0.0, 0.0])]:
        server.apply(torch.tensor(g), [version, lr, 0, 0.0, 1.0, 1.0, 2.0], rank=1)
        ref.grad = torch.tensor(g)
        opt.param_groups[0]["lr"] = lr
        opt.step()
    torch.testing.assert_close(server.params, ref.detach())
    assert [r["staleness"] for r in logged] == [0, 1, 1, 0] and server.version == 4
    server.apply(torch.tensor([9.0, 9.0]), [4, 0.1, 0, 0.0, 0.0, 0.0, 0.0], rank=1)  # an empty batch: nothing
    assert server.version == 4 and len(logged) == 4
    assert staleness_summary(server.staleness) == {"updates": 4, "staleness_mean": 0.5, "staleness_max": 1,
                                                   "staleness_histogram": {"0": 2, "1": 2}}
    assert staleness_summary(Counter())["staleness_mean"] is None


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,words", [
    ({"diversity": "cheap"}, "--diversity off"),
    ({"comm": "ring"}, "drop --comm ring"),
    ({"sync_every": 2}, "--sync-every"),
    ({"comm": "ps", "backup_workers": 1}, "drop --backup-workers"),
    ({"batch_policy": "schedule", "batch_schedule": "0:64"}, "--batch-policy fixed"),
    ({"lr": "auto"}, "--lr a number"),
    ({"check_replicas_every": 1}, "--check-replicas-every"),
    ({"max_restarts": 1}, "--max-restarts"),
    ({"example_qsgd_levels": 4}, "drop --example-qsgd-levels"),  # its workers would ignore it silently
])
@pytest.mark.parametrize("algorithm", ["async-ps", "hogwild"])
def test_combinations_without_meaning_are_refused_in_one_line(algorithm, options, words):
    if algorithm == "hogwild" and options.get("comm") == "ps":
        words = "drop --comm"  # backup workers need --comm ps, which Hogwild refuses first
    with pytest.raises(ConfigError) as e:
        RunConfig(**{**BASE, "workers": 2, "algorithm": algorithm, **options})
    assert f"--algorithm {algorithm}" in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_hogwild_refuses_a_communication_strategy_and_an_unknown_algorithm():
    with pytest.raises(ConfigError, match="--algorithm hogwild communicates through shared memory"):
        RunConfig(**{**BASE, "algorithm": "hogwild", "comm": "ps"})
    with pytest.raises(ConfigError, match="--algorithm: unknown value 'downpour'"):
        RunConfig(**{**BASE, "algorithm": "downpour"})
    RunConfig(**{**BASE, "algorithm": "async-ps", "comm": "ps", "exact_diversity_every": 5})  # fine


def test_an_asynchronous_run_cannot_be_resumed(tmp_path):
    with pytest.raises(ConfigError, match="nothing to --resume"):
        train(RunConfig(**{**BASE, "algorithm": "async-ps", "run_dir": str(tmp_path / "r")}), resume=True)


# --- P = 2 ----------------------------------------------------------------------------------------------------

EPOCHS = 8  # both reached 0.94-0.97 test accuracy in trial runs; the tests ask for > 0.85


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_two_workers_async_ps_is_stale_converges_and_replays_serially(tmp_path):
    # rank 1 three times slower: rank 0's updates land while rank 1 computes, so rank 1's gradients are stale
    cfg, summary, records, params = _run(tmp_path, "aps", workers=2, epochs=EPOCHS, algorithm="async-ps",
                                         straggler="rank1x3")
    ds = load_data(cfg)
    updates = [r for r in records if r["kind"] == "update"]
    assert summary["updates"] == len(updates) == 2 * summary["steps"]
    assert summary["staleness_max"] >= 1 and summary["staleness_mean"] > 0
    assert summary["staleness_max"] == max(r["staleness"] for r in updates)
    assert summary["staleness_histogram"] == {str(t): c for t, c in sorted(
        Counter(r["staleness"] for r in updates).items())}
    assert any(r["staleness"] > 0 for r in updates if r["rank"] == 1)
    assert [r["version"] for r in updates] == list(range(1, len(updates) + 1))
    per_epoch = Counter()
    for r in updates:
        per_epoch[int(r["epoch"])] += r["local_batch_size"]
    assert per_epoch == {e: ds.n_train for e in range(EPOCHS)}
    assert summary["final_test_accuracy"] > 0.85
    # no all-reduce carries its gradients: --comm auto resolves to none in the run's record
    assert json.loads((tmp_path / "aps" / "config.json").read_text())["comm_used"] is None
    # the server's semantics, replayed: update v applies the gradient taken at version v - 1 - staleness
    ref = _sgd_reference(cfg, ds, [(r["step"] - 1, r["rank"], 2, r["version"] - 1 - r["staleness"])
                                   for r in updates])
    # float32 over ~100 updates with momentum: the replay's gradients are summed in another order (one process,
    # not the workers' shards), a few 1e-5 apart at worst; one update applied at the wrong version moves
    # parameters by lr·‖g‖ ~ 1e-3 and more
    torch.testing.assert_close(params, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_two_workers_hogwild_converges_with_every_example_once_per_epoch(tmp_path):
    cfg, summary, records, _ = _run(tmp_path, "hw", workers=2, epochs=EPOCHS, algorithm="hogwild",
                                    exact_diversity_every=23)
    ds = load_data(cfg)
    updates = [r for r in records if r["kind"] == "update"]
    assert summary["updates"] == len(updates) == 2 * summary["steps"]
    assert {r["rank"] for r in updates} == {0, 1}
    per_epoch = Counter()
    for r in updates:
        per_epoch[int(r["epoch"])] += r["local_batch_size"]
    assert per_epoch == {e: ds.n_train for e in range(EPOCHS)}
    assert summary["final_test_accuracy"] > 0.85
    assert [r["step"] for r in records if r["kind"] == "diversity"] == list(range(0, summary["steps"] + 1, 23))
    assert all(r["batch_bound"] > 1 for r in records if r["kind"] == "diversity")


def _share(rdv):
    world = distributed.init_world(rdv, "gloo", timeout_s=60)
    try:
        torch.manual_seed(rdv.rank)  # different values on each rank: rank 0's are the ones shared
        model = torch.nn.Linear(3, 2)
        flat = FlatModel(model, world.size, torch.device("cpu"))
        counter = share_parameters_(flat, world)
        start = flat.params.clone()
        distributed.barrier(world)
        if rdv.rank == 1:
            with torch.no_grad():
                model.weight.add_(1.0)  # through the model's own view
            counter.add_(5)
        distributed.barrier(world)
        return start, flat.params.clone(), int(counter), sorted(os.listdir("/dev/shm"))
    finally:
        distributed.shutdown_world()


@pytest.mark.spawn
@pytest.mark.timeout(300)
def test_hogwild_processes_write_one_shared_vector():
    (start0, end0, c0, files), (start1, end1, c1, _) = distributed.spawn(_share, 2, timeout_s=200)
    torch.testing.assert_close(start0, start1, rtol=0, atol=0)  # rank 0's initial values everywhere
    torch.testing.assert_close(end0, end1, rtol=0, atol=0)
    torch.testing.assert_close(end0[:6], start0[:6] + 1)  # rank 1's write, seen by rank 0
    assert c0 == c1 == 5
    assert not [f for f in files if f.startswith("scalesgd-hogwild-")]  # the name is gone once mapped


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.spawn
@pytest.mark.timeout(600)
@pytest.mark.parametrize("algorithm", ["async-ps", "hogwild"])
def test_a_dead_worker_is_named_and_no_process_is_left(algorithm, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "scalesgd", "train", "--model", "mlp", "--dataset",
                             "synthetic-logreg", "--steps", "100000", "--workers", "2", "--global-batch-size", "32",
                             "--threads-per-worker", "1", "--no-progress", "--timeout-s", "60", "--diversity", "off",
                             "--eval-every", "20", "--algorithm", algorithm, "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:  # training has begun: an evaluation is written
            path = run_dir / "metrics.jsonl"
            if path.exists() and '"kind": "eval"' in path.read_text():
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        workers = sorted(w for c in _children(proc.pid) for w in _children(c))
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)  # rank 1: started second
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "worker 1 was killed by SIGKILL (signal 9)" in lines[0], err
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)
