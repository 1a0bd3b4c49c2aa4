"""Figures of ``scalesgd sweep``: one function per figure, each writes a PNG and returns its path.

They take already-aggregated curves (:class:`Curve`), not run directories: :mod:`scalesgd.sweep.report`
reads the runs' outcomes and computes mean ± std over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.transforms  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scalesgd.plots import save_figure  # noqa: E402


@dataclass(frozen=True)
class Curve:
    """One series (a replication factor r and worker count P) against the global batch size.

    ``mean``/``std`` are over the seeds that reached the target (NaN where none did); ``missed`` holds, per
    batch size, the lower bound to draw where at least one seed missed (the budget), else NaN.
    ``bound`` is (B_S, low, high) of the series' measured diversity bound, or None. ``diverged`` counts, per
    batch size, the seeds whose run diverged (of ``seeds``); empty when not tracked.
    """

    label: str
    batch_sizes: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    missed: tuple[float, ...] = ()
    bound: tuple[float, float, float] | None = None
    diverged: tuple[int, ...] = ()
    seeds: int = 0


def _draw(ax, curves: Sequence[Curve], *, bounds: bool) -> None:
    missed_labelled = False
    for i, c in enumerate(curves):
        color = f"C{i % 10}"
        b = np.asarray(c.batch_sizes, dtype=float)
        mean, std = np.asarray(c.mean, dtype=float), np.asarray(c.std, dtype=float)
        ax.errorbar(b, mean, yerr=std, marker="o", ms=4, capsize=3, color=color, label=c.label)
        if c.missed:
            miss = np.asarray(c.missed, dtype=float)
            ok = np.isfinite(miss)
            if ok.any():
                ax.plot(b[ok], miss[ok], ls="none", marker="^", ms=8, mfc="none", color=color,
                        label=None if missed_labelled else "missed the target (seeds at the budget: lower bound)")
                missed_labelled = True
        if bounds and c.bound is not None and math.isfinite(c.bound[0]):
            bs, lo, hi = c.bound
            ax.axvline(bs, color=color, ls="--", lw=1)
            if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
                ax.axvspan(lo, hi, color=color, alpha=0.08)
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3, which="both")


def _plain_log_y(ax) -> None:
    """Label a log y axis with plain numbers (0.2, 3, 40) rather than 2×10⁻¹; minor ticks get labels only when
    the axis spans about a decade or less (else they crowd)."""
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    low, high = ax.get_ylim()
    wide = low > 0 and math.log10(high / low) > 1.2
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter() if wide else fmt)


def _curve_figure(curves: Sequence[Curve], path: Path, *, bounds: bool, xlabel: str, ylabel: str, title: str,
                  legend_loc: str) -> Path:
    """One of the sweep's three figures: every curve against B on log-log axes, saved to ``path``."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _draw(ax, curves, bounds=bounds)
    ax.set(xlabel=xlabel, ylabel=ylabel, yscale="log", title=title)
    _plain_log_y(ax)
    ax.legend(fontsize=8, loc=legend_loc)
    return save_figure(fig, path)


def time_per_pass(curves: Sequence[Curve], path: Path) -> Path:
    """(a) Training time per pass over the data (evaluation excluded) against B, mean ± std over seeds."""
    return _curve_figure(curves, path, bounds=False, xlabel="global batch size B",
                         ylabel="training time per pass (s)", title="(a) time per pass", legend_loc="best")


def passes_to_target(curves: Sequence[Curve], path: Path, *, target: str) -> Path:
    """(b) Passes to the target against B, mean ± std over seeds; dashed lines: the measured B_S."""
    return _curve_figure(curves, path, bounds=True, xlabel="global batch size B (dashed: measured B_S)",
                         ylabel=f"passes to {target}", title="(b) passes to the target", legend_loc="upper left")


def time_to_target(curves: Sequence[Curve], path: Path, *, target: str) -> Path:
    """(c) Training time to the target against B (= (a) × (b) per run), mean ± std; dashed: B_S."""
    return _curve_figure(curves, path, bounds=True, xlabel="global batch size B (dashed: measured B_S)",
                         ylabel=f"training time to {target} (s)", title="(c) time to the target",
                         legend_loc="best")


def final_accuracy(curves: Sequence[Curve], path: Path, *, budget: float, at_target: bool) -> Path:
    """(d) Final test accuracy against B (linear y), mean ± std over the seeds that finished; a cross on the
    bottom edge, labelled k/N, where k of a curve's N seeds diverged (those have no final accuracy)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _draw(ax, curves, bounds=True)
    marked = False
    bottom = matplotlib.transforms.blended_transform_factory(ax.transData, ax.transAxes)
    for i, c in enumerate(curves):
        for j, (b, k) in enumerate(zip(c.batch_sizes, c.diverged)):
            if k:
                ax.plot([b], [0.03 + 0.05 * i], marker="x", ms=8, color=f"C{i % 10}", ls="none", transform=bottom,
                        label=None if marked else "seeds diverged (k/N), no final accuracy")
                ax.annotate(f"{k}/{c.seeds}", (b, 0.03 + 0.05 * i), xycoords=bottom, fontsize=7, xytext=(5, -3),
                            textcoords="offset points", color=f"C{i % 10}")
                marked = True
    when = "at the target or the budget" if at_target else f"after the budget of {budget:g} passes"
    ax.set(xlabel="global batch size B (dashed: measured B_S)", ylabel=f"final test accuracy ({when})",
           title="(d) final test accuracy")
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def ratio_vs_replicate(replicates: Sequence[float], ratio_mean: Sequence[float], ratio_std: Sequence[float],
                       bounds: dict[str, Sequence[float]], path: Path, *, b_small: int, b_large: int,
                       lower_bound: Sequence[bool] = ()) -> Path:
    """Passes at the largest B over passes at the smallest, against the replication factor r (left), and the
    measured B_S against r (right), one line per way of measuring it (``bounds``: label → value per r)."""
    fig, (ax, ax_b) = plt.subplots(1, 2, figsize=(10, 4))
    r = np.asarray(replicates, dtype=float)
    ax.errorbar(r, ratio_mean, yerr=ratio_std, marker="o", capsize=3)
    for x, y, lb in zip(r, ratio_mean, lower_bound or [False] * len(r)):
        if lb:
            ax.annotate("≥ (missed at the budget)", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="replication r (n/r distinct examples)", ylabel=f"passes(B={b_large}) / passes(B={b_small})",
           title="passes ratio, largest / smallest batch")
    for i, (label, values) in enumerate(bounds.items()):
        ax_b.plot(r, values, marker="s", color=f"C{i + 1}", label=label)
    ax_b.set(xlabel="replication r", ylabel="measured B_S", title="diversity bound B_S", ylim=(0, None))
    ax_b.legend(fontsize=8)
    for a in (ax, ax_b):
        a.set_xscale("log", base=2)
        a.set_xticks(r, [f"{v:g}" for v in r])
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.grid(alpha=0.3, which="both")
    return save_figure(fig, path)
