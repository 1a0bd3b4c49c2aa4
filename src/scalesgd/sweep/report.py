"""The sweep's report: mean ± std over seeds per (r, P, B), the measured diversity bound, tables and figures.

Reads only the :class:`~scalesgd.sweep.runner.SweepResult` of a sweep (itself read from run directories).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

import scalesgd.sweep.plots as sweep_plots
from scalesgd.sweep.runner import Outcome, SweepResult, describe
from scalesgd.sweep.spec import Group, SweepSpec, tuning_group_key
from scalesgd.writer import write_atomic

# Seeds of one point whose time per pass differ by more than this factor are flagged in the report.
SEED_TIME_SPREAD_FLAG = 3.0


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value; NaN for none)."""
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0


@dataclass(frozen=True)
class Row:
    """One (r, P, B, variant) at its chosen lr, aggregated over seeds."""

    group: Group
    lr: float
    outcomes: tuple[Outcome, ...]

    @property
    def done(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "done"]

    @property
    def reached(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.reached]

    @property
    def all_reached(self) -> bool:
        return len(self.reached) == len(self.outcomes) and bool(self.outcomes)

    @property
    def diverged(self) -> int:
        return sum(o.status == "diverged" for o in self.outcomes)

    def stat(self, name: str) -> tuple[float, float]:
        """Mean ± std of an :class:`Outcome` figure: over the finished seeds for the time per pass and the final
        test accuracy, over the seeds that reached the target for the figures at the target."""
        pool = self.done if name in ("time_per_pass_s", "final_test_accuracy") else self.reached
        return _mean_std([getattr(o, name) for o in pool])

    def time_spread(self) -> float:
        """Slowest over fastest time per pass among the finished seeds (1 with fewer than two): the seeds
        train the same number of examples at the same B, so a large spread is the machine's, not the run's."""
        v = [o.time_per_pass_s for o in self.done if math.isfinite(o.time_per_pass_s) and o.time_per_pass_s > 0]
        return max(v) / min(v) if len(v) > 1 else 1.0

    def lower_bound(self, name: str) -> float:
        """Where some seed missed: the mean over seeds with the budget (passes or time trained) for the missed
        ones, a lower bound of the true mean; NaN when every seed reached the target."""
        if self.all_reached or not self.done:
            return math.nan
        full = "epochs" if name == "passes_to_target" else "train_time_s"
        return statistics.fmean(getattr(o, name) if o.reached else getattr(o, full) for o in self.done)


def rows_by_series(result: SweepResult) -> dict[tuple[int, int, str], list[Row]]:
    """Rows per (r, P, variant) series, by ascending B; groups without a chosen lr (unfinished tuning) or
    without seeds of their own (the tune_batch group) are left out."""
    series: dict[tuple[int, int, str], list[Row]] = {}
    for g in result.groups:
        lr = result.chosen_lr.get(g.key)
        if lr is None or not g.seeds:
            continue
        series.setdefault(g.series, []).append(Row(g, lr, tuple(result.final(g))))
    return series


@dataclass(frozen=True)
class SeriesBound:
    """The measured B_S of a series: online (median and quartiles of the estimates pooled over the smallest
    batch's seeds, first ``bound_epochs``; and the median until the target) and exact at initialisation."""

    online: tuple[float, float, float]  # median, 25th, 75th percentile
    online_to_target: tuple[float, float, float]
    init: tuple[float, float]  # mean, std over seeds

    def marked(self, mode: str) -> tuple[float, float, float] | None:
        """(B_S, low, high) of the bound ``mode`` marks on the figures, or None when it was not measured."""
        if mode in ("online", "online-to-target"):
            values = self.online if mode == "online" else self.online_to_target
            return values if math.isfinite(values[0]) else None
        if math.isfinite(self.init[0]):
            return (self.init[0], self.init[0] - self.init[1], self.init[0] + self.init[1])
        return None


def series_bound(result: SweepResult, rows: Sequence[Row]) -> SeriesBound:
    first = [v for o in rows[0].outcomes for v in o.bound_first]
    to_target = [v for o in rows[0].outcomes for v in o.bound_to_target]
    r = rows[0].group.replicate
    init = _mean_std([result.init_bounds.get((r, s), math.nan) for s in result.spec.seeds])
    return SeriesBound(_quartiles(first), _quartiles(to_target), init)


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if not values:
        return (math.nan,) * 3
    median, low, high = np.percentile(values, [50, 25, 75])
    return float(median), float(low), float(high)


