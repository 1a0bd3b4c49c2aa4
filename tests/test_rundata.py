"""The one run-directory reader (strict, one error line per damaged file), the one passes-to-target function
(against a slow reference), run labels, the one atomic write."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from scalesgd.errors import DataError
from scalesgd.rundata import RunData, distinct_labels, passes_to_target
from scalesgd.writer import atomic_path, write_atomic, write_json_atomic

# ---------------------------------------------------------------------------------------------------------
# passes to target


def slow_crossing(evals, metric, target, clock, grid=200_001):
    """Reference: walk the piecewise-linear curve through the evaluations on a fine grid of epochs and
    return (epoch, clock) at the first grid point where the metric is >= target (None if never)."""
    pts = [e for e in evals if e.get(metric) is not None]
    if not pts:
        return None
    if pts[0][metric] >= target:
        return pts[0]["epoch"], pts[0][clock]
    epochs = np.array([e["epoch"] for e in pts], dtype=float)
    values = np.array([e[metric] for e in pts], dtype=float)
    clocks = np.array([e[clock] for e in pts], dtype=float)
    x = np.linspace(epochs[0], epochs[-1], grid)
    curve = np.interp(x, epochs, values)
    above = np.nonzero(curve >= target - 1e-12)[0]
    if not len(above):
        return None
    e = x[above[0]]
    return e, float(np.interp(e, epochs, clocks))


def test_passes_to_target_by_hand():
    evals = [{"epoch": 0.5, "t": 1.0, "acc": 0.6}, {"epoch": 1.0, "t": 2.0, "acc": 0.8},
             {"epoch": 1.5, "t": 3.0, "acc": 0.95}]
    hit = passes_to_target(evals, "acc", 0.9, clocks=("t",))
    # f = (0.9 - 0.8) / (0.95 - 0.8) = 2/3 of the way from epoch 1.0 to 1.5, and from 2 s to 3 s
    assert hit.passes == pytest.approx(1.0 + 0.5 * 2 / 3) and hit.clocks == {"t": pytest.approx(2.0 + 2 / 3)}
    first = passes_to_target(evals, "acc", 0.5, clocks=("t",))  # crossing at the first evaluation
    assert (first.passes, first.clocks) == (0.5, {"t": 1.0})
    assert passes_to_target(evals, "acc", 0.99) is None  # no crossing
    assert passes_to_target([], "acc", 0.5) is None
    exact = passes_to_target(evals, "acc", 0.8)  # reached exactly at an evaluation: that evaluation
    assert exact.passes == pytest.approx(1.0)


def test_passes_to_target_matches_the_slow_reference_on_random_sequences():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 8)
        epoch, t, evals = 0.0, 0.0, []
        for _ in range(n):
            epoch += rng.uniform(0.05, 1.0)
            t += rng.uniform(0.1, 3.0)
            acc = None if rng.random() < 0.15 else rng.uniform(0.0, 1.0)
            evals.append({"epoch": epoch, "train_time_s": t, "test_accuracy": acc})
        target = rng.uniform(0.2, 0.95)
        hit = passes_to_target(evals, "test_accuracy", target, clocks=("train_time_s",))
        ref = slow_crossing(evals, "test_accuracy", target, "train_time_s")
        if ref is None:
            assert hit is None, (trial, evals, target)
            continue
        span = evals[-1]["epoch"] - evals[0]["epoch"]
        tol = 2 * span / 200_000 + 1e-9
        assert hit is not None
        assert hit.passes == pytest.approx(ref[0], abs=tol)
        pts = [e for e in evals if e["test_accuracy"] is not None]
        slope = max([(b["train_time_s"] - a["train_time_s"]) / (b["epoch"] - a["epoch"])
                     for a, b in zip(pts, pts[1:])], default=0.0)
        assert hit.clocks["train_time_s"] == pytest.approx(ref[1], abs=tol * slope + 1e-9)


def test_passes_to_target_names_a_missing_clock():
    with pytest.raises(DataError, match="train_time_s"):
        passes_to_target([{"epoch": 1.0, "acc": 0.9}], "acc", 0.5, clocks=("train_time_s",))


# ---------------------------------------------------------------------------------------------------------
# the reader


def _run_dir(tmp_path, lines, *, summary='{"steps": 1}', config=None):
    d = tmp_path / "run"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if summary is not None:
        (d / "summary.json").write_text(summary)
    (d / "config.json").write_text(json.dumps(config or {"model": "mlp", "global_batch_size": 64, "workers": 2}))
    return d


GOOD_STEP = json.dumps({"kind": "step", "step": 1, "epoch": 0.1, "loss": 1.0})
GOOD_EVAL = json.dumps({"kind": "eval", "step": 1, "epoch": 0.1, "test_accuracy": 0.5})


def test_reader_reads_a_good_run(tmp_path):
    run = RunData.open(_run_dir(tmp_path, [GOOD_STEP, "", GOOD_EVAL]))
    assert [r["kind"] for r in run.records] == ["step", "eval"]
    assert len(run.steps) == 1 and len(run.evals) == 1 and run.summary == {"steps": 1}
    assert run.label == "mlp B=64 P=2"


@pytest.mark.parametrize("bad, match", [
    ('{"kind": "step", "step": 2, "epo', r"metrics.jsonl:2 is not valid JSON"),
    ("[1, 2]", r"metrics.jsonl:2 is a JSON list, not an object"),
    ('{"step": 2, "epoch": 0.2}', r"metrics.jsonl:2 lacks the key 'kind'"),
    ('{"kind": "eval", "step": 2}', r"metrics.jsonl:2 lacks the key 'epoch'"),
])
def test_reader_names_file_and_line_of_a_bad_metrics_line(tmp_path, bad, match):
    run = RunData.open(_run_dir(tmp_path, [GOOD_STEP, bad, GOOD_EVAL]))
    with pytest.raises(DataError, match=match):
        run.records


def test_reader_names_a_truncated_summary_and_no_run_dir(tmp_path):
    run = RunData.open(_run_dir(tmp_path, [GOOD_STEP], summary='{"steps": 3, "epo'))
    with pytest.raises(DataError, match=r"summary.json is not valid JSON"):
        run.summary
    assert RunData.open(_run_dir(tmp_path / "x", [GOOD_STEP], summary=None)).summary is None
    with pytest.raises(DataError, match="not a run directory"):
        RunData.open(tmp_path / "nowhere")


def test_time_breakdown_of_a_run_resumed_with_fewer_workers_uses_the_last_world(tmp_path):
    """``--resume --workers 1`` of a 2-worker run: the steps before the resume carry two ranks' times, those after
    one. The breakdown is the current world's (config.json's workers), from its steps alone; it used to take the
    ranks of the first step and fail with KeyError 'compute_s_rank1' on the later ones."""
    def step(i, ranks):
        return json.dumps({"kind": "step", "step": i, "epoch": i / 40, "time_s": 0.01 * i, "loss": 1.0, "comm_s": 0.0,
                           "update_s": 0.001, **{f"compute_s_rank{r}": 0.002 * (r + 1) for r in range(ranks)},
                           **{f"prev_comm_s_rank{r}": 0.0 for r in range(ranks)},
                           **{f"prev_update_s_rank{r}": 0.001 for r in range(ranks)}})
    lines = [step(i, 2) for i in range(1, 21)] + [step(i, 1) for i in range(21, 41)]
    run = RunData.open(_run_dir(tmp_path, lines, config={"model": "mlp", "global_batch_size": 64, "workers": 1}))
    times = run.time_breakdown()
    assert times["compute_s"] == pytest.approx([0.002]) and times["wait_s"] == [0.0]
    assert times["update_s"] == pytest.approx([0.001]) and times["per_rank_comm"]
    # the run before the resume, alone: both ranks (rank 0 waits 2 ms for rank 1)
    before = RunData.open(_run_dir(tmp_path / "before", lines[:20]))
    assert before.time_breakdown()["wait_s"] == pytest.approx([0.002, 0.0])


def test_labels_say_what_differs_between_runs(tmp_path):
    base = {"model": "mlp", "global_batch_size": 64, "workers": 2, "comm": "allreduce", "lr": 0.1,
            "run_dir": "x", "master_port": 1}
    runs = []
    for i, comm in enumerate(["allreduce", "ring", "ring-tcp"]):
        d = _run_dir(tmp_path / str(i), [GOOD_STEP], config={**base, "comm": comm, "run_dir": str(i),
                                                             "master_port": i})
        runs.append(RunData.open(d))
    assert distinct_labels(runs) == ["mlp B=64 P=2 comm=allreduce", "mlp B=64 P=2 comm=ring",
                                     "mlp B=64 P=2 comm=ring-tcp"]
    same = [RunData.open(_run_dir(tmp_path / f"s{i}", [GOOD_STEP], config=base)) for i in range(2)]
    labels = distinct_labels(same)  # the same options and directory name: their paths tell them apart
    assert labels == [f"mlp B=64 P=2 ({run.path})" for run in same]
    assert distinct_labels(runs[:1]) == ["mlp B=64 P=2"]


# ---------------------------------------------------------------------------------------------------------
# the atomic write


def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"a": (1, 2), "p": tmp_path})
    assert json.loads(path.read_text()) == {"a": [1, 2], "p": str(tmp_path)}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text())["a"] == [1, 2]  # the old file is intact
    write_atomic(tmp_path / "t.md", "text")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "t.md").read_text() == "text" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "t.md") as tmp:
            tmp.write_text("half")
            raise RuntimeError("the writer failed")
    assert (tmp_path / "t.md").read_text() == "text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "out.json", "t.md"]  # no temporary left
