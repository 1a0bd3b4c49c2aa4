"""Fault tolerance end to end: checkpoints, exact resume after kill -9, restarts after a dead worker, the rank
that failed named, a stop signal, workers that outlive their launcher, and a resume on another worker count.

Every run is ``python -m scalesgd train`` in its own process group; runs are shared between assertions. The
reference is an uninterrupted run with the same seed: a resumed run must end with bit-identical parameters
(CPU, same worker count) and a metrics.jsonl whose steps and losses are the reference's, each step once.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.spawn

STEPS = 500
EVERY = 50  # checkpoint every EVERY steps
KILL_AT = 130  # kill once the metrics show this step (past the checkpoint at 100)
# Dropout (torch RNG per rank), Langevin noise (the transform's generator), the diversity policy and AdaScale
# (estimator and policy state), evaluations: everything a resume must restore is in play.
ARGS = ["--model", "mlp", "--dataset", "synthetic-logreg", "--steps", str(STEPS), "--workers", "2",
        "--global-batch-size", "32", "--dropout", "0.2", "--langevin-noise", "0.01", "--batch-policy", "diversity",
        "--lr-rule", "adascale", "--eval-every", "40", "--threads-per-worker", "1", "--no-progress",
        "--checkpoint-every-steps", str(EVERY), "--keep-checkpoints", "2"]


def _launch(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scalesgd", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout_s: float = 200) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = [r["step"] for r in _records(run_dir) if r["kind"] == "step"]
        if steps and steps[-1] >= step:
            return
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout_s} s")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _workers(launcher_pid: int) -> list[int]:
    """The launcher's workers, oldest first: its children's children (workers are forked by the fork server,
    a child of the launcher; multiprocessing's resource tracker, the other child, has none)."""
    return sorted(w for c in _children(launcher_pid) for w in _children(c))


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def _assert_same_run(run_dir: Path, ref_dir: Path, n_steps: int = STEPS) -> None:
    """Bit-identical final parameters; every step logged once with the reference's loss and lr; the same
    evaluations and batch changes."""
    got, want = _final_params(run_dir), _final_params(ref_dir)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    rec, ref = _records(run_dir), _records(ref_dir)
    steps = [(r["step"], r["loss"], r["lr"], r["global_batch_size"]) for r in rec if r["kind"] == "step"]
    assert steps == [(r["step"], r["loss"], r["lr"], r["global_batch_size"]) for r in ref if r["kind"] == "step"]
    assert [r["step"] for r in rec if r["kind"] == "step"] == list(range(1, n_steps + 1))
    for kind, keys in (("eval", ("step", "test_loss", "test_accuracy")), ("batch_change", ("step", "from", "to"))):
        assert [[r[k] for k in keys] for r in rec if r["kind"] == kind] == \
               [[r[k] for k in keys] for r in ref if r["kind"] == kind]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == n_steps and summary["final_test_accuracy"] == json.loads(
        (ref_dir / "summary.json").read_text())["final_test_accuracy"]
    assert not list(run_dir.glob("**/.*.tmp"))  # no temporary file left


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = _launch([*ARGS, "--run-dir", str(run_dir)])
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    # The checkpoint cost of this run (every EVERY steps) is in its summary; printed for the record.
    print(f"checkpoint cost: {summary['checkpoints']} checkpoints, {summary['checkpoint_s']:.3f} s of "
          f"{summary['train_time_s']:.3f} s training")
    return run_dir


@pytest.mark.timeout(900)
def test_kill_9_every_process_then_resume_is_bit_identical(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch([*ARGS, "--run-dir", str(run_dir)])
    _wait_for_step(proc, run_dir, KILL_AT)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = [r["step"] for r in _records(run_dir) if r["kind"] == "step"][-1]
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.pt"))
    assert len(kept) == 2 and kept[-1] == "step-00000100.pt" or killed_at >= 150  # the newest --keep-checkpoints
    assert not (run_dir / "summary.json").exists()
    # what a kill in the middle of a checkpoint's write leaves (it happened here once, at step 150): the resume
    # removes it
    (run_dir / "checkpoints" / ".step-00000150.pt.cut0ff.tmp").write_bytes(b"PK\x03\x04")

    # A resume may not contradict the run's maths, but may change what does not change it.
    bad = subprocess.run([sys.executable, "-m", "scalesgd", "train", "--resume", str(run_dir), "--lr", "0.5"],
                         capture_output=True, text=True, timeout=200)
    assert bad.returncode == 2 and "--lr 0.5 contradicts" in bad.stderr and "Traceback" not in bad.stderr

    resumed = _launch(["--resume", str(run_dir), "--no-progress", "--timeout-s", "300"])
    out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err
    assert killed_at > 100  # the resume really replayed the steps after the checkpoint
    _assert_same_run(run_dir, reference)


@pytest.mark.timeout(900)
def test_dead_worker_restarts_from_checkpoint_and_the_run_dir_is_locked(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch([*ARGS, "--run-dir", str(run_dir), "--max-restarts", "1"])
    _wait_for_step(proc, run_dir, KILL_AT)
    # While it runs, the launcher holds the run directory's lock (a second run gets one line naming it:
    # test_checkpoint.py::test_a_locked_run_dir_names_its_holder).
    with open(run_dir / ".lock") as f:
        with pytest.raises(BlockingIOError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert f.read().strip() == str(proc.pid)
    victim = _workers(proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err
    assert "was killed by SIGKILL" in err and "restarting from checkpoint step-" in err
    _assert_same_run(run_dir, reference)


SHORT = ["--model", "mlp", "--dataset", "synthetic-logreg", "--steps", "100000", "--workers", "2",
         "--global-batch-size", "32", "--threads-per-worker", "1", "--no-progress", "--timeout-s", "60"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("comm", ["allreduce", "ring", "ps"])
def test_without_restarts_the_dead_rank_is_named_not_the_survivor(comm, tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch([*SHORT, "--comm", comm, "--run-dir", str(run_dir)])
    _wait_for_step(proc, run_dir, 20)
    workers = _workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # rank 1: started second
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "worker 1 was killed by SIGKILL (signal 9)" in lines[0], err
    assert not any(_alive(p) for p in workers)


@pytest.mark.timeout(600)
def test_workers_stop_when_the_launcher_is_killed(tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch([*SHORT, "--run-dir", str(run_dir)])
    _wait_for_step(proc, run_dir, 20)
    workers = _workers(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "workers kept training after their launcher died"
    # They checkpointed on the way out (SIGTERM from the kernel), so the run can be resumed.
    assert list((run_dir / "checkpoints").glob("step-*.pt"))


# Resize: no dropout and a fixed batch, so the maths does not depend on the worker count at all.
RESIZE = ["--model", "mlp", "--dataset", "synthetic-logreg", "--steps", "1000", "--workers", "2",
          "--global-batch-size", "36", "--eval-every", "100", "--threads-per-worker", "1", "--no-progress",
          "--diversity", "off"]


@pytest.mark.timeout(900)
def test_sigterm_checkpoints_and_stops_and_a_resume_on_3_workers_matches(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _launch([*RESIZE, "--run-dir", str(ref_dir)])
    proc = _launch([*RESIZE, "--run-dir", str(run_dir), "--checkpoint-every-s", "0.2"])
    _wait_for_step(proc, run_dir, 400)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher: it passes the stop on to the workers
    out, err = proc.communicate(timeout=120)
    assert ref.wait(timeout=400) == 0
    assert proc.returncode == 128 + signal.SIGTERM  # a stop, not an error
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "stopped by SIGTERM after step" in lines[0] and "--resume" in lines[0], err
    stopped_at = int(lines[0].split("after step ")[1].split(";")[0])
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.pt"))
    assert len(kept) == 2 and kept[-1] == f"step-{stopped_at:08d}.pt"  # and one before it, by time
    assert [r["step"] for r in _records(run_dir) if r["kind"] == "step"][-1] == stopped_at

    resumed = _launch(["--resume", str(run_dir), "--workers", "3"])
    out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err
    assert [r["step"] for r in _records(run_dir) if r["kind"] == "step"] == list(range(1, 1001))
    got, want = _final_params(run_dir), _final_params(ref_dir)
    for k in want:  # the same global batches and lr; only the order of the sums differs
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    assert json.loads((run_dir / "config.json").read_text())["workers"] == 3


@pytest.mark.timeout(900)
def test_torchrun_restart_resumes_from_the_checkpoint(reference, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                             "--no-python", str(Path(sys.executable).with_name("scalesgd")), "train", *ARGS,
                             "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_step(proc, run_dir, KILL_AT)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    ranks = sorted(int(c) for c in children if b"train" in Path(f"/proc/{c}/cmdline").read_bytes())
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, "\n".join(line for line in err.splitlines() if "scalesgd" in line)
    _assert_same_run(run_dir, reference)


# Local SGD: momentum 0.9 kept per rank (never averaged), parameters averaged after steps 1, 5, 9, ... (step
# index 4k); checkpoints every 30 steps, which never falls on an average, so each one is taken with the ranks'
# parameters and momentum buffers apart.
LOCAL_STEPS = 1500
LOCAL = ["--model", "mlp", "--dataset", "synthetic-logreg", "--steps", str(LOCAL_STEPS), "--workers", "2",
         "--global-batch-size", "32", "--sync-every", "4", "--momentum", "0.9", "--dropout", "0.2",
         "--diversity", "off", "--eval-every", "100", "--threads-per-worker", "1", "--no-progress",
         "--checkpoint-every-steps", "30", "--keep-checkpoints", "2"]


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("local-ref") / "run"
    proc = _launch([*LOCAL, "--run-dir", str(run_dir)])
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err
    return run_dir


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


@pytest.mark.timeout(900)
def test_local_sgd_kill_9_then_resume_is_bit_identical(local_reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch([*LOCAL, "--run-dir", str(run_dir)])
    _wait_for_step(proc, run_dir, 200)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    newest = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    blob = torch.load(newest, weights_only=True)
    assert blob["step"] % 30 == 0 and (blob["step"] - 1) % 4 != 0  # between two averages
    own = [r["own"] for r in blob["ranks"]]
    # every rank's own state is in it, and they differ: parameters since the last average, momentum always
    assert len(own) == 2 and not torch.equal(own[0]["params"], own[1]["params"])
    m0, m1 = (max(_tensors(o["tx_state"]), key=torch.Tensor.numel) for o in own)
    assert m0.shape == own[0]["params"].shape and not torch.equal(m0, m1) and m0.abs().sum() > 0

    # each rank had its own model: another worker count cannot continue it
    bad = subprocess.run([sys.executable, "-m", "scalesgd", "train", "--resume", str(run_dir), "--workers", "3",
                          "--no-progress"], capture_output=True, text=True, timeout=200)
    assert bad.returncode == 2 and "--workers 2" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1] == newest

    resumed = _launch(["--resume", str(run_dir), "--timeout-s", "300"])
    out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err
    _assert_same_run(run_dir, local_reference, n_steps=LOCAL_STEPS)


@pytest.mark.timeout(900)
def test_local_sgd_stops_at_the_next_average_on_sigterm_and_resumes_bit_identical(local_reference, tmp_path):
    # A local step has no all-reduce to carry a stop request; the next average does (before, a local-SGD run
    # never saw the request and trained on to the end).
    run_dir = tmp_path / "run"
    proc = _launch([*LOCAL, "--run-dir", str(run_dir), "--timeout-s", "120"])
    _wait_for_step(proc, run_dir, 200)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err  # a stop, not a failure
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "stopped by SIGTERM after step" in lines[0], err
    stopped_at = int(lines[0].split("after step ")[1].split(";")[0])
    assert stopped_at < LOCAL_STEPS and (stopped_at - 1) % 4 == 0  # at an average
    assert sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1].name == f"step-{stopped_at:08d}.pt"
    resumed = _launch(["--resume", str(run_dir), "--timeout-s", "300"])
    out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err
    _assert_same_run(run_dir, local_reference, n_steps=LOCAL_STEPS)


# Two machines, simulated: two torchrun agents on this machine, one worker each, meeting through c10d
# rendezvous on loopback. The same ARGS as the single-node reference (P = 2, spawned by scalesgd itself).
def _two_agents(args: list[str], max_restarts: int = 0) -> list[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rdzv_id = f"scalesgd-test-{port}"
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
                              "--max-restarts", str(max_restarts), "-m", "scalesgd", "train", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            for _ in range(2)]


def _finish(agents: list[subprocess.Popen], timeout_s: float = 400) -> list[tuple[int, str]]:
    """Wait for every agent (each within ``timeout_s``); kill all that remain if one does not end."""
    try:
        errs = [a.communicate(timeout=timeout_s)[1] for a in agents]
        return [(a.returncode, err) for a, err in zip(agents, errs)]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
                a.communicate(timeout=30)


def _agent_worker(agent: subprocess.Popen) -> int:
    (worker,) = [c for c in _children(agent.pid) if b"scalesgd" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return worker


TWO_NODE_ARGS = ARGS[:ARGS.index("--workers")] + ARGS[ARGS.index("--workers") + 2:]  # torchrun sets them


@pytest.mark.timeout(900)
def test_two_torchrun_agents_train_as_one_node_does(reference, tmp_path):
    run_dir = tmp_path / "run"
    results = _finish(_two_agents([*TWO_NODE_ARGS, "--run-dir", str(run_dir)]))
    assert [code for code, _ in results] == [0, 0], results
    _assert_same_run(run_dir, reference)
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2


@pytest.mark.timeout(900)
def test_two_torchrun_agents_restart_after_a_killed_worker(reference, tmp_path):
    # Only the agent whose worker died counts a restart; the other restarts its healthy worker with
    # TORCHELASTIC_RESTART_COUNT unchanged. Both ranks must still resume (before: that rank started afresh and
    # was refused, "already holds a run", or the ranks disagreed on the process group's store prefix).
    run_dir = tmp_path / "run"
    agents = _two_agents([*TWO_NODE_ARGS, "--run-dir", str(run_dir)], max_restarts=1)
    try:
        _wait_for_step(agents[0], run_dir, KILL_AT)
        os.kill(_agent_worker(agents[1]), signal.SIGKILL)
    finally:
        results = _finish(agents)
    assert [code for code, _ in results] == [0, 0], [err[-3000:] for _, err in results]
    _assert_same_run(run_dir, reference)


@pytest.mark.timeout(900)
def test_two_torchrun_agents_killed_stop_their_workers_and_resume(reference, tmp_path):
    # torchrun starts workers in sessions of their own: with both agents killed -9 they trained on to the end,
    # unsupervised. Now they stop (checkpointing on the way out) and the run resumes under two new agents.
    run_dir = tmp_path / "run"
    agents = _two_agents([*TWO_NODE_ARGS, "--run-dir", str(run_dir)])
    try:
        _wait_for_step(agents[0], run_dir, KILL_AT)
        workers = [_agent_worker(a) for a in agents]
    finally:
        for a in agents:
            os.killpg(a.pid, signal.SIGKILL)
        _finish(agents, timeout_s=30)
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "workers kept training after their agents died"
    assert not (run_dir / "summary.json").exists() and list((run_dir / "checkpoints").glob("step-*.pt"))
    results = _finish(_two_agents(["--resume", str(run_dir), "--no-progress", "--timeout-s", "300"]))
    assert [code for code, _ in results] == [0, 0], [err[-3000:] for _, err in results]
    _assert_same_run(run_dir, reference)