def passes_ratio(small: Row, large: Row) -> tuple[float, float, bool]:
    """passes(largest B) / passes(smallest B), mean ± std over seeds paired by seed; the flag says a seed
    missed at the largest B and its ratio used the budget (so the mean is a lower bound)."""
    by_seed = {o.point.seed: o for o in small.outcomes if o.reached}
    ratios, lower = [], False
    for o in large.done:
        if o.point.seed not in by_seed:
            continue
        if o.reached:
            ratios.append(o.passes_to_target / by_seed[o.point.seed].passes_to_target)
        else:
            ratios.append(o.epochs / by_seed[o.point.seed].passes_to_target)
            lower = True
    mean, std = _mean_std(ratios)
    return mean, std, lower


def _iqr(q: tuple[float, float, float]) -> str:
    return f"{q[0]:.1f} [{q[1]:.1f}, {q[2]:.1f}]" if math.isfinite(q[0]) else "—"


def _pm(ms: tuple[float, float], spec: str | None = None) -> str:
    """``mean ± std``; by default the mean to 3 significant digits and the std to the same decimals."""
    mean, std = ms
    if not math.isfinite(mean):
        return "—"
    if spec is None:
        decimals = max(0, 2 - math.floor(math.log10(abs(mean)))) if mean else 3
        spec = f".{decimals}f"
    return f"{mean:{spec}} ± {std:{spec}}"


def _series_label(spec: SweepSpec, key: tuple[int, int, str]) -> str:
    r, p, variant = key
    parts = [variant] if variant else []
    if len(spec.replicates) > 1 or r != 1:
        parts.append(f"r={r:g}")
    if len(spec.workers) > 1 or p != 1:
        parts.append(f"P={p}")
    return ", ".join(parts) or "B sweep"


def _curves(spec: SweepSpec, series: dict[tuple[int, int, str], list[Row]], bounds: dict, name: str):
    curves = []
    for key, rows in series.items():
        stats = [row.stat(name) for row in rows]
        at_target = name not in ("time_per_pass_s", "final_test_accuracy")
        missed = tuple(row.lower_bound(name) for row in rows) if at_target else ()
        curves.append(sweep_plots.Curve(label=_series_label(spec, key), batch_sizes=tuple(r.group.global_batch_size for r in rows),
                            mean=tuple(m for m, _ in stats), std=tuple(s for _, s in stats), missed=missed,
                            bound=bounds[key].marked(spec.bound),
                            diverged=tuple(row.diverged for row in rows), seeds=len(spec.seeds)))
    return curves


def write_report(result: SweepResult, out_dir: Path) -> Path:
    """Write ``report.md`` with the three time-to-accuracy figures (and the ratio against r when the sweep
    replicates data) into ``out_dir``; returns its path. Written via a temporary name."""
    spec = result.spec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = rows_by_series(result)
    bounds = {key: series_bound(result, rows) for key, rows in series.items()}
    target = f"{spec.target_metric.replace('_', ' ')} {spec.target:g}"
    lines = [f"# Sweep `{spec.name}`: time to accuracy against the batch size", ""]
    lines += _method_lines(result)
    if not series:
        lines += ["No finished runs yet.", ""]
    else:
        sweep_plots.time_per_pass(_curves(spec, series, bounds, "time_per_pass_s"), out_dir / "time_per_pass.png")
        sweep_plots.passes_to_target(_curves(spec, series, bounds, "passes_to_target"),
                                     out_dir / "passes_to_target.png", target=target)
        sweep_plots.time_to_target(_curves(spec, series, bounds, "time_to_target_s"),
                                   out_dir / "time_to_target.png", target=target)
        sweep_plots.final_accuracy(_curves(spec, series, bounds, "final_test_accuracy"),
                                   out_dir / "final_accuracy.png", budget=spec.base.epochs,
                                   at_target=spec.stop_at_target)
        lines += ["## Time to accuracy = time per pass × passes", "",
                  "![(a) time per pass](time_per_pass.png) ![(b) passes to the target](passes_to_target.png)",
                  "", "![(c) time to the target](time_to_target.png) ![(d) final test accuracy](final_accuracy.png)",
                  ""]
        lines += _bound_lines(result, series, bounds, out_dir)
        lines += _side_by_side_lines(spec, series)
        for key, rows in series.items():
            lines += _table_lines(result, key, rows)
    final = {o.point for g in result.groups for o in result.final(g)}
    missed = sorted((o for o in result.outcomes.values() if o.status in ("done", "diverged") and not o.reached),
                    key=lambda o: o.point)
    if missed:
        lines += ["## Runs that missed the target", ""]
        in_tables = [o for o in missed if o.point in final]
        tuning = [o for o in missed if o.point not in final]
        if in_tables:
            lines += ["At the chosen lr (counted in the tables as *k/N reached*; the figures draw a hollow "
                      "triangle at the budget):", ""]
            lines += [f"- `{o.point.name}`: {describe(o, spec)}" for o in in_tables] + [""]
        if tuning:
            lines += ["lr-tuning runs at a learning rate that lost (not in the tables):", ""]
            lines += [f"- `{o.point.name}`: {describe(o, spec)}" for o in tuning] + [""]
    not_run = [o for o in result.outcomes.values() if o.status == "missing"]
    if not_run:
        lines += [f"{len(not_run)} point(s) have not run yet (`--report-only` on an unfinished sweep).", ""]
    path = out_dir / "report.md"
    write_atomic(path, "\n".join(lines))
    return path


