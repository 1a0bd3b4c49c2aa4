"""One function per figure. Each takes already-read run data and an output path, writes a PNG, returns it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scalesgd.rundata import RunData  # noqa: E402
from scalesgd.writer import atomic_path  # noqa: E402


def save_figure(fig, path: Path, *, dpi: int = 110) -> Path:
    """Lay out, write ``fig`` to ``path`` atomically (format from the suffix) and close it; returns ``path``."""
    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return path



def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def loss_points(run: RunData, x_axis: str) -> tuple[np.ndarray, np.ndarray]:
    """The training loss against ``x_axis`` ("step" or "time_s"), two float arrays of one length: one point
    per step, or for an asynchronous run (``--algorithm async-ps|hogwild``) one per applied update, put in
    order of the axis (they are written as they arrive; the workers' updates of one round share its step)."""
    points = run.steps or sorted(run.updates, key=lambda r: r[x_axis])
    x = np.array([r[x_axis] for r in points], dtype=float)
    loss = np.array([np.nan if r["loss"] is None else r["loss"] for r in points], dtype=float)
    return x, loss


def loss_and_accuracy(runs: Sequence[RunData], path: Path, *, x_axis: str,
                      labels: Sequence[str] | None = None) -> Path:
    """Training loss (smoothed) and test/train accuracy against ``x_axis`` ("step" or "time_s"); ``labels``
    name the runs in the legend (default: each run's own label)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run, label in zip(runs, labels or [run.label for run in runs]):
        x, loss = loss_points(run, x_axis)
        if len(x):
            window = max(1, len(loss) // 100)
            ax_loss.plot(x[window - 1:], _smooth(loss, window), label=label, lw=1.2)
        evals = run.evals
        if evals and evals[0].get("test_accuracy") is not None:
            x = [r[x_axis] for r in evals]
            line, = ax_acc.plot(x, [r["test_accuracy"] for r in evals], marker="o", ms=3,
                                label=f"{label} test")
            ax_acc.plot(x, [r["train_accuracy"] for r in evals], ls="--", color=line.get_color(),
                        label=f"{label} train")
        elif evals:
            ax_acc.plot([r[x_axis] for r in evals], [r["test_loss"] for r in evals], marker="o", ms=3,
                        label=f"{label} test loss")
    xlabel = "step" if x_axis == "step" else "wall time (s)"
    ax_loss.set(xlabel=xlabel, ylabel="training loss (batch mean)", yscale="log", title="loss")
    ax_acc.set(xlabel=xlabel, ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def time_breakdown(run: RunData, path: Path, *, label: str | None = None) -> Path:
    """Stacked bar per worker: median compute, waiting for the slowest peer, all-reduce transfer and optimizer
    update, each rank's own (runs whose metrics carry the last two for rank 0 only: hatched, rank 0's on every
    bar)."""
    b = run.time_breakdown()
    ranks = np.arange(len(b["compute_s"]))
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(ranks) + 2), 4))
    bottom = np.zeros(len(ranks))
    for key, name in (("compute_s", "compute (fwd+bwd)"), ("wait_s", "waiting for slowest peer")):
        values = np.asarray(b[key]) * 1e3
        ax.bar(ranks, values, bottom=bottom, label=name)
        bottom += values
    own = b["per_rank_comm"]
    for key, name in (("transfer_s", "all-reduce transfer"), ("update_s", "optimizer update")):
        values = np.asarray(b[key]) * 1e3
        ax.bar(ranks, values, bottom=bottom, label=name if own else f"{name} (rank 0's)",
               **({} if own else {"hatch": "//", "alpha": 0.8}))
        bottom += values
    ax.set_xticks(ranks, [f"rank {r}" for r in ranks])
    ax.set(ylabel="median time per step (ms)", title=f"where the step time goes — {label or run.label}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


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
    return save_figure(fig, path)


def allreduce_bench(rows: Sequence[dict], path: Path, *, stream_bytes_per_s: float | None = None,
                    fit_range: tuple[int, int] | None = None) -> Path:
    """``allreduce-bench`` at a glance, one column per world size: time against message size (markers:
    measured medians; dashed: the α–β model fitted at that P, where the bench fitted one; shaded: the sizes
    the model is judged on) and busbw against message size, with the loopback TCP stream rate as the ceiling."""
    world_sizes = sorted({r["world_size"] for r in rows})
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    colors = {name: f"C{i}" for i, name in enumerate(strategies)}
    fig, axes = plt.subplots(2, len(world_sizes), figsize=(5.5 * len(world_sizes), 8), squeeze=False, sharex=True)
    for col, p in enumerate(world_sizes):
        ax_t, ax_bw = axes[0, col], axes[1, col]
        for name in strategies:
            mine = sorted((r for r in rows if r["strategy"] == name and r["world_size"] == p),
                          key=lambda r: r["size_bytes"])
            if not mine:
                continue
            size = np.array([r["size_bytes"] for r in mine], dtype=float)
            ax_t.plot(size, [r["time_s"] * 1e6 for r in mine], "o-", ms=3, lw=1, color=colors[name], label=name)
            modelled = [r for r in mine if r.get("model_p_time_s") is not None]
            if modelled:
                ax_t.plot([r["size_bytes"] for r in modelled], [r["model_p_time_s"] * 1e6 for r in modelled],
                          "--", lw=1, color=colors[name], alpha=0.7)
            ax_bw.plot(size, [r["busbw_GBps"] for r in mine], "o-", ms=3, lw=1, color=colors[name], label=name)
        if fit_range:
            ax_t.axvspan(*fit_range, color="0.92", zorder=0, label="model judged here")
        if stream_bytes_per_s:
            ax_bw.axhline(stream_bytes_per_s / 1e9, color="k", ls=":", lw=1, label="loopback TCP stream")
        ax_t.set(xscale="log", yscale="log", ylabel="time per all-reduce (µs)",
                 title=f"P = {p}: measured (markers), α–β model fitted at P = {p} (dashed)")
        ax_bw.set(xscale="log", xlabel="message size (bytes)", ylabel="busbw (GB/s)", title=f"P = {p}: bus bandwidth")
        for ax in (ax_t, ax_bw):
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    return save_figure(fig, path)
