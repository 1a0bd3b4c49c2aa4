"""Checkpoint files and the resume configuration, mostly without spawning: what is refused with one line (a truncated
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
from scalesgd.writer import check_run_dir_is_new, lock_run_dir, truncate_metrics


def _blob(step: int, n: int = 5) -> dict:
    gen = torch.Generator().manual_seed(3)
    return {"step": step, "model": {"w": torch.arange(float(n))}, "config": {"seed": 0},
            "train_state": {"params": torch.arange(float(n))}, "ranks": [checkpoint.rng_state(gen)],
            "metrics_bytes": 0, "elapsed_s": 1.0, "last_eval": {}}


class _Evil:
    def __reduce__(self):  # code that would run on an unsafe load (builtins, so the fast tier's guards do not mask it)
        return (exec, ("open('pwned', 'w').close()",))


def test_checkpoints_round_trip_and_only_the_newest_are_kept(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(tmp_path, _blob(step), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000020.pt", "step-00000030.pt"]
    back = checkpoint.load(checkpoint.latest_checkpoint(tmp_path), num_parameters=5)
    assert back["step"] == 30 and back["version"] == checkpoint.FORMAT_VERSION
    assert torch.equal(back["model"]["w"], torch.arange(5.0))
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_a_write_cut_off_by_a_kill_is_removed_and_the_checkpoints_stay(tmp_path):
    for step in (10, 20):
        checkpoint.save(tmp_path, _blob(step), keep=2)
    partial = [checkpoint.checkpoint_dir(tmp_path) / ".step-00000030.pt.k1ll3d.tmp", tmp_path / ".summary.json.x.tmp"]
    for p in partial:
        p.write_bytes(b"PK\x03\x04 cut off")
    assert sorted(checkpoint.remove_partial_writes(tmp_path)) == sorted(partial)
    assert not list(tmp_path.glob("**/.*.tmp"))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000010.pt", "step-00000020.pt"]
    assert checkpoint.load(checkpoint.latest_checkpoint(tmp_path), num_parameters=5)["step"] == 20


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


def test_a_new_run_in_a_live_run_dir_names_the_holder_not_delete(tmp_path):
    # a second `scalesgd train --run-dir D` while the first still trains there was told to "delete the old
    # directory first": the live run's directory, under it. It must name the holder, as the lock does.
    run_dir = tmp_path / "run"
    with lock_run_dir(run_dir):
        (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
        with pytest.raises(ConfigError, match=f"in use by another scalesgd run \\(pid {os.getpid()}\\)") as e:
            check_run_dir_is_new(str(run_dir))
        assert "delete" not in str(e.value)
        # the launcher's own second check, under the lock it holds, is not fooled by that lock
        with pytest.raises(ConfigError, match="already holds a run"):
            check_run_dir_is_new(str(run_dir), locked=True)
    # once the holder has finished, the directory holds a finished run: the old advice, and the probe left
    # the lock free
    with pytest.raises(ConfigError, match="already holds a run.*delete the old directory"):
        check_run_dir_is_new(str(run_dir))
    with lock_run_dir(run_dir):
        pass


def test_a_new_run_in_a_stopped_run_dir_offers_resume(tmp_path):
    # after a stop signal the user re-typed the train command and was told to delete the directory; the
    # run there was one `--resume` away from finishing
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "checkpoints" / "step-00000020.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="already holds a run") as e:
        check_run_dir_is_new(str(run_dir))
    assert f"scalesgd train --resume {run_dir}" in str(e.value) and "delete" not in str(e.value)
    (run_dir / "summary.json").write_text("{}")  # finished: nothing to resume
    with pytest.raises(ConfigError, match="delete the old directory") as e:
        check_run_dir_is_new(str(run_dir))
    assert "--resume" not in str(e.value)


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
    assert back.to_dict() == cfg.replace(workers=4, timeout_s=30.0).to_dict()  # (the lr rule saved resolved)
    for given, words in (({"lr": 0.2}, "--lr 0.2 contradicts the resumed run's lr = 0.1"),
                         ({"seed": 1}, "--seed 1 contradicts"),
                         ({"target_accuracy": 0.9}, "--target-accuracy 0.9 contradicts the resumed run's unset "
                                                    "--target-accuracy ("),
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


# ---------------------------------------------------------------------------------------------------------
# Hostile resumes and run directories, end to end through the CLI (one worker, in this process): one line on
# stderr, a non-zero exit, no traceback, and the run directory left byte for byte as it was.

RUN = ["--dataset", "synthetic-logreg", "--model", "mlp", "--workers", "1", "--steps", "6", "--global-batch-size",
       "16", "--checkpoint-every-steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run that stopped after its checkpoint at step 4 (summary removed, as a kill leaves it)."""
    from scalesgd.cli import main

    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    assert main(["train", *RUN, "--run-dir", str(run_dir)]) == 0
    (run_dir / "summary.json").unlink()
    return run_dir


