"""``scalesgd sweep``: grid expansion (TOML and command line), resumability, the report, bad specs."""

from __future__ import annotations

import json
import math

import pytest

from scalesgd.cli import build_parser, main
from scalesgd.cli import sweep_spec_from_args as spec_from_args
from scalesgd.errors import ConfigError
from scalesgd.rundata import passes_to_target
from scalesgd.sweep import (Outcome, Point, choose_lr, expand_grid, load_spec, plan, point_config, run_sweep,
                            runs_in_sweep, spec_from_mappings)


def crossing(evals, metric, target):
    """The sweep's (passes, training time) at the target: rundata's one passes-to-target function."""
    hit = passes_to_target(evals, metric, target, clocks=("train_time_s",))
    return None if hit is None else (hit.passes, hit.clocks["train_time_s"])

SPEC = """
[sweep]
name = "tiny"
batch_sizes = [32, 16]
seeds = [0, 1, 2]
lrs = [0.1]
replicates = [1, 2]
target_metric = "train_accuracy"
target = 0.8

[base]
dataset = "digits"
model = "mlp"
epochs = 2
lr-schedule = "constant"
diversity = "exact"
"""


def _spec_file(tmp_path, text=SPEC):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def test_toml_spec_expands_to_the_grid(tmp_path):
    spec = load_spec(_spec_file(tmp_path))
    assert spec.batch_sizes == (32, 16) and spec.seeds == (0, 1, 2) and spec.replicates == (1, 2)
    base = spec.base
    assert (base.dataset, base.model, base.epochs, base.lr_schedule) == ("digits", "mlp", 2, "constant")
    groups = plan(spec)
    assert [(g.replicate, g.global_batch_size) for g in groups] == [(1, 16), (1, 32), (2, 16), (2, 32)]
    assert all(g.tuning == () for g in groups)  # one lr: nothing to tune
    points = expand_grid(spec)
    assert len(points) == runs_in_sweep(spec) == 2 * 3 * 2
    assert len({p.name for p in points}) == len(points)
    assert points[0].name == "B16-P1-lr0.1-s0-r1"
    cfg = point_config(spec, Point(2, 1, 32, 0.1, 1), n_train=1438, run_root=tmp_path / "runs")
    assert (cfg.global_batch_size, cfg.lr, cfg.seed, cfg.replicate, cfg.workers) == (32, 0.1, 1, 2, 1)
    assert cfg.run_dir == str(tmp_path / "runs" / "B32-P1-lr0.1-s1-r2")
    assert cfg.target_accuracy == 0.8 and cfg.target_metric == "train_accuracy"  # the trainer stops there
    assert cfg.eval_every == round(1438 / (32 * 4)) and cfg.extra["target_metric"] == "train_accuracy"


def test_tuning_plan_runs_every_lr_on_the_first_seed():
    spec = spec_from_mappings({"batch_sizes": [16, 64], "lrs": [0.05, 0.1, 0.2], "seeds": [3, 4, 5],
                               "target": 0.9}, {"dataset": "digits", "model": "mlp"}, source="test")
    g = plan(spec)[0]
    assert [(p.lr, p.seed) for p in g.tuning] == [(0.05, 3), (0.1, 3), (0.2, 3)]
    assert runs_in_sweep(spec) == 2 * (3 + 2)
    spec_all = spec_from_mappings({"batch_sizes": [16], "lrs": [0.05, 0.1], "tune": "all-seeds", "target": 0.9},
                                  {}, source="test")
    assert len(plan(spec_all)[0].tuning) == 2 * 3 and runs_in_sweep(spec_all) == 6


