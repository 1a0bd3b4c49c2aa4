"""Checkpoint files and the resume configuration, without spawning: what is refused with one line (a truncated
file, pickled code, another format version, another model), how many are kept, that a failed write leaves
the previous checkpoints intact, the run-directory lock, and which options a resume may change."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from scalesgd import checkpoint
from scalesgd.config import RunConfig
from scalesgd.errors import CheckpointError, ConfigError
from scalesgd.writer import lock_run_dir, truncate_metrics


def _blob(step: int, n: int = 5) -> dict:
    gen = torch.Generator().manual_seed(3)
    return {"step": step, "model": {"w": torch.arange(float(n))}, "config": {"seed": 0},
            "train_state": {"params": torch.arange(float(n))}, "ranks": [checkpoint.rng_state(gen)],
            "metrics_bytes": 0, "elapsed_s": 1.0, "last_eval": {}}


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoints_round_trip_and_only_the_newest_are_kept(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(tmp_path, _blob(step), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000020.pt", "step-00000030.pt"]
    back = checkpoint.load(checkpoint.latest_checkpoint(tmp_path), num_parameters=5)
    assert back["step"] == 30 and back["version"] == checkpoint.FORMAT_VERSION
    assert torch.equal(back["model"]["w"], torch.arange(5.0))
    assert not list(tmp_path.glob("**/.*.tmp"))


@pytest.mark.parametrize("damage, words", [
    ("truncated", "cannot be read"),
    ("pickled code", "cannot be read"),
    ("other version", "format version 999"),
    ("not ours", "not a scalesgd checkpoint"),
    ("other model", "this run's has 7"),
    ("missing", "no checkpoint at"),
    ("empty", "cannot be read"),
])
def test_a_bad_checkpoint_is_one_line_and_never_runs_code(tmp_path, damage, words, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = checkpoint.save(tmp_path, _blob(10), keep=3)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "pickled code":
        torch.save({"format": checkpoint.FORMAT, "version": 1, "evil": _Evil()}, path)
    elif damage == "other version":
        torch.save({**torch.load(path, weights_only=True), "version": 999}, path)
    elif damage == "not ours":
        torch.save({"w": torch.zeros(2)}, path)
    elif damage == "missing":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path, num_parameters=7 if damage == "other model" else 5)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, _blob(10), keep=2)

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device"):
        checkpoint.save(tmp_path, _blob(20), keep=2)
    monkeypatch.undo()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000010.pt"]
    assert checkpoint.load(checkpoint.latest_checkpoint(tmp_path))["step"] == 10
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_rng_states_round_trip(tmp_path):
    import random

    import numpy as np

    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = checkpoint.rng_state(gen)
    torch.save(saved, tmp_path / "rng.pt")
    want = (torch.rand(3), torch.rand(3, generator=gen), np.random.rand(3), random.random())
    other = torch.Generator().manual_seed(99)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), other)
    got = (torch.rand(3), torch.rand(3, generator=other), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[2] == want[2]).all() and got[3] == want[3]


def test_a_locked_run_dir_names_its_holder(tmp_path):
    with lock_run_dir(tmp_path / "run"):
        with pytest.raises(ConfigError, match=f"in use by another scalesgd run \\(pid {os.getpid()}\\)"):
            with lock_run_dir(tmp_path / "run"):
                pass
    with lock_run_dir(tmp_path / "run"):  # released at the end of the block
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        with lock_run_dir(tmp_path / "file"):
            pass


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    truncate_metrics(tmp_path, len('{"step": 1}\n'))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    with pytest.raises(ConfigError, match="lines were lost"):
        truncate_metrics(tmp_path, 1000)


def test_resume_config_keeps_the_maths_and_allows_the_rest(tmp_path):
    cfg = RunConfig(lr=0.1, workers=2, steps=10, run_dir=str(tmp_path), lr_milestones=(1.0, 2.0),
                    lr_schedule="step")
    # config.json records the data set's size as n_train; the exact options are in checkpoints/config.json
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_dict(), "n_train": 100}))
    checkpoint.write_run_config(tmp_path, cfg.to_dict())
    back = checkpoint.resume_config(tmp_path, {"workers": 4, "timeout_s": 30.0, "lr": 0.1,
                                               "lr_milestones": (1.0, 2.0)})
    assert back == cfg.replace(workers=4, timeout_s=30.0)
    for given, words in (({"lr": 0.2}, "--lr 0.2 contradicts the resumed run's lr = 0.1"),
                         ({"seed": 1}, "--seed 1 contradicts"),
                         ({"run_dir": str(tmp_path / "other")}, "leave out --run-dir")):
        with pytest.raises(ConfigError, match=words.replace("(", "\\(")):
            checkpoint.resume_config(tmp_path, given)
    with pytest.raises(ConfigError, match="no such directory"):
        checkpoint.resume_config(tmp_path / "nope", {})


def test_a_full_disk_while_logging_is_one_line(tmp_path):
    from scalesgd.errors import ScalesgdError
    from scalesgd.writer import RunWriter

    writer = RunWriter(tmp_path / "run", enabled=True, tensorboard=False)
    writer._metrics.close()
    writer._metrics = open("/dev/full", "w", buffering=1)  # every write fails with ENOSPC
    with pytest.raises(ScalesgdError, match="cannot write .*metrics.jsonl: No space left on device"):
        writer.log({"kind": "step", "step": 1, "epoch": 0.0})
    with pytest.raises(ScalesgdError, match="No space left on device"):  # closing flushes: the same one line
        writer.close()


def test_time_based_checkpoints_stretch_to_keep_their_cost_under_2_percent():
    from scalesgd.run import CHECKPOINT_COST_FACTOR, Checkpointing

    c = Checkpointing(every_steps=0, every_s=10.0, keep=2, last_at=100.0)
    assert not c.time_due(109.9) and c.time_due(110.0)
    c.last_save_s = 1.0  # a slow save: wait 50 s, so saving is at most 1/50 of the time
    assert CHECKPOINT_COST_FACTOR == 50 and not c.time_due(149.0) and c.time_due(150.0)
    assert not Checkpointing(0, 0.0, 2, last_at=0.0).time_due(1e9)  # 0: by steps only
    assert Checkpointing(25, 0.0, 2, last_at=0.0).step_due(50) and not Checkpointing(25, 0.0, 2, 0.0).step_due(51)
