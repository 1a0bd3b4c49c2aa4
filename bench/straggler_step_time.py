"""Validate the performance model's price of injected delays and local SGD against the trainer, at P = 2.

One undelayed run of ``scalesgd train`` measures what a step costs here: the compute a step waits for
(mean over steps of the slower rank's compute), the all-reduce without the wait (comm_s − wait_s) and the
update. Then each delayed run is predicted *before* it is run, from that baseline and
:func:`scalesgd.perf_model.delayed_compute` (E[max over P of compute + delay], per local-SGD period):

    predicted step = delayed_compute(c, P, straggler, H) + comm / H + update

and measured on rank 0's clock: the mean over steps of step_time_s (compute + comm + update), plus under
local SGD each average's time spread over the steps. The first steps are warm-up and dropped. Target:
within ±20%. The slow-rank case uses the slow rank's own baseline compute (it sleeps (factor − 1)× it).

Two predictions are printed: the model's (the expectation over the delay distribution) and the same formula
with the delays this run actually drew (they are a function of (seed, rank, step) alone,
:func:`scalesgd.stragglers.sample_delay`: the mean over the measured steps of max over ranks of the step's
delay, or under local SGD of a period's summed delay, over H). Their difference is the sampling error of a
finite run; what remains between the second and the measurement is the machine (sleep overshoot and wake-up,
other jobs' load), not the formula. A fixed slow rank draws nothing at random, so the two agree there.
Beside each case the bench times ``time.sleep`` of the case's mean delay right after it ("oversleep": mean
overrun / requested): on a loaded machine a sleeper waits milliseconds for a time slice after waking, which
lengthens every injected delay and which the model does not (and should not) price.

The machine is shared with other jobs: timings are noisy, so delays are chosen large against compute, the
load average is printed with each case, and ``--repeats N`` measures the baseline again right before each
case, N times over (a change of load between a baseline and its case shows up as error).

    python bench/straggler_step_time.py                 # exp, lognormal, pause, rank1x3, exp with H = 4
    python bench/straggler_step_time.py --steps 100 --json /tmp/straggle.json
    python bench/straggler_step_time.py --cases rank1x3,exp:mean=20ms@4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from scalesgd import perf_model as pm
from scalesgd.config import RunConfig
from scalesgd.run import train
from scalesgd.rundata import RunData
from scalesgd.stragglers import parse_straggler, sample_delay

CASES = "exp:mean=20ms,lognormal:mean=20ms;sigma=1,pause:p=0.2;s=0.05,rank1x3,exp:mean=20ms@4"
WARMUP_STEPS = 5


def parse_cases(text: str) -> list[tuple[str, int | None]]:
    """``SPEC[@H],...`` → [(spec, H or None)]; a spec's own commas are written ``;``
    (``lognormal:mean=5ms;sigma=1``)."""
    cases = []
    for item in text.split(","):
        spec, _, h = item.strip().partition("@")
        cases.append((spec.replace(";", ","), int(h) if h else None))
    return cases


def run(cfg: RunConfig, root: Path, name: str) -> list[dict]:
    run_dir = root / name
    train(cfg.replace(run_dir=str(run_dir)))
    return RunData.open(run_dir).steps[WARMUP_STEPS:]


def sleep_overshoot(seconds: float, n: int = 30) -> float:
    """Mean seconds by which ``time.sleep(seconds)`` overran here and now: an injected delay is a sleep, and on a
    loaded machine the sleeper waits for a time slice after it (milliseconds), which no delay model prices."""
    over = []
    for _ in range(n):
        t0 = time.perf_counter()
        time.sleep(seconds)
        over.append(time.perf_counter() - t0 - seconds)
    return statistics.fmean(over)


def drawn_max_delay(text: str, steps: list[dict], *, seed: int, world_size: int, sync_every: int | None) -> float:
    """The delays this run drew, in the form the model prices: the mean over the measured steps of max over ranks
    of a step's delay (H = 1), or over the measured local-SGD periods of max over ranks of the period's summed
    delay, over H; seconds. A slow rank's delay is not random: 0 here (its cost is a multiple of compute)."""
    spec = parse_straggler(text)
    if spec is None or spec.kind == "slow":
        return 0.0
    index = [r["step"] - 1 for r in steps]  # a step record carries the count of steps done; delays the 0-based index

    def delay(rank: int, k: int) -> float:
        return sample_delay(spec, seed=seed, rank=rank, step=k, compute_s=0.0)

    off = [r["step"] for r in steps if abs(r.get("injected_delay_s", 0.0) - delay(0, r["step"] - 1)) > 1e-9]
    if off:  # rank 0 logs its own delay: the draws recomputed here must be the ones the run slept
        raise SystemExit(f"step {off[0]}: rank 0's logged delay is not the one recomputed from (seed, rank, step)")

    if not sync_every or sync_every == 1:
        return statistics.fmean(max(delay(p, k) for p in range(world_size)) for k in index)
    h = sync_every  # averages after step indices 0, H, 2H, …: a period is the H steps up to one of them
    ends = [k for k in index if k % h == 0 and k - h + 1 >= index[0]]
    return statistics.fmean(max(sum(delay(p, j) for j in range(k - h + 1, k + 1)) for p in range(world_size)) / h
                            for k in ends)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--global-batch-size", type=int, default=256)
    ap.add_argument("--tolerance", type=float, default=0.20)
    ap.add_argument("--cases", default=CASES, help="SPEC[@H],… (a spec's own commas as ';'); default: %(default)s")
    ap.add_argument("--repeats", type=int, default=1, help="measure baseline and case this many times each")
    ap.add_argument("--json", default=None, help="write the lines here")
    args = ap.parse_args(argv)
    cases = parse_cases(args.cases)
    for text, _ in cases:
        parse_straggler(text)  # a bad spec fails here, before any run
    cfg = RunConfig(dataset=args.dataset, model=args.model, width=args.width,
                    global_batch_size=args.global_batch_size, steps=args.steps + WARMUP_STEPS, lr=0.05,
                    lr_schedule="constant", diversity="off", workers=2, eval_every=10 ** 6, eval_train_examples=64,
                    progress=False, threads_per_worker=1, timeout_s=300, seed=0)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; P = 2, {cfg.model}/{cfg.dataset}, "
          f"B = {cfg.global_batch_size}, {args.steps} measured steps per run")
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rep in range(args.repeats):
            for i, (text, h) in enumerate(cases):
                load0 = os.getloadavg()[0]
                base = run(cfg, root, f"baseline-{rep}-{i}")
                c_wait = statistics.fmean(max(r["compute_s_rank0"], r["compute_s_rank1"]) for r in base)
                c_rank1 = statistics.fmean(r["compute_s_rank1"] for r in base)
                comm = statistics.fmean(max(r["comm_s"] - r["wait_s"], 0.0) for r in base)
                update = statistics.fmean(r["update_s"] for r in base)
                measured_base = statistics.fmean(r["step_time_s"] for r in base)
                spec = parse_straggler(text)
                c = c_rank1 if spec.kind == "slow" else c_wait
                predicted = (float(pm.delayed_compute(c, 2, straggler=spec, sync_every=h or 1)) + comm / (h or 1)
                             + update)
                steps = run(cfg.replace(straggler=text, sync_every=h), root, f"{text.replace(':', '_')}-{h}-{rep}")
                load = (load0 + os.getloadavg()[0]) / 2
                drawn = (c * (spec.factor if spec.kind == "slow" else 1.0)
                         + drawn_max_delay(text, steps, seed=cfg.seed, world_size=2, sync_every=h)
                         + comm / (h or 1) + update)
                measured = statistics.fmean(r["step_time_s"] + r.get("average_s", 0.0) for r in steps)
                waited = statistics.fmean(max(r["compute_s_rank0"], r["compute_s_rank1"]) for r in steps)
                err, err_drawn = predicted / measured - 1, drawn / measured - 1
                mean_delay = (spec.factor - 1) * c if spec.kind == "slow" else (
                    spec.mean_s if spec.kind in ("exp", "lognormal") else spec.pause_s)
                overshoot = sleep_overshoot(mean_delay)
                ok = abs(err) <= args.tolerance
                lines.append({"straggler": text, "sync_every": h or 1, "repeat": rep, "predicted_step_s": predicted,
                              "predicted_drawn_step_s": drawn, "measured_step_s": measured, "rel_error": err,
                              "rel_error_drawn": err_drawn, "within": ok, "load": load,
                              "baseline": {"step_s": measured_base, "compute_waited_s": c_wait,
                                           "compute_rank1_s": c_rank1, "comm_s": comm, "update_s": update},
                              "compute_waited_s": waited, "sleep_s": mean_delay, "sleep_overshoot_s": overshoot})
                if i == 0 and rep == 0:
                    print(f"baseline: step {measured_base * 1e3:.2f} ms = compute waited for {c_wait * 1e3:.2f} ms "
                          f"(rank 1 alone {c_rank1 * 1e3:.2f}) + all-reduce {comm * 1e3:.2f} ms + update "
                          f"{update * 1e3:.2f} ms + wait/other {(measured_base - c_wait - comm - update) * 1e3:.2f} ms")
                    print(f"{'straggler':<28} {'H':>2} {'predicted':>10} {'(drawn)':>9} {'measured':>9} "
                          f"{'error':>7} {'(drawn)':>7} {'load':>5} {'oversleep':>13}  within  "
                          "[H=1: compute waited for, predicted]")
                parts = (f"  [{waited * 1e3:.2f} ms, {(predicted - comm - update) * 1e3:.2f} ms]" if not h else "")
                print(f"{text:<28} {h or 1:>2} {predicted * 1e3:>8.2f}ms {drawn * 1e3:>7.2f}ms "
                      f"{measured * 1e3:>7.2f}ms {err:>+7.1%} {err_drawn:>+7.1%} {load:>5.1f} "
                      f"{overshoot * 1e3:>5.2f}/{mean_delay * 1e3:<5.1f}ms  {'yes' if ok else 'NO':<6}{parts}",
                      flush=True)
    if args.repeats > 1:
        print("median over repeats:")
        for text, h in cases:
            mine = [x for x in lines if x["straggler"] == text and x["sync_every"] == (h or 1)]
            print(f"{text:<28} {h or 1:>2} error {statistics.median(x['rel_error'] for x in mine):+.1%}, with the "
                  f"drawn delays {statistics.median(x['rel_error_drawn'] for x in mine):+.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"lines": lines}, indent=1))
    return 0 if all(line["within"] for line in lines) else 1


if __name__ == "__main__":
    raise SystemExit(main())
