"""How ``scalesgd train`` ends, seen from a shell: a stop signal is a stop (one line, exit 128 + the signal's
number), not an error; a normal run leaves no resource-tracker warning behind."""

from __future__ import annotations

import json
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
@pytest.mark.parametrize("workers, sig", [(2, signal.SIGTERM), (1, signal.SIGINT)])
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
