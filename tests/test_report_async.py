"""`scalesgd report` on an asynchronous run: its loss curve comes from the update lines (there are no step
lines), in order, and the report names the algorithm and tabulates the staleness from summary.json."""

import json

import numpy as np

from scalesgd import plots
from scalesgd.report import write_report
from scalesgd.rundata import RunData


def _async_run(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model": "mlp", "dataset": "digits", "global_batch_size": 64, "workers": 2, "comm": "allreduce",
        "algorithm": "async-ps"}))
    # as the parameter server writes them: in arrival order, two workers' updates per round (step)
    updates = [(2, 0.31, 0.9), (1, 0.20, 1.0), (1, 0.10, 1.1), (3, 0.40, 0.7), (2, 0.30, 0.8)]
    lines = [{"kind": "update", "step": s, "epoch": s / 10, "version": v, "rank": v % 2, "staleness": v % 3,
              "loss": loss, "local_batch_size": 32, "lr": 0.05, "time_s": t}
             for v, (s, t, loss) in enumerate(updates, start=1)]
    lines.append({"kind": "eval", "step": 3, "epoch": 0.3, "test_loss": 0.7, "train_loss": 0.7,
                  "test_accuracy": 0.8, "train_accuracy": 0.8, "time_s": 0.5})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (path / "summary.json").write_text(json.dumps({
        "algorithm": "async-ps", "updates": 5, "steps": 3, "staleness_mean": 0.8, "staleness_max": 2,
        "staleness_histogram": {"10": 1, "0": 1, "2": 1, "1": 2}}))
    return path


def test_async_loss_points_come_from_the_updates_in_axis_order(tmp_path):
    run = RunData.open(_async_run(tmp_path / "run"))
    assert run.steps == [] and len(run.updates) == 5
    x, loss = plots.loss_points(run, "time_s")
    np.testing.assert_array_equal(x, [0.10, 0.20, 0.30, 0.31, 0.40])
    np.testing.assert_array_equal(loss, [1.1, 1.0, 0.8, 0.9, 0.7])
    x, loss = plots.loss_points(run, "step")
    assert list(x) == [1, 1, 2, 2, 3] and sorted(loss[:2]) == [1.0, 1.1]


def test_report_names_the_algorithm_and_tabulates_staleness(tmp_path):
    run_dir = _async_run(tmp_path / "run")
    text = write_report([run_dir], tmp_path / "out").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `run`"))
    assert "| async-ps |" in row and "allreduce" not in row
    staleness = text.split("## Staleness", 1)[1]
    assert "| 0.80 | 2 | 0: 1, 1: 2, 2: 1, 10: 1 |" in staleness  # histogram in numeric order of τ
    # no step lines: the step-time section says why it has no table instead of staying empty
    breakdown = text.split("## Where the step time goes", 1)[1].split("## Staleness", 1)[0]
    assert "async-ps has no synchronous steps" in breakdown
