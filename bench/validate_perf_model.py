"""Validate the time-to-accuracy model against the real trainer on this machine.

Predict first, then measure. From short runs of the trainer (``--steps``) at local batch sizes kept off
the validated grid (for P > 1 in a real P-worker job: local workers share the cores and wait for each
other at the all-reduce, so a step's cost there can only be measured in such a job), a diversity batch
bound B_S and the passes one reference run (P = 1, the smallest B) needed, :mod:`scalesgd.perf_model`
predicts every other (B, P) configuration's time per pass and time to accuracy — step time interpolated
or extrapolated along the fitted curve, passes from 1 + B/B_crit — then ``scalesgd train`` runs each one
and the two are printed side by side with the relative error. Targets: time per pass within ±20%, time to
accuracy within ±25%.

Two clocks are compared:

* ``step``: the sections the trainer labels (compute + comm + update). Time per pass = mean
  step_time_s × steps per pass; time to accuracy = the step times the trainer summed to the target. Both
  are predicted from the profile runs' mean step times (means, because the all-reduce's time on a shared
  host is bimodal and the median flips between the modes).
* ``wall``: eval-excluded wall time, which adds the loop's own per-step bookkeeping (batch gather,
  logging), modelled as o₀ + o₁·B per step.

B_S: ``--batch-bound``, else what ``scalesgd predict --from-run`` takes: the trainer's own estimate over the
reference trajectory (rerun with ``--diversity cheap``; the tap does not change the updates), 1 + Σ tr Σ̂ /
Σ ‖G‖²̂ over its steps — numerator and denominator averaged separately and the ratio taken last (a
ratio of noisy estimates is biased; McCandlish et al. 2018). So the validation covers predict's own path. For comparison the exact value is
printed too (``--batch-bound-from exact`` predicts with it): at checkpoints along the trajectory (the trainer
is deterministic given its seed, so a run cut at e epochs is that trajectory's state at e) the sums
S₁ = Σᵢ‖gᵢ‖² and S₂ = ‖Σᵢgᵢ‖² over the whole training set (:func:`scalesgd.diversity.gradient_diversity`), and
n·ΣS₁/ΣS₂. Single checkpoints scatter widely (13 to 428 on cnn1d/mnist1d) and one checkpoint with a large
‖G‖² can dominate the sums (seed 1: 32.7, against 62.8 from the trainer's 1326 steps), so the exact value
from a handful of checkpoints is the less stable of the two.

Learning rate: constant across B by default (``--lr-rule``). With ``--lr-rule adascale`` the larger
batches get larger steps and need fewer passes than 1 + B/B_crit says with B_crit from n·Δ (on mnist1d
cnn1d the passes fit B_crit ≈ 190 against n·Δ ≈ 80–130): the lr rule is part of what B_crit means.

The machine is shared with other jobs: timings are noisy, and the load average is printed with each run.

    python bench/validate_perf_model.py                          # P in {1,2}, B in {32,128,512,2048}
    python bench/validate_perf_model.py --batch-sizes 32,256 --workers 1,2 --out /tmp/val
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scalesgd import perf_model as pm
from scalesgd.comm_registry import COMM_NAMES
from scalesgd.data import load_dataset
from scalesgd.diversity import gradient_diversity
from scalesgd.models import DEFAULT_WIDTH, MODELS, count_parameters
from scalesgd.config import parse_number_list
from scalesgd.predict import read_run
from scalesgd.rundata import RunData, passes_to_target

TPP_TARGET, TTA_TARGET = 0.20, 0.25
EVAL_EPOCHS = 1 / 8  # evaluation interval: the resolution of the measured passes


def _int_list(text: str) -> list[int]:
    try:
        return list(parse_number_list(text, int, minimum=1))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def train(run_dir: Path, *, workers: int, batch: int, epochs: float | None, args, eval_every: int | None,
          target: float | None, steps: int | None = None, diversity: str | None = None) -> tuple[dict, float]:
    """Run ``scalesgd train`` in a fresh process; return its summary and the wall seconds it took."""
    length = ["--steps", str(steps)] if steps is not None else ["--epochs", f"{epochs:g}"]
    cmd = [sys.executable, "-m", "scalesgd", "train", "--workers", str(workers), "--global-batch-size", str(batch),
           "--dataset", "mnist1d", "--model", args.model, *length, "--run-dir", str(run_dir),
           "--no-progress", "--threads-per-worker", "1", "--seed", str(args.seed), "--lr", str(args.lr),
           "--lr-rule", args.lr_rule, "--base-batch-size", str(args.base_batch_size),
           "--lr-schedule", "constant", "--batch-policy", "fixed", "--diversity", diversity or args.diversity,
           "--comm", args.comm]
    if target is not None:
        cmd += ["--target-accuracy", str(target)]
    if eval_every is not None:
        cmd += ["--eval-every", str(eval_every)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return RunData.open(run_dir).summary, time.perf_counter() - t0


def measured(run_dir: Path, n_train: int) -> dict:
    """Time per pass and time to accuracy on both clocks, from metrics.jsonl and summary.json."""
    run = RunData.open(run_dir)
    summary = run.summary
    if summary is None:
        raise SystemExit(f"{run_dir} has no summary.json: the run did not finish")
    steps, evals = run.steps, run.evals
    batch = steps[0]["global_batch_size"]
    warm = steps[3:] if len(steps) > 10 else steps  # the first steps allocate and warm the caches
    # mean, not median: on a shared host a step's all-reduce is bimodal (about 0.5 ms, or a ~4 ms scheduler
    # stall in a third to a half of the steps), so the median flips between modes while the mean adds up
    tpp_step = statistics.fmean(r["step_time_s"] for r in warm) * n_train / batch
    # eval-excluded wall time per pass, and the loop's own per-step time outside the labelled step
    first, last = warm[0], steps[-1]
    eval_between = sum(r["eval_s"] for r in evals if first["step"] <= r["step"] < last["step"])
    wall = last["time_s"] - first["time_s"] - eval_between
    tpp_wall = wall / (last["epoch"] - first["epoch"])
    later = [r for r in steps if first["step"] < r["step"] <= last["step"]]
    overhead = (wall - sum(r["step_time_s"] for r in later)) / max(len(later), 1)
    breakdown = {k: statistics.median(r[k] for r in warm) for k in ("compute_s", "comm_s", "update_s")}
    breakdown["comm_p10_s"] = float(np.percentile([r["comm_s"] for r in warm], 10))
    reached = summary.get("time_to_target_s") is not None
    passes = None
    tta_step = tta_median = tta_wall = None
    if reached:
        # every clock at the interpolated crossing (rundata.passes_to_target), like sweep and predict; the wall
        # clock excludes the evaluations done by then
        spent = 0.0
        for r in evals:
            spent += r["eval_s"]
            r["wall_excl_eval_s"] = r["time_s"] - spent
        hit = passes_to_target(evals, "test_accuracy", summary["target_accuracy"],
                               clocks=("step", "train_time_s", "wall_excl_eval_s"))
        passes = hit.passes
        tta_step = hit.clocks["train_time_s"]
        # the same with every step at the median step time: what remains once other jobs' bursts are removed
        tta_median = statistics.median(r["step_time_s"] for r in warm) * hit.clocks["step"]
        tta_wall = hit.clocks["wall_excl_eval_s"]
    return {"tpp_step": tpp_step, "tpp_wall": tpp_wall, "overhead_s": overhead, "passes": passes,
            "median_step_s": statistics.median(r["step_time_s"] for r in warm),
            "mean_step_s": statistics.fmean(r["step_time_s"] for r in warm),
            "breakdown": breakdown,
            "tta_step": tta_step, "tta_median": tta_median, "tta_wall": tta_wall, "steps": summary["steps"], "epochs": summary["epochs"]}


def verdict(pred: float, meas: float | None, target: float) -> tuple[str, str]:
    if meas is None:
        return "   n/a", "MISSED (target accuracy not reached)"
    err = (pred - meas) / meas
    return f"{err:+6.1%}", "MET" if abs(err) <= target else "MISSED"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=_int_list, default=[32, 128, 512, 2048])
    ap.add_argument("--workers", type=_int_list, default=[1, 2])
    ap.add_argument("--model", default="cnn1d")
    ap.add_argument("--target-accuracy", type=float, default=0.9)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--lr-rule", default="constant",
                    help="lr as B changes (default constant: sqrt/linear at lr 0.05 from B=32 diverge at B=2048)")
    ap.add_argument("--comm", default="allreduce", choices=COMM_NAMES,
                    help="communication strategy of every P > 1 run, profiles included (default: the built-in)")
    ap.add_argument("--diversity", default="off", choices=("off", "cheap", "exact"),
                    help="the trainer's diversity tap in every run (adascale needs it)")
    ap.add_argument("--base-batch-size", type=int, default=32)
    ap.add_argument("--batch-bound", type=float, default=None, help="B_S to use (default: measured, see above)")
    ap.add_argument("--batch-bound-from", default="run", choices=("run", "exact"),
                    help="run (default): what `scalesgd predict --from-run` takes, the trainer's own estimate "
                         "over the reference trajectory rerun with --diversity cheap; exact: n·ΣS₁/ΣS₂ at "
                         "checkpoints along that trajectory")
    ap.add_argument("--trajectory-points", type=int, default=16, help="checkpoints along the reference run for exact n·Δ")
    ap.add_argument("--max-epochs", type=float, default=80.0)
    ap.add_argument("--profile-steps", type=int, default=150, help="steps of each profile run")
    ap.add_argument("--profile-local-sizes", type=_int_list, default=[24, 96, 384, 1536],
                    help="local batch sizes of the profile runs (kept off the validated grid)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run directories go here (default: a temporary directory)")
    args = ap.parse_args(argv)

    batch_sizes = sorted(set(args.batch_sizes))
    worker_counts = sorted(set(args.workers))
    for p in worker_counts:
        if len({v * p for v in args.profile_local_sizes} - set(batch_sizes)) < 2:
            ap.error(f"--profile-local-sizes must give P={p} at least two global sizes (P x local) outside "
                     f"--batch-sizes to fit a step curve; pick sizes off the validated grid, e.g. 24,96,384,1536")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="validate-perf-"))
    if out.exists() and any(out.iterdir()):  # old runs there would be read as this validation's
        raise SystemExit(f"--out {out} is not empty; give a new or empty directory (or leave --out out)")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(f"machine: {os.cpu_count()} cores, shared with other jobs (load average now "
          f"{os.getloadavg()[0]:.1f}); timings are noisy. Runs in {out}; --comm {args.comm}")

    ds = load_dataset("mnist1d")
    width = DEFAULT_WIDTH[args.model]

    def fresh_model():
        torch.manual_seed(args.seed)
        return MODELS[args.model](input_shape=ds.input_shape, num_outputs=ds.num_outputs, width=width)

    grad_bytes = 4 * count_parameters(fresh_model())

    # 1. profile: short runs of the trainer itself (--steps) at batch sizes outside the validated grid, for
    # every P. A step's time is what the trainer labels (compute + all-reduce with the wait for the slowest
    # peer + update); on one host P workers share the cores, so at P > 1 that is only measurable in a
    # P-worker job, and the curve then carries the communication (the model gets a zero network there).
    # The loop's own per-step time (batch gather, logging) comes from the same runs, affine in B.
    compute_for, mean_for, network_for, overhead_for = {}, {}, {}, {}
    for p in worker_counts:
        points = []
        for hb in sorted(v * p for v in args.profile_local_sizes):
            if hb in batch_sizes:
                continue
            prof_dir = out / f"profile-P{p}-B{hb}"
            train(prof_dir, workers=p, batch=hb, epochs=None, steps=args.profile_steps, args=args, eval_every=None,
                  target=None)
            m = measured(prof_dir, ds.n_train)
            points.append((hb, m))
        local = [-(-hb // p) for hb, _ in points]
        compute_for[p] = pm.fit_compute(local, [m["median_step_s"] for _, m in points])
        mean_for[p] = pm.fit_compute(local, [m["mean_step_s"] for _, m in points])
        network_for[p] = pm.Network(0.0, 0.0, source="one worker" if p == 1 else f"inside the P={p} profile runs")
        bs = np.array([hb for hb, _ in points], dtype=float)
        ov = np.array([max(m["overhead_s"], 1e-6) for _, m in points])
        o0, o1 = pm.nonneg_lstsq(np.stack([np.ones_like(bs), bs], axis=1), ov)
        overhead_for[p] = (float(o0), float(o1))
        print(f"profile P={p} ({args.profile_steps} steps each): " + "; ".join(
            f"b={-(-hb // p)}: {m['median_step_s'] * 1e3:.2f} ms (compute {m['breakdown']['compute_s'] * 1e3:.2f}, "
            f"comm {m['breakdown']['comm_s'] * 1e3:.2f}), loop {m['overhead_s'] * 1e3:.2f} ms" for hb, m in points))
        print(f"  step curve (means): {mean_for[p].describe()}; loop: {o0 * 1e3:.3f} ms + B * {o1 * 1e6:.3f} us")

    # 2. the reference run: passes at the smallest batch on one worker
    ref_b = batch_sizes[0]
    ref_dir = out / f"P1-B{ref_b}"
    steps_per_epoch = ds.n_train / ref_b
    train(ref_dir, workers=1, batch=ref_b, epochs=args.max_epochs, args=args,
          eval_every=max(1, round(steps_per_epoch * EVAL_EPOCHS)), target=args.target_accuracy)
    ref = measured(ref_dir, ds.n_train)
    if ref["passes"] is None:
        raise SystemExit(f"the reference run (P=1, B={ref_b}) did not reach {args.target_accuracy}; "
                         "lower --target-accuracy or raise --max-epochs")
    print(f"reference P=1 B={ref_b}: {ref['passes']:.3g} passes to {args.target_accuracy} (eval every 1/8 pass)")

    # 3. B_S: the exact value along the reference trajectory, and the trainer's own estimate over it (what
    # `scalesgd predict --from-run` takes; a run of its own with the tap on, so the reference run's timings
    # stay tap-free -- the tap does not change the updates)
    sums = []
    k = args.trajectory_points
    for i in range(1, k + 1):
        d = ref_dir if i == k else out / f"traj-{i}"
        if i < k:
            train(d, workers=1, batch=ref_b, epochs=ref["passes"] * i / k, args=args, eval_every=None, target=None)
        model = fresh_model()
        model.load_state_dict(torch.load(d / "checkpoint.pt", weights_only=False)["model"])
        st = gradient_diversity(model, torch.nn.CrossEntropyLoss(), ds.x_train, ds.y_train, batch_size=2000)
        sums.append((st.sum_sq_norms, st.sum_grad_sq_norm))
    s1, s2 = np.array(sums).T
    values = ds.n_train * s1 / s2
    exact = float(ds.n_train * s1.sum() / s2.sum())
    print(f"exact n·ΣS₁/ΣS₂ over {k} points along the reference trajectory: {exact:.1f} (n·Δ at each: "
          f"{', '.join(f'{v:.0f}' for v in values)}; their median {np.median(values):.1f})")
    tap_dir = ref_dir if args.diversity != "off" else out / f"P1-B{ref_b}-tap"
    if tap_dir != ref_dir:
        train(tap_dir, workers=1, batch=ref_b, epochs=ref["passes"], args=args, eval_every=None, target=None,
              diversity="cheap")
    facts = read_run(tap_dir)
    if facts.batch_bound is not None:
        print(f"the trainer's own estimate over that trajectory (what predict --from-run takes): "
              f"{facts.batch_bound:.1f} ({facts.batch_bound_how})")
    if args.batch_bound is not None:
        batch_bound, how = args.batch_bound, "--batch-bound"
    elif args.batch_bound_from == "exact":
        batch_bound, how = exact, "--batch-bound-from exact"
    else:
        if facts.batch_bound is None:
            raise SystemExit(f"{tap_dir} logged no diversity estimates; cannot take B_S from the run")
        batch_bound, how = facts.batch_bound, "the trainer's estimate, --batch-bound-from run"
    batch_crit = pm.batch_crit_from_bound(batch_bound)
    passes_min = pm.passes_min_from_measurement(ref["passes"], ref_b, batch_crit)
    print(f"B_S = {batch_bound:.1f} ({how}); passes_min = {passes_min:.3g}")

    # 4. predict every configuration, then run it
    rows = []
    for p in worker_counts:
        for b in batch_sizes:
            if p > b:
                continue
            o0, o1 = overhead_for[p]
            kw = dict(network=network_for[p], grad_bytes=grad_bytes)
            pred_tpp = float(pm.time_per_pass(ds.n_train, b, p, compute=mean_for[p], **kw))
            pred_tpp_wall = float(pm.time_per_pass(ds.n_train, b, p, compute=mean_for[p], **kw,
                                                   overhead_s=o0 + o1 * b))
            pred_passes = float(pm.passes_to_accuracy(b, passes_min=passes_min, batch_crit=batch_crit))
            run_dir = out / f"P{p}-B{b}"
            if (p, b) != (1, ref_b):
                eval_epochs = max(EVAL_EPOCHS, pred_passes / 200)  # at most ~200 evaluations
                epochs = min(args.max_epochs, max(4 * pred_passes, 4.0))
                load0 = os.getloadavg()[0]
                train(run_dir, workers=p, batch=b, epochs=epochs, args=args,
                      eval_every=max(1, round(ds.n_train / b * eval_epochs)), target=args.target_accuracy)
                m = measured(run_dir, ds.n_train)
                m["load"] = (load0 + os.getloadavg()[0]) / 2
            else:
                m = dict(ref, load=float("nan"))
            rows.append((p, b, pred_tpp, pred_tpp_wall, pred_passes, m))
            bd = m["breakdown"]
            lb = int(pm.local_batch_size(b, p))
            print(f"    per step predicted {float(compute_for[p](lb)) * 1e3:.2f} ms (median), "
                  f"{float(mean_for[p](lb)) * 1e3:.2f} ms (mean) + loop {(o0 + o1 * b) * 1e3:.2f} ms; measured "
                  f"median compute {bd['compute_s'] * 1e3:.2f} + comm {bd['comm_s'] * 1e3:.2f} + update "
                  f"{bd['update_s'] * 1e3:.2f} ms, loop {m['overhead_s'] * 1e3:.2f} ms")
            print(f"  ran P={p} B={b}: {m['steps']} steps, {m['epochs']:.2f} passes, load ~{m['load']:.1f}",
                  flush=True)

    # 5. report
    print()
    print(f"{'P':>2} {'B':>5} {'quantity':<25} {'predicted':>10} {'measured':>10} {'error':>7}  verdict")
    print("-" * 78)
    n_met = n_all = 0
    for p, b, tpp, tpp_wall, passes, m in rows:
        calib = (p, b) == (1, ref_b)
        lines = [
            ("time/pass (step clock)", tpp, m["tpp_step"], TPP_TARGET),
            ("time/pass (wall, -eval)", tpp_wall, m["tpp_wall"], TPP_TARGET),
            ("passes to target", passes, m["passes"], None),
            ("time to acc (step)", tpp * passes, m["tta_step"], TTA_TARGET),
            ("time to acc (wall,-eval)", tpp_wall * passes, m["tta_wall"], TTA_TARGET),
        ]
        for name, pred, meas, target in lines:
            err, v = verdict(pred, meas, target if target is not None else 1.0)
            if target is None:
                v = "(calibration)" if calib else "(info)"
            elif calib and name.startswith(("time to acc", "time/pass (wall")):
                v += " (calibration run)"
            else:
                n_all += 1
                n_met += v == "MET"
            fmt = (lambda x: f"{x:.3g}") if name.startswith("passes") else pm.format_seconds
            print(f"{p:>2} {b:>5} {name:<25} {fmt(pred):>10} {fmt(meas) if meas is not None else 'n/a':>10} "
                  f"{err:>7}  {v}")
    print(f"\n{n_met}/{n_all} held-out comparisons MET (time/pass ±{TPP_TARGET:.0%}, time to accuracy "
          f"±{TTA_TARGET:.0%}); single seed, shared 2-core machine; {time.perf_counter() - t_start:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
