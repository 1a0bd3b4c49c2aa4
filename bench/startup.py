"""Start-up cost of a one-step training run, measured side by side with a bare ``import torch``.

One run times three commands, interleaved over several repetitions (each repetition runs each command
once, in an order that rotates, so drift and other load on the machine hit every command alike):

* ``import torch``: ``python -c "import torch"``, the floor any torch program pays;
* ``train P=1``: ``scalesgd train --dataset digits --model mlp --steps 1 --workers 1``;
* ``train P=2``: the same with ``--workers 2`` (two local worker processes, one step, one evaluation).

Every training run writes a fresh run directory under a temporary directory that is deleted at the end. One
unmeasured warm-up round comes first (it fills the page cache and the data-set cache, as any earlier run on
the machine would have). Printed: the median wall time of each command, its ratio to ``import torch``'s
median, and MET or MISSED against the target (a one-step run within 2x a bare ``import torch``), plus the
load average before and after, since other processes on a shared machine stretch every time.

Run:  python bench/startup.py [--reps 7] [--json FILE]
Timings on a shared machine are noisy; read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

TARGET_RATIO = 2.0  # a one-step run may take at most this many bare `import torch`s


def scalesgd_command() -> list[str]:
    """The ``scalesgd`` console script next to this interpreter (what users run), else ``python -m scalesgd``."""
    script = Path(sys.executable).with_name("scalesgd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "scalesgd"]


def commands(workdir: Path) -> dict[str, Callable[[int], list[str]]]:
    """name -> function(rep) giving the argv of that command for repetition ``rep``."""
    base = [*scalesgd_command(), "train", "--dataset", "digits", "--model", "mlp", "--steps", "1", "--no-progress",
            "--batch-policy", "fixed", "--lr", "0.05"]  # start-up alone: no --lr auto range test

    def train(workers: int):
        return lambda rep: [*base, "--workers", str(workers), "--run-dir", str(workdir / f"run-{rep}-P{workers}")]

    return {"import torch": lambda rep: [sys.executable, "-c", "import torch"],
            "train P=1": train(1),
            "train P=2": train(2)}


def time_once(argv: list[str], cwd: Path) -> float:
    """Wall seconds of one run of ``argv``; a failing command stops the benchmark with its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(argv)}` failed with exit code {proc.returncode}:\n{proc.stderr}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="measured repetitions of each command (default: 7)")
    parser.add_argument("--json", help="also write the times and ratios to this JSON file")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="scalesgd-startup-"))
    times: dict[str, list[float]] = {}
    try:
        cmds = commands(workdir)
        names = list(cmds)
        for name in names:  # warm-up round, not measured
            time_once(cmds[name](-1), workdir)
        for rep in range(args.reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                times.setdefault(name, []).append(time_once(cmds[name](rep), workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    floor = medians["import torch"]
    print(f"start-up, {args.reps} interleaved repetitions; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after, on {os.cpu_count()} CPUs")
    result = {"reps": args.reps, "load_before": load_before[0], "load_after": load_after[0],
              "target_ratio": TARGET_RATIO, "commands": {}}
    for name, ts in times.items():
        ratio = medians[name] / floor
        verdict = "" if name == "import torch" else (
            f"  {'MET' if ratio <= TARGET_RATIO else 'MISSED'} (target <= {TARGET_RATIO:g}x)")
        print(f"{name:13s} median {medians[name]:6.2f} s  (min {min(ts):5.2f}, max {max(ts):5.2f})  "
              f"{ratio:5.2f}x import torch{verdict}")
        result["commands"][name] = {"times_s": ts, "median_s": medians[name], "ratio": ratio}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
