"""Backup workers against a straggler, measured: their gain in step time against their cost in samples.

Runs ``scalesgd train --comm ps`` at P workers with an injected straggler, without (b = 0) and with backup
workers (b = 1), for the same number of steps on the same data order, and prints per configuration: rank
0's mean step time and training time, the examples whose gradients were used per step ((P − b)/P of the
global batch), and the final test accuracy and test loss — the sample-efficiency cost. At P = 2, b = 1 each
step uses rank 0's half of the batch alone (rank 0 is the coordinator and always first).

The machine is shared with other jobs: timings are noisy; the load average is printed.

    python bench/backup_workers.py                                   # rank1x3, P = 2, 3 epochs
    python bench/backup_workers.py --straggler exp:mean=10ms --epochs 2 --json /tmp/backup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from scalesgd.config import RunConfig
from scalesgd.run import train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--straggler", default="rank1x3")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--global-batch-size", type=int, default=128)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; digits/mlp, P = {args.workers}, "
          f"B = {args.global_batch_size}, {args.epochs:g} epochs, straggler {args.straggler}")
    print(f"{'b':>2} {'seed':>4} {'step ms':>8} {'train s':>8} {'used/step':>9} {'test acc':>8} {'test loss':>9}")
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            for b in (0, 1):
                run_dir = Path(tmp) / f"b{b}-s{seed}"
                cfg = RunConfig(dataset="digits", model="mlp", width=256, global_batch_size=args.global_batch_size,
                                epochs=args.epochs, lr=0.05, lr_schedule="constant", diversity="off",
                                workers=args.workers, comm="ps", backup_workers=b, straggler=args.straggler,
                                progress=False, threads_per_worker=1, timeout_s=300, seed=seed,
                                run_dir=str(run_dir))
                summary = train(cfg)
                records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
                steps = [r for r in records if r["kind"] == "step"][3:]
                line = {"backups": b, "seed": seed, "mean_step_s": statistics.fmean(r["step_time_s"] for r in steps),
                        "train_time_s": summary["train_time_s"],
                        "used_per_step": args.global_batch_size * (args.workers - b) / args.workers,
                        "test_accuracy": summary["final_test_accuracy"], "test_loss": summary["final_test_loss"]}
                lines.append(line)
                print(f"{b:>2} {seed:>4} {line['mean_step_s'] * 1e3:>8.2f} {line['train_time_s']:>8.2f} "
                      f"{line['used_per_step']:>9.0f} {line['test_accuracy']:>8.4f} {line['test_loss']:>9.4f}")
    for b in (0, 1):
        mine = [x for x in lines if x["backups"] == b]
        print(f"b={b}: mean over seeds: step {statistics.fmean(x['mean_step_s'] for x in mine) * 1e3:.2f} ms, "
              f"test accuracy {statistics.fmean(x['test_accuracy'] for x in mine):.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(lines, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