def _method_lines(result: SweepResult) -> list[str]:
    spec, base = result.spec, result.spec.base
    seeds = ", ".join(map(str, spec.seeds))
    if spec.tuned:
        on = f"seed {spec.seeds[0]}" if spec.tune == "first-seed" else "all seeds"
        where = (f"once per (P, r) at **B = {spec.tune_batch}** on [base]" if spec.tune_batch is not None
                 else "per (B, P, r" + (", variant)" if spec.variants else ")"))
        lr = (f"**tuned** {where} over {{{', '.join(f'{v:g}' for v in spec.lrs)}}}: the lr with the fewest mean "
              f"passes to the target on {on} wins (fewer seeds missing the target first, ties by time); "
              + ("every batch size and variant then runs at that one lr" if spec.tune_batch is not None
                 else "the other seeds then run at the winner"))
    else:
        lr = f"**{spec.lrs[0]:g}**, not tuned"
    if not spec.variants and base.effective_lr_rule != "constant":
        lr += (f"; the trainer's **{base.effective_lr_rule}** rule scales it with B from B0 = "
               f"{base.base_batch_size or 'each run' + chr(39) + 's own B'}")
    lr += f"; base schedule {base.lr_schedule}"
    evals = (f"every {base.eval_every} steps" if base.eval_every is not None
             else f"about {spec.evals_per_epoch:g} per pass (eval_every = round(n / (B · {spec.evals_per_epoch:g})))")
    window = (f"the first {spec.bound_epochs:g} epoch(s)" if spec.bound == "online"
              else "the start until the target (the whole path to the same accuracy)")
    bound = (f"online: median of the trainer's `batch_bound_est` (EMA of ‖G‖² and tr Σ, --diversity "
             f"{base.diversity}) over the steps from {window} of the smallest batch's runs, pooled over seeds; "
             "the band is the interquartile range" if spec.bound != "init" else
             "exact B_S = n·Δ_S over the whole training set at the initial weights (mean ± std over seeds; band ± std)")
    taps = {cfg.diversity for _, cfg in spec.series_configs()}
    tap = (base.diversity if len(taps) == 1 and base.diversity in taps else
           ", ".join(f"{v.base.diversity} ({v.name})" for v in spec.variants))
    variants = ([f"- series (variants of [base], one curve each): " + "; ".join(v.describe() for v in spec.variants)
                 + (f"; lr rules from B0 = {base.base_batch_size}" if base.base_batch_size else "") + "."]
                if spec.variants else [])
    rows = variants + [
        f"- data set `{base.dataset}`" + (f" (n_train {result.n_train})" if result.n_train else "") +
        f", model `{base.model}`, momentum {base.momentum:g}, weight decay {base.weight_decay:g}; budget "
        f"{base.epochs:g} passes per run; seeds {seeds} (mean ± sample std over seeds).",
        f"- learning rate: {lr}.",
        f"- target: **{spec.target_metric} ≥ {spec.target:g}**" +
        ("" if spec.target_metric == "test_accuracy" else
         f" (measured on {min(base.eval_train_examples, result.n_train or base.eval_train_examples)} training "
         "examples at each evaluation)") +
        ("; the trainer stops there (final test accuracy is at the stop)." if spec.stop_at_target else
         "; every run trains the whole budget (final test accuracy is the budget's)."),
        f"- passes to target: epoch at which the metric first reaches the target, linearly interpolated between "
        f"the evaluation below and the first at or above it; evaluations {evals}.",
        "- time per pass = training time / passes trained (evaluation excluded; includes the diversity tap "
        f"--diversity {tap}); time to target = training time at the target, interpolated the same way.",
        f"- B_S marked on (b), (c) and (d): {bound}.",
        "",
    ]
    return rows


