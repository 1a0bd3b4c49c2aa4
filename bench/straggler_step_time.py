"""Validate the performance model's price of injected delays and local SGD against the trainer, at P = 2.

One undelayed run of ``scalesgd train`` measures what a step costs here: the compute a step waits for
(mean over steps of the slower rank's compute), the all-reduce without the wait (comm_s − wait_s) and the
update. Then each delayed run is predicted *before* it is run, from that baseline and
:func:`scalesgd.perf_model.delayed_compute` (E[max over P of compute + delay], per local-SGD period):

    predicted step = delayed_compute(c, P, straggler, H) + comm / H + update

and measured on rank 0's clock: the mean over steps of step_time_s (compute + comm + update), plus under
local SGD each average's time spread over the steps. The first steps are warm-up and dropped. Target:
within ±20%. The slow-rank case uses the slow rank's own baseline compute (it sleeps (factor − 1)× it).

The machine is shared with other jobs: timings are noisy, so delays are chosen large against compute.

    python bench/straggler_step_time.py                 # exp, lognormal, pause, rank1x3, exp with H = 4
    python bench/straggler_step_time.py --steps 100 --json /tmp/straggle.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from scalesgd import perf_model as pm
from scalesgd.config import RunConfig
from scalesgd.run import train
from scalesgd.stragglers import parse_straggler

CASES = [("exp:mean=20ms", None), ("lognormal:mean=20ms,sigma=1", None), ("pause:p=0.2,s=0.05", None),
         ("rank1x3", None), ("exp:mean=20ms", 4)]
WARMUP_STEPS = 5


def _steps(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "step"][WARMUP_STEPS:]


def run(cfg: RunConfig, root: Path, name: str) -> list[dict]:
    run_dir = root / name
    train(cfg.replace(run_dir=str(run_dir)))
    return _steps(run_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--global-batch-size", type=int, default=256)
    ap.add_argument("--tolerance", type=float, default=0.20)
    ap.add_argument("--json", default=None, help="write the lines here")
    args = ap.parse_args(argv)
    cfg = RunConfig(dataset=args.dataset, model=args.model, width=args.width,
                    global_batch_size=args.global_batch_size, steps=args.steps + WARMUP_STEPS, lr=0.05,
                    lr_schedule="constant", diversity="off", workers=2, eval_every=10 ** 6, eval_train_examples=64,
                    progress=False, threads_per_worker=1, timeout_s=300, seed=0)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; P = 2, {cfg.model}/{cfg.dataset}, "
          f"B = {cfg.global_batch_size}, {args.steps} measured steps per run")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = run(cfg, root, "baseline")
        c_wait = statistics.fmean(max(r["compute_s_rank0"], r["compute_s_rank1"]) for r in base)
        c_rank1 = statistics.fmean(r["compute_s_rank1"] for r in base)
        comm = statistics.fmean(max(r["comm_s"] - r["wait_s"], 0.0) for r in base)
        update = statistics.fmean(r["update_s"] for r in base)
        measured_base = statistics.fmean(r["step_time_s"] for r in base)
        print(f"baseline: step {measured_base * 1e3:.2f} ms = compute waited for {c_wait * 1e3:.2f} ms "
              f"(rank 1 alone {c_rank1 * 1e3:.2f}) + all-reduce {comm * 1e3:.2f} ms + update {update * 1e3:.2f} ms "
              f"+ wait/other {(measured_base - c_wait - comm - update) * 1e3:.2f} ms")
        lines = []
        print(f"{'straggler':<30} {'H':>3} {'predicted':>10} {'measured':>10} {'error':>8}  within")
        for text, h in CASES:
            spec = parse_straggler(text)
            c = c_rank1 if spec.kind == "slow" else c_wait
            predicted = float(pm.delayed_compute(c, 2, straggler=spec, sync_every=h or 1)) + comm / (h or 1) + update
            steps = run(cfg.replace(straggler=text, sync_every=h), root, f"{text.replace(':', '_')}-{h}")
            measured = statistics.fmean(r["step_time_s"] + r.get("average_s", 0.0) for r in steps)
            err = predicted / measured - 1
            ok = abs(err) <= args.tolerance
            lines.append({"straggler": text, "sync_every": h or 1, "predicted_step_s": predicted,
                          "measured_step_s": measured, "rel_error": err, "within": ok})
            print(f"{text:<30} {h or 1:>3} {predicted * 1e3:>8.2f}ms {measured * 1e3:>8.2f}ms {err:>+7.1%}  "
                  f"{'yes' if ok else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline_step_s": measured_base, "lines": lines}, indent=1))
    return 0 if all(line["within"] for line in lines) else 1


if __name__ == "__main__":
    raise SystemExit(main())
