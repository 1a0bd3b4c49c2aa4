"""``scalesgd sweep``: a resumable grid of training runs over the global batch size, and its report.

Time to accuracy = (time per pass) × (passes to accuracy). A sweep measures both factors
and their product against the global batch size B — optionally also against the worker count P, the
data replication r (which lowers gradient diversity), named variants of the run options (an lr rule, a
warm-up), the learning rate and the seed — with the final test accuracy, and
marks the measured diversity bound B_S = n·Δ_S on the curves.

A sweep is a TOML file with two tables (keys of ``[base]`` mirror ``scalesgd train``'s options)::

    [sweep]
    batch_sizes = [16, 32, 64, 128]   # the x axis
    seeds = [0, 1, 2]                 # mean ± std over these
    workers = [1]                     # one series per P
    lrs = [0.02, 0.05, 0.1]           # several: tuned per (B, P, r); one: used as given (or by lr_rule)
    replicates = [1]                  # one series per r
    target_metric = "test_accuracy"   # or "train_accuracy"
    target = 0.9
    evals_per_epoch = 4               # resolution of "passes to target" (unless base sets eval_every)
    tune = "first-seed"               # lr tuned on the first seed, or "all-seeds" (mean over all)
    bound = "online"                  # B_S marked on the plots: the runs' online estimate over the first
                                      # bound_epochs ("online") or until the target ("online-to-target"),
                                      # or "init" (exact, whole data set, initial weights)
    bound_epochs = 1.0
    tune_batch = 16                   # optional: tune the lr once, at this B on [base], for every B and variant
    stop_at_target = true             # false: every run trains the whole budget (final accuracy = the budget's)

    [sweep.variants]                  # optional: named series, each [base] with some run options changed
    linear-warmup = { lr_rule = "linear", warmup_epochs = 2 }
    sqrt = { lr_rule = "sqrt" }

    [base]
    dataset = "digits"
    model = "mlp"
    epochs = 30                       # the budget, in passes, the same for every B

Every grid point (B, P, lr, seed, r) runs in ``OUT/runs/B{B}-P{P}-lr{lr}-s{seed}-r{r}`` (prefixed
``{variant}-`` for a variant's runs); a point whose
``summary.json`` exists is skipped, a partial one is deleted and re-run, so an interrupted sweep resumes
where it stopped. The report (``report.md`` and PNGs) reads only those run directories.

The package: :mod:`~scalesgd.sweep.spec` (the spec, its validation and the grid), :mod:`~scalesgd.sweep.runner`
(running, resuming and reading the points), :mod:`~scalesgd.sweep.report` (tables and bounds) and
:mod:`~scalesgd.sweep.plots` (its figures). :func:`run_sweep` is the one call that does all of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from scalesgd.sweep.report import write_report
from scalesgd.sweep.runner import Outcome, SweepResult, choose_lr, describe, measure, run_points
from scalesgd.sweep.spec import (BOUND_MODES, GRID_OWNED, SWEEP_KEYS, TARGET_METRICS, TUNE_MODES, Group, Point,
                                 SweepSpec, expand_grid, load_spec, plan, point_config, read_spec_file,
                                 runs_in_sweep, spec_from_mappings)


def run_sweep(spec: SweepSpec, out: Path, *, report_dir: Path | None = None, train_missing: bool = True,
              log: Callable[[str], None] = print) -> tuple[SweepResult, Path]:
    """Run (or resume) every point of ``spec`` under ``out/runs`` and write the report.

    Args:
        spec: the sweep.
        out: directory of the sweep; runs go to ``out/runs/<point name>``.
        report_dir: where report.md and the figures go (default: ``out``).
        train_missing: False only reads what is there and reports it (``--report-only``).
        log: where the one-line progress messages go.
    Returns:
        (the :class:`SweepResult`, the path of report.md).
    """
    from scalesgd.writer import check_output_dir

    out = Path(out)
    check_output_dir(out, "--out")  # before any point trains: a file there would fail deep in the first run
    check_output_dir(report_dir, "--report-dir")
    result = run_points(spec, out, train_missing=train_missing, log=log)
    path = write_report(result, Path(report_dir) if report_dir else out)
    log(f"report: {path}")
    return result, path


__all__ = ["SweepSpec", "Point", "Group", "Outcome", "SweepResult", "plan", "expand_grid", "point_config",
           "runs_in_sweep", "measure", "choose_lr", "describe", "run_sweep", "run_points", "write_report",
           "load_spec", "read_spec_file", "spec_from_mappings", "TARGET_METRICS", "TUNE_MODES", "BOUND_MODES",
           "GRID_OWNED", "SWEEP_KEYS"]