def _bound_lines(result, series, bounds, out_dir: Path) -> list[str]:
    spec = result.spec
    b_small, b_large = min(spec.batch_sizes), max(spec.batch_sizes)
    lines = ["## Diversity bound and the passes ratio", "",
             f"| series | B_S online, first {spec.bound_epochs:g} epoch(s) [IQR] | B_S online, until the target [IQR] | "
             f"B_S exact at init | passes(B={b_large}) / passes(B={b_small}) |", "|---|---|---|---|---|"]
    ratio_r, ratio_m, ratio_s, ratio_lb = [], [], [], []
    bound_r: dict[str, list[float]] = {}
    for key, rows in series.items():
        sb = bounds[key]
        small = next((r for r in rows if r.group.global_batch_size == b_small), None)
        large = next((r for r in rows if r.group.global_batch_size == b_large), None)
        mean = std = math.nan
        lower = False
        if small is not None and large is not None:
            mean, std, lower = passes_ratio(small, large)
        online, to_target = _iqr(sb.online), _iqr(sb.online_to_target)
        ratio = ("≥ " if lower else "") + _pm((mean, std), ".2f")
        lines.append(f"| {_series_label(spec, key)} | {online} | {to_target} | {_pm(sb.init, '.1f')} | {ratio} |")
        if key[1] == min(spec.workers) and key[2] == spec.variant_names[0]:
            ratio_r.append(key[0])
            ratio_m.append(mean)
            ratio_s.append(std)
            ratio_lb.append(lower)
            for mode, label in (("online-to-target", f"online, until the target (B={b_small})"),
                                ("online", f"online, first {spec.bound_epochs:g} epoch(s) (B={b_small})"),
                                ("init", "exact, at initialisation")):
                marked = sb.marked(mode)
                bound_r.setdefault(label + (" — marked" if mode == spec.bound else ""), []).append(
                    marked[0] if marked else math.nan)
    lines += ["", "The ratio is taken per seed (same seed at both batch sizes) and then averaged; ≥ means some "
              "seed missed the target at the largest batch and its ratio used the budget.", ""]
    if len(ratio_r) > 1:
        measured = {label: values for label, values in bound_r.items()
                    if any(math.isfinite(v) for v in values)}
        sweep_plots.ratio_vs_replicate(ratio_r, ratio_m, ratio_s, measured, out_dir / "ratio_vs_replicate.png",
                                       b_small=b_small, b_large=b_large, lower_bound=ratio_lb)
        lines += ["![passes ratio and B_S against r](ratio_vs_replicate.png)", ""]
    return lines


def _side_by_side_lines(spec: SweepSpec, series: dict[tuple[int, int, str], list[Row]]) -> list[str]:
    """With several series: final test accuracy and passes to the target, one column per series, one line per B."""
    if len(series) < 2:
        return []
    by_b = {key: {row.group.global_batch_size: row for row in rows} for key, rows in series.items()}
    head = ["| B | " + " | ".join(_series_label(spec, key) for key in series) + " |", "|---|" + "---|" * len(series)]

    def table(cell) -> list[str]:
        return head + [f"| {b} | " + " | ".join(cell(by_b[key].get(b)) for key in series) + " |"
                       for b in sorted(spec.batch_sizes)]

    def note(row: Row) -> str:
        parts = [f"{len(row.reached)}/{len(row.outcomes)} reached"] if not row.all_reached else []
        parts += [f"{row.diverged} diverged"] if row.diverged else []
        not_run = sum(o.status == "missing" for o in row.outcomes)
        parts += [f"{not_run} not run yet"] if not_run else []
        return f" ({', '.join(parts)})" if parts else ""

    def accuracy(row: Row | None) -> str:
        if row is None:
            return ""
        return _pm(row.stat("final_test_accuracy"), ".4f") + (f" ({row.diverged} diverged)" if row.diverged else "")

    def passes(row: Row | None) -> str:
        if row is None:
            return ""
        low = row.lower_bound("passes_to_target")
        if not row.all_reached and math.isfinite(low):
            return f"≥ {low:.2f}{note(row)}"
        return _pm(row.stat("passes_to_target")) + note(row)

    when = "at the stop" if spec.stop_at_target else f"after the budget of {spec.base.epochs:g} passes"
    return (["## Series side by side", "", f"Final test accuracy {when} (mean ± std over the seeds that finished):",
             ""] + table(accuracy) +
            ["", f"Passes to {spec.target_metric.replace('_', ' ')} {spec.target:g} (mean ± std over the seeds that "
             "reached it; ≥: some seed missed and counts with the passes it trained, a lower bound):", ""] +
            table(passes) + [""])


