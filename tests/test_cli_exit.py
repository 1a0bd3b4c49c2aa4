"""How ``scalesgd train`` ends, seen from a shell: a stop signal is a stop (one line, exit 128 + the signal's
number), not an error; a normal run leaves no resource-tracker warning behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.spawn

LONG = ["--model", "mlp", "--dataset", "synthetic-logreg", "--steps", "100000", "--global-batch-size", "32",
        "--threads-per-worker", "1", "--no-progress", "--timeout-s", "60", "--diversity", "off"]


def _launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scalesgd", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout_s: float = 200) -> None:
    deadline = time.monotonic() + timeout_s
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        steps = [r["step"] for r in map(json.loads, (s for s in lines if s.endswith("}"))) if r["kind"] == "step"]
        if steps and steps[-1] >= step:
            return
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout_s} s")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers, sig", [(2, signal.SIGTERM), (1, signal.SIGINT), (2, signal.SIGINT)])
def test_a_stop_signal_is_reported_as_a_stop_with_the_checkpoint_and_the_resume_command(tmp_path, workers, sig):
    run_dir = tmp_path / "run"
    proc = _launch([*LONG, "--workers", str(workers), "--run-dir", str(run_dir)])
    _wait_for_step(proc, run_dir, 10)
    proc.send_signal(sig)  # the launcher (with one worker: the trainer itself)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"scalesgd: stopped by {sig.name} after step ") and "error" not in line, line
    step = int(line.split("after step ")[1].split(";")[0])
    written = run_dir / "checkpoints" / f"step-{step:08d}.pt"
    assert f"checkpoint {written};" in line and written.is_file()
    assert line.endswith(f"resume with: scalesgd train --resume {run_dir}")


# Logs every name registered with and unregistered from multiprocessing's resource tracker, in every process of
# the job (the launcher, the fork server and the workers forked from it import it at start-up).
_TRACKER_LOG = '''
import os
import multiprocessing.resource_tracker as rt
_register, _unregister = rt.register, rt.unregister
def _log(what, name, rtype):
    with open(os.environ["TRACKER_LOG"], "a") as f:
        f.write(f"{what} {name} {rtype}\\n")
def register(name, rtype):
    _log("register", name, rtype)
    return _register(name, rtype)
def unregister(name, rtype):
    _log("unregister", name, rtype)
    return _unregister(name, rtype)
rt.register, rt.unregister = register, unregister
'''


@pytest.mark.timeout(300)
def test_a_finished_run_leaves_no_semaphore_to_the_resource_tracker(tmp_path):
    """With the progress bar (on by default). The warning ("There appear to be 1 leaked semaphore objects") came at about one exit in three, from the
    progress bar's multiprocessing lock in rank 0, which leaves through os._exit: so besides stderr, every
    semaphore registered with the tracker must have been unregistered."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_TRACKER_LOG)
    log = tmp_path / "tracker.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "TRACKER_LOG": str(log)}
    proc = subprocess.run([sys.executable, "-m", "scalesgd", "train", "--model", "mlp", "--dataset", "digits",
                           "--steps", "20", "--workers", "2", "--global-batch-size", "32", "--threads-per-worker",
                           "1", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "leaked semaphore" not in proc.stderr and "resource_tracker" not in proc.stderr, proc.stderr
    events = log.read_text().splitlines() if log.exists() else []
    held = {line.split()[1] for line in events if line.startswith("register") and line.endswith("semaphore")}
    held -= {line.split()[1] for line in events if line.startswith("unregister")}
    assert not held, events


def test_a_resumed_runs_progress_bar_starts_where_the_run_was():
    from scalesgd.config import RunConfig
    from scalesgd.run import _progress_bar

    class _Main:
        is_main, size = True, 2

    bar = _progress_bar(RunConfig(progress=True), _Main(), total_examples=1000, done_examples=400)
    try:
        assert (bar.n, bar.total) == (400, 1000)
    finally:
        bar.close()
