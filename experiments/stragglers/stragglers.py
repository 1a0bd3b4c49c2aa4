"""Delayed nodes: time to accuracy against straggler severity, with and without backup workers.

Command (from the repository root; 13 minutes on the shared 2-core machine at load 15–16, less idle; run it under
``nice``; writes report.md and two PNGs beside this file, and the run directories to a temporary directory)::

    nice -n 10 .venv/bin/python experiments/stragglers/stragglers.py

Workload: scikit-learn digits (1438 training images), the project's MLP, momentum SGD (0.9), constant lr 0.05,
weight decay 5e-4, through the parameter-server path (``--comm ps``, so that the only difference between with and
without the mitigation is the mitigation): global batch B = 192 on P = 2 and P = 3 workers (above the measured
B_S, about 100 here), and B = 48 on P = 2 (below it; severities none and ×4 only). Budget: 12 passes; target: 93%
test accuracy (interpolated between evaluations four times a pass). Seeds 0, 1, 2.

Severity (``--straggler``, reproducible from the seed): none; a fixed slow rank 1 taking 1.5×, 2× and 4× its
compute time; an exponential delay of mean 2 ms on every worker at every step. Mitigation: one backup worker
(``--backup-workers 1``: each step applies the first P − 1 gradients to reach rank 0, rescaled by P/(P − 1), and
drops the last; rank 0, the coordinator, is always among those used), against none (b = 0).

Measured per run: the mean step time (rank 0's clock), time to the target on the trainer's step clock, passes to
the target (examples drawn, B per step, over n: a backup step draws B but applies (P − b)/P of them), final test
accuracy, the exact B_S = n·Δ_S once a pass, and the step time the performance model predicts for b = 0 from the
undelayed run (:func:`scalesgd.perf_model.delayed_compute`: E[max over P of compute + delay]). Reported: the
mitigation's gain in step time, its cost in passes, and their product, the change in time to accuracy.

Expected (the committed run, made on the shared machine at load 15–16; see report.md): the passes depend on the
seed alone wherever the gradients used do not depend on timing (b = 0: the same at every severity, 8.51 ± 1.16
at B = 192; P = 2, b = 1: rank 0's half alone); one backup costs 1.05× the passes at B = 192, P = 2, about 1.0× at P = 3, and
1.30× at B = 48, P = 2 — more where the batch lies below B_S (the noise-scale form 1 + B_noise/B_used predicts the
order, 1.35×, 1.17×, 1.60×, but overstates each). Under that load the step times scatter by ±30–50% and the
load itself makes every rank a random straggler: a backup gains 1.9× in step time at P = 2 without any injected
delay and 2.4× at ×4 (P = 3: 0.85× and 1.6×); with 1.05× the passes it wins in time to accuracy wherever it gains
more than it costs (P = 2 and the ×4 rank at P = 3).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scalesgd import perf_model as pm  # noqa: E402
from scalesgd.config import RunConfig  # noqa: E402
from scalesgd.data import load_dataset  # noqa: E402
from scalesgd.run import train  # noqa: E402
from scalesgd.rundata import RunData, passes_to_target  # noqa: E402
from scalesgd.stragglers import parse_straggler  # noqa: E402

OUT = Path(__file__).resolve().parent
SEEDS = [0, 1, 2]
SEVERITIES = ["none", "rank1x1.5", "rank1x2", "rank1x4", "exp:mean=2ms"]
# (P, B, severities): B = 192 lies above the measured B_S (about 100 here), B = 48 well below it
SERIES = [(2, 192, SEVERITIES), (3, 192, SEVERITIES), (2, 48, ["none", "rank1x4"])]
BACKUPS = [0, 1]
TARGET = 0.93
EPOCHS = 12.0
EVALS_PER_EPOCH = 4
WARMUP_STEPS = 3


def run_one(root: Path, workers: int, batch: int, severity: str, backups: int, seed: int, n_train: int) -> dict:
    """Train one configuration and read back what the report needs."""
    run_dir = root / f"P{workers}-B{batch}-{severity.replace(':', '_')}-b{backups}-s{seed}"
    cfg = RunConfig(dataset="digits", model="mlp", global_batch_size=batch, lr=0.05, lr_schedule="constant",
                    momentum=0.9, diversity="off", workers=workers, comm="ps", backup_workers=backups,
                    straggler="" if severity == "none" else severity, epochs=EPOCHS,
                    eval_every=max(1, round(n_train / batch / EVALS_PER_EPOCH)),
                    exact_diversity_every=max(1, round(n_train / batch)), progress=False,
                    threads_per_worker=1, timeout_s=300, seed=seed, run_dir=str(run_dir))
    load0 = os.getloadavg()[0]
    summary = train(cfg)
    load = (load0 + os.getloadavg()[0]) / 2
    run = RunData.open(run_dir)
    hit = passes_to_target(run.evals, "test_accuracy", TARGET, clocks=("train_time_s",))
    steps = run.steps[WARMUP_STEPS:]
    to_target = [r["batch_bound"] for r in run.records
                 if r["kind"] == "diversity" and (hit is None or r["epoch"] <= hit.passes)]
    per_rank = [[r[f"compute_s_rank{k}"] for r in steps] for k in range(workers)]
    return {"P": workers, "B": batch, "severity": severity, "b": backups, "seed": seed,
            "passes": hit.passes if hit else None, "tta_s": hit.clocks["train_time_s"] if hit else None,
            "final_acc": summary["final_test_accuracy"], "load": load,
            "bs_to_target": float(np.median(to_target)) if to_target else float("nan"),
            "step_ms": statistics.fmean(r["step_time_s"] for r in steps) * 1e3,
            # the undelayed run's parts, for the model's prediction of the delayed ones
            "compute_rank_s": [statistics.fmean(c) for c in per_rank],
            "compute_max_s": statistics.fmean(max(cs) for cs in zip(*per_rank)),
            "comm_s": statistics.fmean(max(r["comm_s"] - r["wait_s"], 0.0) for r in steps),
            "update_s": statistics.fmean(r["update_s"] for r in steps)}


def predicted_step_ms(base: list[dict], severity: str, workers: int) -> float:
    """perf_model's step time for b = 0 from the undelayed runs (seed-mean of their parts)."""
    spec = parse_straggler(severity)
    comm = statistics.fmean(r["comm_s"] for r in base)
    update = statistics.fmean(r["update_s"] for r in base)
    if spec is not None and spec.kind == "slow":  # the slow rank's own compute, multiplied
        compute = statistics.fmean(r["compute_rank_s"][spec.rank] for r in base)
        other = statistics.fmean(max(c for k, c in enumerate(r["compute_rank_s"]) if k != spec.rank) for r in base)
        return (max(float(pm.delayed_compute(compute, workers, straggler=spec)), other) + comm + update) * 1e3
    compute = statistics.fmean(r["compute_max_s"] for r in base)
    return (float(pm.delayed_compute(compute, workers, straggler=spec)) + comm + update) * 1e3