def test_command_line_lists_and_precedence_over_toml(tmp_path):
    argv = ["sweep", str(_spec_file(tmp_path)), "--out", str(tmp_path / "out"), "--batch-sizes", "8,64,256",
            "--seeds", "0,1", "--workers", "1,2", "--lrs", "0.05,0.1", "--epochs", "5", "--width", "64"]
    spec = spec_from_args(build_parser().parse_args(argv))
    assert spec.batch_sizes == (8, 64, 256) and spec.seeds == (0, 1) and spec.workers == (1, 2)
    assert spec.lrs == (0.05, 0.1) and spec.tuned and spec.replicates == (1, 2)  # replicates from the file
    assert (spec.base.epochs, spec.base.width, spec.base.model) == (5, 64, "mlp")
    only_cli = spec_from_args(build_parser().parse_args(
        ["sweep", "--out", "x", "--batch-sizes", "16", "--target", "0.5", "--dataset", "digits"]))
    assert only_cli.seeds == (0, 1, 2) and only_cli.workers == (1,) and only_cli.base.dataset == "digits"


def test_crossing_interpolates_between_evaluations():
    evals = [{"epoch": 0.5, "train_time_s": 1.0, "test_accuracy": 0.6},
             {"epoch": 1.0, "train_time_s": 2.0, "test_accuracy": 0.8},
             {"epoch": 1.5, "train_time_s": 3.0, "test_accuracy": 0.95}]
    epoch, secs = crossing(evals, "test_accuracy", 0.9)
    assert epoch == pytest.approx(1.0 + 0.5 * (0.1 / 0.15)) and secs == pytest.approx(2.0 + 0.1 / 0.15)
    assert crossing(evals, "test_accuracy", 0.5) == (0.5, 1.0)  # already there at the first evaluation
    assert crossing(evals, "test_accuracy", 0.99) is None


def test_choose_lr_fewest_passes_then_time_and_misses_last():
    def o(lr, passes, secs, reached=True, best=0.9):
        return Outcome(Point(1, 1, 16, lr, 0), "done", reached=reached, passes_to_target=passes,
                       time_to_target_s=secs, best_metric=best)

    lr, note = choose_lr({0.1: [o(0.1, 3.0, 2.0)], 0.2: [o(0.2, 2.0, 5.0)], 0.4: [o(0.4, math.nan, math.nan, False)]})
    assert lr == 0.2 and "0.4: missed" in note
    assert choose_lr({0.1: [o(0.1, 2.0, 2.0)], 0.2: [o(0.2, 2.0, 1.0)]})[0] == 0.2  # tie on passes: faster wins
    assert choose_lr({0.1: [o(0.1, 9, 9, False, 0.7)], 0.2: [o(0.2, 9, 9, False, 0.8)]})[0] == 0.2


@pytest.mark.spawn
@pytest.mark.timeout(120)
def test_sweep_resumes_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALESGD_CACHE", str(tmp_path / "cache"))
    spec = spec_from_mappings(
        {"name": "tiny", "batch_sizes": [32, 128], "seeds": [0, 1, 2], "lrs": [0.1],
         "target_metric": "train_accuracy", "target": 0.6, "evals_per_epoch": 2, "measure_init_bound": True},
        {"dataset": "digits", "model": "mlp", "width": 32, "epochs": 1, "lr_schedule": "constant",
         "diversity": "exact", "threads_per_worker": 1, "eval_train_examples": 300}, source="test")
    out = tmp_path / "sweep"
    lines: list[str] = []
    result, report = run_sweep(spec, out, log=lines.append)
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == sorted(p.name for p in expand_grid(spec)) and len(runs) == 6
    assert sum("s/pass" in line and "wall" in line for line in lines) == 6  # one line per finished run
    text = report.read_text()
    for png in ("time_per_pass.png", "passes_to_target.png", "time_to_target.png"):
        assert (out / png).stat().st_size > 1000 and png in text
    assert "±" in text and "| 32 | 0.1 |" in text and "| 128 | 0.1 |" in text
    assert "B_S exact at init" in text and len(list((out / "bounds").iterdir())) == 3

    # Second invocation: nothing trains. Then a run that lost its summary.json is re-run, alone.
    first_summary = json.loads((out / "runs" / "B32-P1-lr0.1-s1-r1" / "summary.json").read_text())
    (out / "runs" / "B128-P1-lr0.1-s2-r1" / "summary.json").unlink()
    lines.clear()
    run_sweep(spec, out, log=lines.append)
    assert sum("finished earlier, skipped" in line for line in lines) == 5
    assert sum("re-running" in line for line in lines) == 1 and "B128-P1-lr0.1-s2-r1" in "".join(lines)
    assert json.loads((out / "runs" / "B32-P1-lr0.1-s1-r1" / "summary.json").read_text()) == first_summary
    metrics = (out / "runs" / "B128-P1-lr0.1-s2-r1" / "metrics.jsonl").read_text().splitlines()
    assert len([m for m in metrics if '"kind": "step"' in m]) == math.ceil(1438 / 128)  # not appended twice

    # Report only, with a target nobody reached: the misses are marked, not dropped.
    code = main(["sweep", "--out", str(out), "--report-only", "--batch-sizes", "32,128", "--seeds", "0,1,2",
                 "--lrs", "0.1", "--target-metric", "train_accuracy", "--target", "0.9999", "--evals-per-epoch",
                 "2", "--dataset", "digits", "--model", "mlp", "--width", "32", "--epochs", "1", "--lr-schedule",
                 "constant", "--diversity", "exact", "--threads-per-worker", "1", "--eval-train-examples", "300",
                 "--name", "tiny", "--measure-init-bound", "--report-dir", str(tmp_path / "rep")])
    assert code == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "0/3" in text and "Runs that missed the target" in text and "B32-P1-lr0.1-s0-r1" in text

    # Changing a run option under the same --out is refused rather than mixing configurations.
    with pytest.raises(ConfigError, match="was run with lr_schedule"):
        run_sweep(spec_from_mappings({"batch_sizes": [32], "seeds": [0], "lrs": [0.1], "target": 0.6,
                                      "target_metric": "train_accuracy", "evals_per_epoch": 2},
                                     {"dataset": "digits", "model": "mlp", "width": 32, "epochs": 1,
                                      "diversity": "exact", "eval_train_examples": 300}, source="test"),
                  out, log=lines.append)