def _table_lines(result: SweepResult, key: tuple[int, int, str], rows: Sequence[Row]) -> list[str]:
    spec = result.spec
    rule = spec.config_for(key[2]).effective_lr_rule
    lr_head = {"constant": "lr", "adascale": "lr0 (median lr at B)"}.get(rule, "lr0 (lr at B)")
    lines = [f"## {_series_label(spec, key)}", "",
             f"| B | {lr_head} | reached | time per pass (s) | passes to target | time to target (s) | step speedup "
             "(ideal B/B_min) | time speedup | final test acc |", "|---|---|---|---|---|---|---|---|---|"]
    small = rows[0]
    p0, t0 = small.stat("passes_to_target")[0], small.stat("time_to_target_s")[0]
    for row in rows:
        b = row.group.global_batch_size
        passes, secs = row.stat("passes_to_target"), row.stat("time_to_target_s")
        ideal = b / small.group.global_batch_size
        step_speedup = ideal * p0 / passes[0] if small.all_reached and row.all_reached else math.nan
        time_speedup = t0 / secs[0] if small.all_reached and row.all_reached else math.nan
        mark = "" if row.all_reached else " †"
        # The flag goes on every figure that a disagreeing row's times enter, the smallest batch's included.
        timing = " ‡" if max(row.time_spread(), small.time_spread()) > SEED_TIME_SPREAD_FLAG else ""
        acc = _mean_std([o.final_test_accuracy for o in row.done])
        lr = f"{row.lr:g}"
        if rule != "constant":
            lr_b = statistics.fmean(o.lr_at_b for o in row.done) if row.done else math.nan
            lr += f" ({lr_b:.3g})"
        diverged = f" ({row.diverged} diverged)" if row.diverged else ""
        lines.append(
            f"| {b} | {lr} | {len(row.reached)}/{len(row.outcomes)}{diverged} | {_pm(row.stat('time_per_pass_s'))}"
            f"{' ‡' if row.time_spread() > SEED_TIME_SPREAD_FLAG else ''} | "
            f"{_pm(passes)}{mark} | {_pm(secs)}{mark}{timing} | "
            f"{(f'{step_speedup:.2f} ({ideal:g})' if math.isfinite(step_speedup) else f'— ({ideal:g})')} | "
            f"{(f'{time_speedup:.2f}{timing}' if math.isfinite(time_speedup) else '—')} | {_pm(acc, '.4f')} |")
    lines += ["", "† mean over the seeds that reached the target only; speedups are given only where every seed "
              "reached it. Step speedup = (B/B_min) · passes(B_min)/passes(B) (iterations saved; B/B_min is "
              "linear speedup); time speedup = time to target at B_min / at B.", ""]
    spread = [f"B={row.group.global_batch_size}: {row.time_spread():.1f}×" for row in rows
              if row.time_spread() > SEED_TIME_SPREAD_FLAG]
    if spread:
        lines += [f"‡ the seeds' time per pass differ by more than {SEED_TIME_SPREAD_FLAG:g}× ({', '.join(spread)}): "
                  "the same work took very different times, so these times measure the machine (other load, a "
                  "one-time cost), not the batch size; re-run those points (delete their run directories) on a "
                  "quiet machine before reading their times or time speedups.", ""]
    if spec.tuned:
        lines += ["lr tuning (mean passes to target of the tuning runs):", ""]
        if spec.tune_batch is not None:
            tuned_at = tuning_group_key(spec, small.group)
            lines.append(f"- at B={spec.tune_batch} on [base], for every B: **{small.lr:g}** won — "
                         f"{result.tuning_notes.get(tuned_at, '')}")
        for row in rows if spec.tune_batch is None else ():
            g = row.group
            lines.append(f"- B={g.global_batch_size}: **{row.lr:g}** won — {result.tuning_notes.get(g.key, '')}")
        lines.append("")
    return lines
