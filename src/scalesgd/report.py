"""``scalesgd report``: report.md with PNG figures, from run directories only."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from scalesgd import plots
from scalesgd.rundata import RunData, distinct_labels
from scalesgd.writer import check_output_dir, write_atomic


def _fmt(value, spec: str = ".4f") -> str:
    if value is None:
        return "—"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def write_report(run_dirs: Sequence[Path], out_dir: Path | None = None) -> Path:
    """Write ``report.md`` and its figures for ``run_dirs`` into ``out_dir`` (default: the first run).

    Returns the path of report.md. The file is written via a temporary name, so a failed report leaves
    nothing half-written.
    """
    check_output_dir(out_dir, "--out")
    runs = [RunData.open(p) for p in run_dirs]
    labels = distinct_labels(runs)  # runs that differ only in --comm (say) are told apart by it
    out_dir = Path(out_dir) if out_dir is not None else runs[0].path
    out_dir.mkdir(parents=True, exist_ok=True)
    for x_axis, name in (("step", "loss_accuracy_vs_step.png"), ("time_s", "loss_accuracy_vs_time.png")):
        plots.loss_and_accuracy(runs, out_dir / name, x_axis=x_axis, labels=labels)
    lines = ["# scalesgd report", ""]
    lines += ["| run | model | data set | B | P | comm | steps | epochs | final test acc | wall (s) | "
              "time to target (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        c, s = run.config, run.summary or {}
        lines.append(f"| `{run.path.name}` | {c.get('model')} | {c.get('dataset')} | {c.get('global_batch_size')} "
                     f"| {c.get('workers')} | {_transport(c)} | {_fmt(s.get('steps'), 'd')} | "
                     f"{_fmt(s.get('epochs'), '.2f')} | {_fmt(s.get('final_test_accuracy'))} | "
                     f"{_fmt(s.get('wall_s'), '.1f')} | {_fmt(s.get('time_to_target_s'), '.1f')} |")
        if not run.summary:
            lines.append(f"\n`{run.path.name}` has no summary.json: it was interrupted or diverged.\n")
    lines += ["", "## Loss and accuracy", "", "![against steps](loss_accuracy_vs_step.png)", "",
              "![against wall time](loss_accuracy_vs_time.png)", ""]
    lines += ["## Where the step time goes", "",
              "Median per step and per worker (warm-up excluded). *Waiting* is the time a rank sits at the "
              "all-reduce for the slowest peer; a tall waiting bar on some ranks means imbalance, a tall "
              "transfer bar means the network limits scaling.", ""]
    for i, (run, label) in enumerate(zip(runs, labels)):
        if not run.steps:
            algorithm = run.config.get("algorithm") or "sync"
            if algorithm != "sync":  # updates applied as they arrive: no step at which the ranks meet
                lines += [f"{label}: {algorithm} has no synchronous steps, so no rank waits for a peer; see its "
                          "staleness below.", ""]
            continue
        b = run.time_breakdown()
        if not b["compute_s"]:  # local SGD throughout: no step all-reduces the ranks' times
            lines += [f"{label}: local SGD steps all-reduce nothing, so they carry no per-worker times.", ""]
            continue
        name = f"time_breakdown_{i}.png"
        plots.time_breakdown(run, out_dir / name, label=label)
        lines.append(f"![time breakdown {label}]({name})")
        lines.append("")
        if b["per_rank_comm"]:
            lines.append("| rank | compute (ms) | wait (ms) | transfer (ms) | update (ms) |")
            lines.append("|---|---|---|---|---|")
            for r in range(len(b["compute_s"])):
                lines.append(f"| {r} | {b['compute_s'][r] * 1e3:.3f} | {b['wait_s'][r] * 1e3:.3f} | "
                             f"{b['transfer_s'][r] * 1e3:.3f} | {b['update_s'][r] * 1e3:.3f} |")
            lines.append("")
            continue
        lines.append("| rank | compute (ms) | wait (ms) |")
        lines.append("|---|---|---|")
        for r in range(len(b["compute_s"])):
            lines.append(f"| {r} | {b['compute_s'][r] * 1e3:.3f} | {b['wait_s'][r] * 1e3:.3f} |")
        lines.append("")
        lines.append(f"All-reduce transfer {b['transfer_s'][0] * 1e3:.3f} ms and optimizer update "
                     f"{b['update_s'][0] * 1e3:.3f} ms per step, measured on rank 0 (this run's metrics carry them "
                     "for rank 0 only).")
        lines.append("")
    stale = [(run, label) for run, label in zip(runs, labels) if (run.summary or {}).get("staleness_mean") is not None]
    if stale:  # asynchronous runs: how old the parameters were that each applied gradient was computed on
        lines += ["## Staleness", "", "τ: updates applied between the version a gradient was computed on and "
                  "its own.", "", "| run | algorithm | updates | mean τ | max τ | histogram τ: count |",
                  "|---|---|---|---|---|---|"]
        for run, label in stale:
            s = run.summary
            hist = ", ".join(f"{k}: {v}" for k, v in sorted(s.get("staleness_histogram", {}).items(),
                                                             key=lambda kv: int(kv[0])))
            lines.append(f"| {label} | {s.get('algorithm')} | {_fmt(s.get('updates'), 'd')} | "
                         f"{_fmt(s.get('staleness_mean'), '.2f')} | {_fmt(s.get('staleness_max'), 'd')} | {hist} |")
        lines.append("")
    extra = [r for r in runs if any("batch_bound_est" in s for s in r.steps[-1:])]
    if extra:
        lines += ["## Gradient diversity (online estimate)", ""]
        for run in extra:
            last = run.steps[-1]
            lines.append(f"- {labels[runs.index(run)]}: B_S estimate {_fmt(last.get('batch_bound_est'), '.1f')} at step "
                         f"{last['step']}")
        lines.append("")
    path = out_dir / "report.md"
    write_atomic(path, "\n".join(lines))
    return path


def _transport(config: dict[str, Any]) -> str:
    """The comm column: the all-reduce strategy, or the asynchronous algorithm that replaces it."""
    algorithm = config.get("algorithm") or "sync"
    # comm_used: what --comm auto resolved to in that job (older runs have only the option)
    return str(config.get("comm_used") or config.get("comm")) if algorithm == "sync" else str(algorithm)
