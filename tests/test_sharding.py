"""Global batches depend only on the seed; shards differ by at most one; a batch size that changes
mid-epoch neither repeats nor skips an example."""

from __future__ import annotations

import json

import pytest
import torch

from scalesgd.batch_policy import make_batch_policy, StepObservation
from scalesgd.data.sharding import BatchStream, Cursor, epoch_permutation, shard


def test_permutation_depends_on_seed_and_epoch_only():
    assert torch.equal(epoch_permutation(100, 3, 0), epoch_permutation(100, 3, 0))
    assert not torch.equal(epoch_permutation(100, 3, 0), epoch_permutation(100, 3, 1))
    assert not torch.equal(epoch_permutation(100, 3, 0), epoch_permutation(100, 4, 0))


@pytest.mark.parametrize("batch,world", [(7, 2), (10, 4), (3, 4), (1, 1), (13, 3)])
def test_shards_partition_the_batch_and_differ_by_at_most_one(batch, world):
    idx = torch.arange(100, 100 + batch)
    parts = [shard(idx, r, world) for r in range(world)]
    sizes = [p.numel() for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert torch.equal(torch.cat(parts), idx)


@pytest.mark.parametrize("world", [1, 2])
def test_changing_batch_mid_epoch_sees_every_example_once(world):
    n = 101
    stream = BatchStream(n, seed=5)
    sizes = [8, 8, 30, 2, 17, 64, 5, 9, 40, 12, 3, 33, 7, 50]  # changes mid-epoch, crosses epoch ends
    cursor = Cursor()
    seen: dict[int, list[int]] = {}
    k = 0
    while cursor.epoch < 3:
        batch, cursor = stream.next(cursor, sizes[k % len(sizes)])
        k += 1
        for r in range(world):  # what every rank trains on, together
            seen.setdefault(batch.epoch, []).extend(shard(batch.indices, r, world).tolist())
    for epoch in range(3):
        assert sorted(seen[epoch]) == list(range(n)), f"epoch {epoch}"


def test_schedule_policy_over_a_stream_covers_each_epoch_exactly():
    n = 97
    policy = make_batch_policy("schedule", schedule="0:4,0.5:16,1.25:32")
    state = policy.init_state()
    stream, cursor, B, step = BatchStream(n, seed=0), Cursor(), 4, 0
    per_epoch: dict[int, list[int]] = {}
    while cursor.epoch < 3:
        epoch = cursor.epoch + cursor.offset / n
        decision, state = policy.next(state, StepObservation(step=step, epoch=epoch, global_batch_size=B,
                                                             batch_bound_est=None, world_size=2))
        B = decision.global_batch_size
        batch, cursor = stream.next(cursor, B)
        per_epoch.setdefault(batch.epoch, []).extend(batch.indices.tolist())
        step += 1
    assert B == 32
    for e in range(3):
        assert sorted(per_epoch[e]) == list(range(n))


@pytest.mark.spawn
@pytest.mark.timeout(120)
def test_trainer_with_schedule_counts_n_examples_per_epoch(tmp_path):
    from scalesgd.config import RunConfig
    from scalesgd.run import train

    cfg = RunConfig(dataset="digits", model="mlp", width=16, workers=2, global_batch_size=32,
                    batch_policy="schedule", batch_schedule="0:32,0.5:128,1.5:64", epochs=2, diversity="off",
                    progress=False, threads_per_worker=1, timeout_s=60, run_dir=str(tmp_path / "run"))
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    changes = [r for r in records if r["kind"] == "batch_change"]
    assert [c["to"] for c in changes] == [128, 64]
    n = json.loads((tmp_path / "run" / "config.json").read_text())["n_train"]
    total = sum(r["global_batch_size"] for r in steps)
    assert total == 2 * n
    first_epoch = sum(r["global_batch_size"] for r in steps if r["epoch"] <= 1.0 + 1e-12)
    assert first_epoch == n