def mean_std(values) -> tuple[float, float]:
    if not values or any(v is None for v in values):
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def fmt(values, scale: float = 1.0, digits: int = 2) -> str:
    missing = sum(v is None for v in values)
    if missing:
        return f"{missing}/{len(values)} missed"
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def noise_scale_cost(batch: int, used: float, batch_bound: float) -> float:
    """Passes (examples drawn) with a backup over those without, if progress per step followed the noise scale:
    steps to a target ∝ 1 + B_noise/B_used (McCandlish et al. 2018), B_noise = B_S − 1, and a backup step draws B
    but applies B_used = (P − b)/P·B."""
    b_noise = batch_bound - 1
    return (1 + b_noise / used) / (1 + b_noise / batch)


def main() -> int:
    start = time.perf_counter()
    n_train = load_dataset("digits").n_train
    rows = []
    with tempfile.TemporaryDirectory(prefix="stragglers-") as tmp:
        for seed in SEEDS:  # seeds outermost: a change of the machine's load falls on every configuration alike
            for p, batch, severities in SERIES:
                for severity in severities:
                    for b in BACKUPS:
                        r = run_one(Path(tmp), p, batch, severity, b, seed, n_train)
                        rows.append(r)
                        print(f"P={p} B={batch} {severity:<13} b={b} seed {seed}: step {r['step_ms']:.2f} ms, "
                              f"passes {r['passes']}, time {r['tta_s']}, final {r['final_acc']:.4f}", flush=True)
    elapsed = time.perf_counter() - start

    def cell(p, batch, severity, b):
        return [r for r in rows if r["P"] == p and r["B"] == batch and r["severity"] == severity and r["b"] == b]

    def mean(p, batch, severity, b, key):
        return mean_std([r[key] for r in cell(p, batch, severity, b)])[0]

    lines = ["# Stragglers: time to accuracy against severity, with and without a backup worker: generated report",
             "", f"Generated by `experiments/stragglers/stragglers.py` in {elapsed:.0f} s. digits, MLP, lr 0.05 "
             f"constant, momentum 0.9, `--comm ps`, budget {EPOCHS:g} passes, target {TARGET:.0%} test accuracy; "
             f"mean ± std over seeds {SEEDS}. Step time on rank 0's clock; time to target on the trainer's step "
             "clock; passes count the examples drawn (B per step; a backup step applies (P − 1)/P of them). 'model' "
             "is perf_model's step time for b = 0 predicted from the undelayed b = 0 runs. B_S = n·Δ_S exact over the "
             "training set once a pass, its median before the target; 'noise-scale cost' is what the passes cost of "
             "a backup would be if steps to the target followed 1 + B_noise/B_used (B_noise = B_S − 1 of the b = 0 "
             "runs); "
             "load: the machine's 1-minute load average.", "",
             "| P | B | straggler | b | step (ms) | model (ms) | time to target (s) | passes to target | final test acc "
             "| B_S to target | load | backup: step-time gain | backup: passes cost (noise-scale cost) | "
             "backup: time to target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p, batch, severities in SERIES:
        base = cell(p, batch, "none", 0)
        for severity in severities:
            for b in BACKUPS:
                c = cell(p, batch, severity, b)
                model = f"{predicted_step_ms(base, severity, p):.2f}" if b == 0 else ""
                gain = cost = net = ""
                if b > 0:
                    s0, s1 = mean(p, batch, severity, 0, "step_ms"), mean(p, batch, severity, b, "step_ms")
                    p0, p1 = mean(p, batch, severity, 0, "passes"), mean(p, batch, severity, b, "passes")
                    t0, t1 = mean(p, batch, severity, 0, "tta_s"), mean(p, batch, severity, b, "tta_s")
                    theory = noise_scale_cost(batch, batch * (p - b) / p, mean(p, batch, severity, 0, "bs_to_target"))
                    gain, cost, net = f"{s0 / s1:.2f}×", f"{p1 / p0:.2f}× ({theory:.2f}×)", f"{t0 / t1:.2f}× faster"
                lines.append(f"| {p} | {batch} | {severity} | {b} | {fmt([r['step_ms'] for r in c])} | {model} | "
                             f"{fmt([r['tta_s'] for r in c])} | {fmt([r['passes'] for r in c])} | "
                             f"{fmt([r['final_acc'] for r in c], 100, 1)}% | "
                             f"{fmt([r['bs_to_target'] for r in c], 1, 0)} | {np.mean([r['load'] for r in c]):.1f} | "
                             f"{gain} | {cost} | {net} |")
    lines += ["", "![time to accuracy against severity](tta_vs_severity.png)",
              "![the backup's trade](backup_trade.png)", ""]
    (OUT / "report.md").write_text("\n".join(lines))

    xs = np.arange(len(SEVERITIES))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, ylabel in zip(axes, ("step_ms", "tta_s", "passes"),
                               ("mean step time (ms)", "time to target (s, step clock)", "passes to target")):
        for i, (p, batch, severities) in enumerate(SERIES):
            for b in BACKUPS:
                at = [SEVERITIES.index(s) for s in severities]
                ms = [mean_std([r[key] for r in cell(p, batch, s, b)]) for s in severities]
                ax.errorbar(xs[at] + 0.05 * (2 * i + b), [m for m, _ in ms], yerr=[s for _, s in ms], marker="o",
                            capsize=3, color=f"C{i}", ls="-" if b == 0 else "--", label=f"P={p}, B={batch}, b={b}")
        ax.set_xticks(xs, SEVERITIES, rotation=20)
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.suptitle("stragglers on digits/MLP, --comm ps: solid no backup, dashed one backup worker")
    fig.tight_layout()
    fig.savefig(OUT / "tta_vs_severity.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (p, batch, severities) in enumerate(SERIES):
        for s in severities:
            gain = mean(p, batch, s, 0, "step_ms") / mean(p, batch, s, 1, "step_ms")
            cost = mean(p, batch, s, 1, "passes") / mean(p, batch, s, 0, "passes")
            ax.scatter(cost, gain, color=f"C{i}", marker="osD^v"[SEVERITIES.index(s)], label=f"P={p} B={batch} {s}")
    top = max(ax.get_xlim()[1], ax.get_ylim()[1]) * 1.05
    ax.plot([0.5, top], [0.5, top], "k:", label="break-even (gain = cost)")
    ax.set_xlabel("cost: passes to target with / without the backup")
    ax.set_ylabel("gain: step time without / with the backup")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(OUT / "backup_trade.png", dpi=110)
    plt.close(fig)
    print(f"wrote {OUT / 'report.md'} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
