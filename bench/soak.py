"""Soak: train for ``--minutes`` under ``--max-restarts`` while a random worker is killed (-9) every 30–90 s.

One ``scalesgd train --workers P --max-restarts R`` job trains on synthetic data (``synthetic-logreg``,
an MLP with dropout and momentum, a constant learning rate, so that nothing depends on the step budget) with a
checkpoint every ``--checkpoint-every-steps`` steps. A seeded generator picks, after each (re)start has logged
its first new step, a delay drawn uniformly from ``--kill-every LOW:HIGH`` seconds and then one of the job's
workers, which gets SIGKILL; the launcher restarts the job from the newest checkpoint. After ``--minutes`` the
launcher gets SIGTERM: every rank checkpoints after the same step S and the job stops. An uninterrupted run of
S steps with the same options and seed is the reference.

Printed, one line per measurement: each kill (when, which worker, at which logged step) and the time it lost
(wall time from the kill to the first step the restarted job logged, which includes starting the workers
again and replaying the steps after the checkpoint), then steps completed, restarts, time lost per restart,
whether the final parameters are ``torch.equal`` to the reference's, and a verdict line (PASS: there was a
kill, every kill was followed by a restart, the job stopped cleanly, and the parameters are equal). The
minutes count from the job's first step.

Run:  nice -n 10 python bench/soak.py [--minutes 10] [--kill-every 30:90] [--seed 0] [--workers 2]
Timings on a shared machine are noisy; the verdict is what the soak checks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = ["--model", "mlp", "--dataset", "synthetic-logreg", "--global-batch-size", "32", "--dropout", "0.2",
         "--momentum", "0.9", "--lr", "0.05", "--lr-schedule", "constant", "--batch-policy", "fixed",
         "--eval-every", "500", "--threads-per-worker", "1", "--no-progress", "--timeout-s", "60",
         "--keep-checkpoints", "2"]
HUGE_STEPS = 10**9  # the soak's budget: it is stopped by SIGTERM long before


def scalesgd_command() -> list[str]:
    return [sys.executable, "-m", "scalesgd", "train"]


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def workers_of(launcher: int) -> list[int]:
    """The launcher's training workers: children of its fork server (its other child, multiprocessing's
    resource tracker, has none)."""
    return sorted(w for c in children(launcher) for w in children(c))


def metrics_bytes(run_dir: Path) -> bytes:
    try:
        return (run_dir / "metrics.jsonl").read_bytes()
    except FileNotFoundError:
        return b""


def last_step(content: bytes) -> int:
    steps = [json.loads(line)["step"] for line in content.splitlines()
             if line.endswith(b"}") and b'"kind": "step"' in line]
    return steps[-1] if steps else 0


def wait_for_new_record(run_dir: Path, before: bytes, proc: subprocess.Popen, deadline: float) -> float | None:
    """Wall time (perf_counter) when ``metrics.jsonl`` first holds a step that is not in ``before`` (a restarted
    job cuts the file back to its checkpoint and logs from there); None when the job ended or time ran out."""
    while time.perf_counter() < deadline and proc.poll() is None:
        now = metrics_bytes(run_dir)
        if len(now) > len(before) or now != before[:len(now)]:
            tail = now[len(os.path.commonprefix([now, before])):]
            if b'"kind": "step"' in tail and tail.rstrip().endswith(b"}"):
                return time.perf_counter()
        time.sleep(0.02)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="training time under kills (default 10)")
    ap.add_argument("--kill-every", default="30:90", help="seconds between kills, LOW:HIGH, drawn uniformly")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kills and of the training run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--checkpoint-every-steps", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = ap.parse_args(argv)
    low, high = (float(v) for v in args.kill_every.split(":"))
    rng = random.Random(args.seed)
    options = [*TRAIN, "--seed", str(args.seed), "--workers", str(args.workers),
               "--checkpoint-every-steps", str(args.checkpoint_every_steps)]
    root = Path(tempfile.mkdtemp(prefix="scalesgd-soak-"))
    run_dir, ref_dir = root / "soak", root / "reference"
    stderr_path = root / "soak.stderr"
    print(f"soak: {args.minutes:g} min, a worker killed every {low:g}-{high:g} s (seed {args.seed}), "
          f"P={args.workers}, checkpoint every {args.checkpoint_every_steps} steps", flush=True)

    with open(stderr_path, "w") as err:
        proc = subprocess.Popen([*scalesgd_command(), *options, "--steps", str(HUGE_STEPS), "--max-restarts", "1000",
                                 "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    lost: list[float] = []
    kills = 0
    ok = True
    try:
        ready = wait_for_new_record(run_dir, b"", proc, time.perf_counter() + 600)
        if ready is None:
            raise RuntimeError(f"the job logged no step: {stderr_path.read_text()[-2000:]}")
        start = ready  # the minutes count from the first step
        end = start + 60 * args.minutes
        while True:
            at = ready + rng.uniform(low, high)
            if at > end - 3:  # no kill the stop signal could land on: the job must be training at the end
                break
            while time.perf_counter() < at:
                time.sleep(0.05)
            workers = workers_of(proc.pid)
            if len(workers) != args.workers or proc.poll() is not None:
                print(f"error: expected {args.workers} workers, found {workers} (job exit {proc.poll()})", flush=True)
                ok = False
                break
            victim = rng.randrange(args.workers)
            before = metrics_bytes(run_dir)
            t_kill = time.perf_counter()
            os.kill(workers[victim], signal.SIGKILL)
            kills += 1
            ready = wait_for_new_record(run_dir, before, proc, t_kill + 300)
            if ready is None:
                print(f"kill {kills}: worker {victim} (pid {workers[victim]}) at step {last_step(before)}: no new "
                      f"step within 300 s (job exit {proc.poll()})", flush=True)
                ok = False
                break
            lost.append(ready - t_kill)
            # and back where it was killed (the steps after the checkpoint replayed)
            while last_step(metrics_bytes(run_dir)) < last_step(before) and proc.poll() is None:
                time.sleep(0.02)
            print(f"kill {kills} at {t_kill - start:.1f} s: worker {victim} (pid {workers[victim]}) at step "
                  f"{last_step(before)}; first new step {ready - t_kill:.2f} s later, back at step "
                  f"{last_step(before)} {time.perf_counter() - t_kill:.2f} s later", flush=True)
        while time.perf_counter() < end:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    err_text = stderr_path.read_text()
    restarts = len(re.findall(r"restarting from", err_text))
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", err_text)
    if not stopped:
        print(f"error: the job did not stop cleanly (exit {proc.returncode}): {err_text[-2000:]}", flush=True)
        ok = False
        steps = last_step(metrics_bytes(run_dir))
    else:
        steps = int(stopped.group(1))
    print(f"steps completed: {steps}", flush=True)
    print(f"restarts: {restarts} (kills: {kills})", flush=True)
    if lost:
        print(f"time lost per restart: mean {statistics.mean(lost):.2f} s, median {statistics.median(lost):.2f} s, "
              f"max {max(lost):.2f} s over {len(lost)}", flush=True)
    else:
        print("time lost per restart: no restart", flush=True)

    equal = False
    if stopped:
        t0 = time.perf_counter()
        ref = subprocess.run([*scalesgd_command(), *options, "--steps", str(steps), "--run-dir", str(ref_dir)],
                             capture_output=True, text=True, timeout=max(600.0, 2 * 60 * args.minutes))
        if ref.returncode != 0:
            print(f"error: the reference run failed: {ref.stderr[-2000:]}", flush=True)
            ok = False
        else:
            import torch

            got = torch.load(run_dir / "checkpoints" / f"step-{steps:08d}.pt", weights_only=True)["model"]
            want = torch.load(ref_dir / "checkpoint.pt", weights_only=True)["model"]
            equal = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
            print(f"final parameters equal the uninterrupted reference ({steps} steps, same seed, "
                  f"{time.perf_counter() - t0:.0f} s): {'yes' if equal else 'NO'} (torch.equal on {len(want)} tensors)",
                  flush=True)
    passed = ok and equal and restarts == kills > 0
    why = [] if passed else [w for w, bad in (("no kill", kills == 0),
                                              ("a kill was not followed by a restart", restarts != kills),
                                              ("parameters differ", stopped and not equal),
                                              ("the job failed", not ok)) if bad]
    print(f"verdict: {'PASS' if passed else 'FAIL'}: {restarts} restarts after {kills} kills in {args.minutes:g} min, "
          f"{steps} steps, final parameters {'bit-identical to' if equal else 'NOT equal to'} the uninterrupted run"
          + (f" ({'; '.join(why)})" if why else ""), flush=True)
    if args.keep:
        print(f"run directories: {run_dir} {ref_dir}", flush=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