@pytest.mark.parametrize("text, match", [
    ("[sweep]\nbatch_sizes = [16]\ntarget = 0.9\nbatch_size = 3\n", "unknown \\[sweep\\] key 'batch_size'"),
    ("[sweep]\nbatch_sizes = [16]\ntarget = 0.9\n[base]\nglobal_batch_size = 64\n",
     "sets 'global_batch_size'.*batch_sizes"),
    ("[sweep]\nbatch_sizes = [16]\ntarget = 0.9\n[base]\nlearning_rate = 0.1\n", "unknown key 'learning_rate'"),
    ("[sweep]\nbatch_sizes = []\ntarget = 0.9\n", "batch_sizes is empty"),
    ("[sweep]\nbatch_sizes = [16, 0]\ntarget = 0.9\n", "batch_sizes must be integers >= 1"),
    ("[sweep]\nbatch_sizes = [16]\n", "no target accuracy"),
    ("[sweep]\ntarget = 0.9\n", "no batch sizes"),
    ("[sweep]\nbatch_sizes = [16]\ntarget = 90\n", "target is an accuracy in"),
    ("[sweep]\nbatch_sizes = [16]\ntarget = 0.9\ntune = \"best\"\n", "tune: unknown value 'best'"),
    ("[sweep]\nbatch_sizes = [16]\ntarget = 0.9\n[base]\ndiversity = \"off\"\n", "bound = \"online\""),
    ("[sweep]\nbatch_sizes = [16]\ntarget = 0.9\n[base]\nsteps = 100\n", "budget is epochs"),
    ("[sweep]\nbatch_sizes = [16]\ntarget = 0.9\n[base]\nmodel = \"resnet\"\n", "--model: unknown value"),
    ("[grid]\nbatch_sizes = [16]\n", "unknown table or key 'grid'"),
    ("[sweep\n", "not valid TOML"),
])
def test_bad_spec_is_a_config_error_that_says_what_to_fix(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_spec(_spec_file(tmp_path, text))


def test_bad_spec_on_the_command_line_exits_2(tmp_path, capsys):
    code = main(["sweep", str(_spec_file(tmp_path, "[sweep]\nbatch_sizes = [16]\n")), "--out", str(tmp_path)])
    assert code == 2 and "no target accuracy" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not found"):
        load_spec(tmp_path / "missing.toml")
