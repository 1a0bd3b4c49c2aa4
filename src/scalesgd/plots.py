"""One function per figure. Each takes already-read run data and an output path, writes a PNG, returns it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scalesgd.rundata import RunData  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def loss_and_accuracy(runs: Sequence[RunData], path: Path, *, x_axis: str) -> Path:
    """Training loss (smoothed) and test/train accuracy against ``x_axis`` ("step" or "time_s")."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        steps = run.steps
        if steps:
            x = np.array([r[x_axis] for r in steps], dtype=float)
            loss = np.array([np.nan if r["loss"] is None else r["loss"] for r in steps], dtype=float)
            window = max(1, len(loss) // 100)
            ax_loss.plot(x[window - 1:], _smooth(loss, window), label=run.label, lw=1.2)
        evals = run.evals
        if evals and evals[0].get("test_accuracy") is not None:
            x = [r[x_axis] for r in evals]
            line, = ax_acc.plot(x, [r["test_accuracy"] for r in evals], marker="o", ms=3,
                                label=f"{run.label} test")
            ax_acc.plot(x, [r["train_accuracy"] for r in evals], ls="--", color=line.get_color(),
                        label=f"{run.label} train")
        elif evals:
            ax_acc.plot([r[x_axis] for r in evals], [r["test_loss"] for r in evals], marker="o", ms=3,
                        label=f"{run.label} test loss")
    xlabel = "step" if x_axis == "step" else "wall time (s)"
    ax_loss.set(xlabel=xlabel, ylabel="training loss (batch mean)", yscale="log", title="loss")
    ax_acc.set(xlabel=xlabel, ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def time_breakdown(run: RunData, path: Path) -> Path:
    """Stacked bar per worker: median compute, waiting for the slowest peer, transfer, update per step."""
    b = run.time_breakdown()
    ranks = np.arange(len(b["compute_s"]))
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(ranks) + 2), 4))
    bottom = np.zeros(len(ranks))
    for key, label in (("compute_s", "compute (fwd+bwd)"), ("wait_s", "waiting for slowest peer"),
                       ("transfer_s", "all-reduce transfer"), ("update_s", "optimizer update")):
        values = np.asarray(b[key]) * 1e3
        ax.bar(ranks, values, bottom=bottom, label=label)
        bottom += values
    ax.set_xticks(ranks, [f"rank {r}" for r in ranks])
    ax.set(ylabel="median time per step (ms)", title=f"where the step time goes — {run.label}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def diversity_along_training(run: RunData, path: Path) -> Path:
    """Exact B_S(w) = n·Δ_S (markers) and the online estimate (line) against epochs, with the loss."""
    exact = [r for r in run.records if r.get("kind") == "diversity"]
    steps = run.steps
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if steps and "batch_bound_est" in steps[-1]:
        est = np.array([np.nan if r.get("batch_bound_est") is None else r["batch_bound_est"] for r in steps])
        ax.plot([r["epoch"] for r in steps], est, lw=1, alpha=0.8, label="online estimate n·Δ̂ (EMA)")
    if exact:
        ax.plot([r["epoch"] for r in exact], [r["batch_bound"] for r in exact], "o-", ms=4, color="k",
                label="exact B_S = n·Δ_S (whole training set)")
    ax.set(xlabel="epoch", ylabel="batch-size bound B_S", yscale="log",
           title=f"gradient diversity along training — {run.label}")
    ax.grid(alpha=0.3, which="both")
    if steps:
        ax2 = ax.twinx()
        loss = np.array([np.nan if r["loss"] is None else r["loss"] for r in steps], dtype=float)
        window = max(1, len(loss) // 100)
        ax2.plot([r["epoch"] for r in steps][window - 1:], _smooth(loss, window), color="tab:red", lw=1,
                 alpha=0.6, label="training loss")
        ax2.set(ylabel="training loss", yscale="log")
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)