def _damage_newest(how):
    def damage(run_dir):
        newest = checkpoint.latest_checkpoint(run_dir)
        if how == "truncate":
            newest.write_bytes(newest.read_bytes()[:1000])
        elif how == "code":
            torch.save({"format": checkpoint.FORMAT, "version": 1, "evil": _Evil()}, newest)
        elif how == "version":
            torch.save({**torch.load(newest, weights_only=True), "version": 2}, newest)
        elif how == "model":
            blob = torch.load(newest, weights_only=True)
            blob["train_state"]["params"] = torch.zeros(3)
            torch.save(blob, newest)
        elif how == "metrics":
            (run_dir / "metrics.jsonl").write_text("")
    return damage


HOSTILE = [
    ("resume a missing directory", lambda r: ["--resume", str(r.parent / "nowhere")], None, ["no such directory"]),
    ("resume a file", lambda r: ["--resume", str(r / "config.json")], None, ["is a file"]),
    ("resume without config", lambda r: ["--resume", str(r / "tensorboard")], None, ["no config.json"]),
    ("resume a finished run", lambda r: ["--resume", str(r)],
     lambda r: (r / "summary.json").write_text("{}"), ["finished run"]),
    ("resume with another lr", lambda r: ["--resume", str(r), "--lr", "0.3"], None, ["--lr 0.3 contradicts"]),
    ("resume with another seed", lambda r: ["--resume", str(r), "--seed", "4"], None, ["--seed 4 contradicts"]),
    ("resume into another run dir", lambda r: ["--resume", str(r), "--run-dir", str(r.parent / "x")], None,
     ["leave out --run-dir"]),
    ("resume a truncated checkpoint", lambda r: ["--resume", str(r)], _damage_newest("truncate"),
     ["cannot be read", "Delete it"]),
    ("resume a checkpoint holding code", lambda r: ["--resume", str(r)], _damage_newest("code"), ["cannot be read"]),
    ("resume another format version", lambda r: ["--resume", str(r)], _damage_newest("version"),
     ["format version 2"]),
    ("resume another model's checkpoint", lambda r: ["--resume", str(r)], _damage_newest("model"),
     ["3 parameters", "another run"]),
    ("resume with lost metrics", lambda r: ["--resume", str(r)], _damage_newest("metrics"), ["lines were lost"]),
    ("resume a broken config", lambda r: ["--resume", str(r)],
     lambda r: (r / "checkpoints" / "config.json").write_text("{"), ["unreadable"]),
    ("run dir is a file", lambda r: [*RUN, "--run-dir", str(r / "config.json")], None, ["is a file"]),
    ("run dir holds a run", lambda r: [*RUN, "--run-dir", str(r)], None, ["already holds a run", "--resume"]),
    ("negative checkpoint steps", lambda r: [*RUN, "--checkpoint-every-steps", "-1"], None,
     ["--checkpoint-every-steps"]),
    ("NaN checkpoint seconds", lambda r: [*RUN, "--checkpoint-every-s", "nan"], None, ["--checkpoint-every-s"]),
    ("negative checkpoint seconds", lambda r: [*RUN, "--checkpoint-every-s", "-5"], None, ["--checkpoint-every-s"]),
    ("keep no checkpoint", lambda r: [*RUN, "--keep-checkpoints", "0"], None, ["--keep-checkpoints"]),
    ("negative restarts", lambda r: [*RUN, "--max-restarts", "-1"], None, ["--max-restarts"]),
]


@pytest.mark.spawn  # the run records its git sha (a `git` process)
@pytest.mark.parametrize("name,argv,damage,words", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_resume_is_one_line_and_touches_nothing(interrupted, tmp_path, capsys, name, argv, damage, words):
    import shutil

    from scalesgd.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(interrupted, run_dir)
    if damage is not None:
        damage(run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    code = main(["train", *argv(run_dir)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("scalesgd: error:") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before, "a refused run changed the run directory"
    assert not (run_dir.parent / "x").exists() and not (run_dir.parent / "nowhere").exists()
    assert not (tmp_path / "pwned").exists() and not list(tmp_path.glob("**/.*.tmp"))


@pytest.mark.spawn
def test_resume_of_the_interrupted_run_finishes_it(interrupted, tmp_path, capsys):
    import shutil

    from scalesgd.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(interrupted, run_dir)
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
