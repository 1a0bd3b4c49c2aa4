"""Starting local workers: results by rank, failures that name a rank and leave nothing running, what a
worker gets from its launcher (environment, working directory, stdout/stderr), the fork server, the
start-up shortcuts (digits cache, the CLI's early start) and the test tiers' guard."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scalesgd import launch
from scalesgd.cli import _starts_workers
from scalesgd.distributed import spawn
from scalesgd.errors import ConfigError, DistributedError

# ------------------------------------------------------------------------------------------------------------
# workers (each of these starts processes)
# ------------------------------------------------------------------------------------------------------------


def _echo(rdv, blob_bytes):
    return rdv.rank, rdv.size, bytes([rdv.rank]) * blob_bytes


@pytest.mark.spawn
@pytest.mark.timeout(120)
def test_results_come_back_by_rank_even_when_larger_than_a_pipe_buffer():
    out = spawn(_echo, 3, (200_000,), timeout_s=90)
    assert [(r, s) for r, s, _ in out] == [(0, 3), (1, 3), (2, 3)]
    assert [blob == bytes([r]) * 200_000 for r, _, blob in out] == [True, True, True]


def _report_surroundings(rdv, mark_name, gone_name):
    print(f"stdout of rank {rdv.rank}", flush=True)
    print(f"stderr of rank {rdv.rank}", file=sys.stderr, flush=True)
    return {"mark": os.environ.get(mark_name), "gone": gone_name in os.environ, "cwd": os.getcwd(),
            "ppid": os.getppid(), "preloaded": "scalesgd.run" in sys.modules}


@pytest.mark.spawn
@pytest.mark.timeout(120)
def test_workers_get_the_launchers_environment_directory_and_streams_as_they_are_at_spawn(
        tmp_path, monkeypatch, capfd):
    # A first job makes sure the fork server runs, so that what follows changes after the server started.
    monkeypatch.setenv("SCALESGD_TEST_GONE", "1")
    spawn(_echo, 1, (1,), timeout_s=90)
    monkeypatch.delenv("SCALESGD_TEST_GONE")
    monkeypatch.setenv("SCALESGD_TEST_MARK", "set after the server started")
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    out = spawn(_report_surroundings, 2, ("SCALESGD_TEST_MARK", "SCALESGD_TEST_GONE"), timeout_s=90)
    captured = capfd.readouterr()
    for r, o in enumerate(out):
        assert o["mark"] == "set after the server started" and not o["gone"]
        assert Path(o["cwd"]).resolve() == tmp_path.resolve()
        assert f"stdout of rank {r}" in captured.out and f"stderr of rank {r}" in captured.err
    if launch.worker_context().get_start_method() == "forkserver":
        # Forked from the preloaded server, not started by this process: the training code came imported.
        assert all(o["ppid"] != os.getpid() and o["preloaded"] for o in out), out


def _fail_on_rank_1(rdv, how, pid_dir):
    if rdv.rank == 0:
        (Path(pid_dir) / "rank0.pid").write_text(str(os.getpid()))
        time.sleep(120)  # a healthy rank, busy (or blocked in a collective) when its peer dies
        return "rank 0 was not stopped"
    deadline = time.monotonic() + 60
    while not (Path(pid_dir) / "rank0.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    if how == "exit":
        os._exit(7)  # dies without a word
    if how == "error":
        raise ConfigError("bad option on rank 1")
    raise ValueError("boom")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.spawn
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how, error, words", [
    ("exit", DistributedError, "worker 1 exited with code 7"),
    ("error", ConfigError, "bad option on rank 1"),
    ("crash", DistributedError, "worker 1 failed"),
])
def test_a_failing_worker_ends_the_job_names_its_rank_and_leaves_no_worker_running(tmp_path, how, error, words):
    t0 = time.monotonic()
    with pytest.raises(error, match=words) as info:
        spawn(_fail_on_rank_1, 2, (how, str(tmp_path)), timeout_s=100)
    assert time.monotonic() - t0 < 60  # not rank 0's 120 s sleep, nor the timeout
    if how == "crash":
        assert "ValueError: boom" in str(info.value)  # the worker's traceback comes along
    assert _gone(int((tmp_path / "rank0.pid").read_text())), "rank 0 was left running"


def _sleep_then_pid(rdv, pid_dir):
    (Path(pid_dir) / f"rank{rdv.rank}.pid").write_text(str(os.getpid()))
    time.sleep(120)


@pytest.mark.spawn
@pytest.mark.timeout(120)
def test_the_job_timeout_stops_every_worker(tmp_path):
    with pytest.raises(DistributedError, match="did not finish within 3 s; the workers were stopped"):
        spawn(_sleep_then_pid, 2, (str(tmp_path),), timeout_s=3)
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    assert all(_gone(pid) for pid in pids), pids


# ------------------------------------------------------------------------------------------------------------
# start-up shortcuts (no process)
# ------------------------------------------------------------------------------------------------------------


def test_digits_from_the_cache_are_bit_identical_to_scikit_learns(tmp_path, monkeypatch):
    from sklearn.datasets import load_digits as sk_load_digits

    from scalesgd.data.datasets import _digits_arrays, load_digits

    monkeypatch.setenv("SCALESGD_CACHE", str(tmp_path))
    cold = load_digits(seed=3)  # builds the cache from scikit-learn
    assert (tmp_path / "digits-v1.npz").exists()
    warm = load_digits(seed=3)  # reads it
    for name in ("x_train", "y_train", "x_test", "y_test"):
        a, b = getattr(cold, name), getattr(warm, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    bunch = sk_load_digits()
    x, y = _digits_arrays()
    np.testing.assert_array_equal(x / 16.0, np.asarray(bunch.data, dtype=np.float32) / 16.0)
    np.testing.assert_array_equal(y, bunch.target)
    (tmp_path / "digits-v1.npz").write_bytes(b"not an npz")  # a corrupt entry is rebuilt, not trusted
    assert torch.equal(load_digits(seed=3).x_train, cold.x_train)


@pytest.mark.parametrize("argv, starts", [
    (["train"], True),
    (["train", "--workers", "2"], True),
    (["diversity", "--every", "5"], True),
    (["train", "--workers", "1"], False),
    (["train", "--workers=1", "--dataset", "digits"], False),
    (["diversity", "--checkpoint", "runs/x"], False),
    (["train", "--help"], False),
    (["report", "runs/x"], False),
    (["sweep", "spec.toml"], False),  # a sweep's first spawn starts the server; its P may all be 1
    ([], False),
])
def test_the_cli_starts_the_fork_server_early_only_for_local_training(argv, starts):
    assert _starts_workers(argv) is starts


def test_a_torchrun_rank_starts_no_workers():
    assert launch.launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "2"})
    assert not launch.launched_by_torchrun({"RANK": "0"})
    assert not launch.launched_by_torchrun({})


# ------------------------------------------------------------------------------------------------------------
# the fast tier's guard
# ------------------------------------------------------------------------------------------------------------

pytest_plugins = ["pytester"]


def test_the_fast_tier_fails_an_unmarked_test_that_starts_a_process(pytester, monkeypatch):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini('[pytest]\nmarkers =\n    spawn: starts a process\n')
    pytester.makepyfile(test_tiers="""
        import multiprocessing, subprocess, pytest

        @pytest.fixture(scope="module")
        def server():
            p = multiprocessing.get_context("spawn").Process(target=print)
            p.start()
            p.join()

        def test_quiet():
            assert 1 + 1 == 2

        def test_runs_git():
            subprocess.run(["git", "--version"], capture_output=True)

        def test_uses_a_process_fixture(server):
            pass

        @pytest.mark.spawn
        def test_marked():
            subprocess.run(["git", "--version"], capture_output=True)
    """)
    monkeypatch.setenv("SCALESGD_TEST_TIER", "fast")
    # (pytest-benchmark, where installed, asks git for the project name as the session starts: a process)
    result = pytester.runpytest_inprocess("-m", "not spawn", "-p", "no:cacheprovider", "-p", "no:benchmark")
    result.assert_outcomes(passed=1, failed=1, errors=1, deselected=1)
    result.stdout.fnmatch_lines(["*test_uses_a_process_fixture started a process (multiprocessing)*",  # errors
                                 "*test_runs_git started a process (subprocess: git --version)*mark it*"])
