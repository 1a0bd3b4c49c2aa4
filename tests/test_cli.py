"""The command line: defaults, TOML config with command-line precedence, torchrun, report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from scalesgd.cli import build_parser, config_from_args, main
from scalesgd.config import RunConfig


def test_defaults_are_runconfig_defaults():
    cfg = config_from_args(build_parser().parse_args(["train"]))
    assert cfg == RunConfig()


def test_scalesgd_train_defaults_to_goodput_and_lr_auto_where_they_can_run(tmp_path):
    parser = build_parser()

    def train_cfg(*argv: str) -> RunConfig:
        return config_from_args(parser.parse_args(["train", *argv]), train=True)

    assert train_cfg() == RunConfig(batch_policy="goodput", lr="auto")
    assert (train_cfg("--lr", "0.1").batch_policy, train_cfg("--lr", "0.1").lr) == ("goodput", 0.1)
    assert (train_cfg("--batch-policy", "fixed").lr, train_cfg("--batch-policy", "diversity").lr) == ("auto", "auto")
    # where goodput cannot run, the library's defaults stay and the command is valid as it stands
    for argv, policy, lr in ((("--diversity", "off"), "fixed", "auto"),
                             (("--lr-rule", "linear"), "fixed", "auto"),
                             (("--lr-rule", "adascale"), "goodput", "auto"),
                             (("--batch-policy", "schedule", "--batch-schedule", "0:64,1:128"), "schedule", "auto"),
                             (("--sync-every", "4"), "fixed", 0.05),
                             (("--comm", "ps", "--backup-workers", "1", "--diversity", "off"), "fixed", 0.05),
                             (("--algorithm", "hogwild", "--diversity", "off"), "fixed", 0.05),
                             (("--algorithm", "async-ps", "--diversity", "off"), "fixed", 0.05)):
        cfg = train_cfg(*argv)
        assert (cfg.batch_policy, cfg.lr) == (policy, lr), argv
    # a TOML file's values count as given
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 0.2\nbatch-policy = "fixed"\n')
    assert (train_cfg("--config", str(toml)).batch_policy, train_cfg("--config", str(toml)).lr) == ("fixed", 0.2)


def test_toml_then_command_line(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('dataset = "digits"\nmodel = "mlp"\nlr = 0.3\nglobal-batch-size = 64\nlr_milestones = [1, 2]\n')
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(p), "--lr", "0.01"]))
    assert (cfg.dataset, cfg.model, cfg.global_batch_size) == ("digits", "mlp", 64)
    assert cfg.lr == 0.01  # the command line wins
    assert cfg.lr_milestones == (1.0, 2.0)


@pytest.mark.spawn
@pytest.mark.timeout(150)
def test_train_digits_and_report(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--dataset", "digits", "--model", "mlp", "--workers", "2", "--epochs", "3",
                 "--global-batch-size", "64", "--lr", "0.1", "--no-progress", "--target-accuracy", "0.5",
                 "--threads-per-worker", "1", "--run-dir", str(run)])
    out = capsys.readouterr().out
    assert code == 0 and f"run directory: {run}" in out
    summary = json.loads((run / "summary.json").read_text())
    for key in ("final_test_accuracy", "steps", "epochs", "wall_s", "time_to_target_s"):
        assert key in summary
    assert summary["time_to_target_s"] is not None and summary["final_test_accuracy"] >= 0.5
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 2 and env["backend"] == "gloo" and env["torch"]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in steps if r["kind"] == "step")
    for key in ("step", "epoch", "global_batch_size", "lr", "loss", "examples_per_s", "time_s", "compute_s",
                "comm_s"):
        assert key in first
    assert any(r["kind"] == "eval" and "test_accuracy" in r and "train_accuracy" in r for r in steps)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "loss_accuracy_vs_step.png" in report and "time_breakdown_0.png" in report
    for png in ("loss_accuracy_vs_step.png", "loss_accuracy_vs_time.png", "time_breakdown_0.png"):
        assert (run / png).stat().st_size > 1000


def test_report_rejects_non_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.spawn
def test_python_dash_m_and_help():
    out = subprocess.run([sys.executable, "-m", "scalesgd", "train", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--global-batch-size" in out.stdout and "--target-accuracy" in out.stdout


@pytest.mark.spawn
@pytest.mark.timeout(180)
# ring-tcp (what the default, --comm auto, runs on CPU) finds its peers from torchrun's environment
@pytest.mark.parametrize("comm", ["allreduce", None])
def test_same_command_under_torchrun(tmp_path, comm):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun ships with torch"
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "scalesgd", "train", "--dataset", "digits", "--model", "mlp", "--steps", "5", "--no-progress",
         "--threads-per-worker", "1", "--timeout-s", "60", *(["--comm", comm] if comm else []),
         "--run-dir", str(run)],
        capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    assert json.loads((run / "summary.json").read_text())["steps"] == 5
    config = json.loads((run / "config.json").read_text())
    assert (config["comm"], config["comm_used"]) == ((comm, comm) if comm else ("auto", "ring-tcp"))
    assert proc.stdout.count("run directory:") == 1  # rank 0 alone prints the summary


def test_public_api_is_exported():
    import scalesgd

    assert callable(scalesgd.per_example_sq_norms) and callable(scalesgd.gradient_diversity)
    with pytest.raises(AttributeError):
        scalesgd.no_such_thing  # noqa: B018


def _fake_run(path, comm, *, ranks=2, steps=12, local_from=None):
    path.mkdir(parents=True)
    lines = []
    for i in range(1, steps + 1):
        rec = {"kind": "step", "step": i, "epoch": i / steps, "time_s": 0.01 * i, "loss": 1.0 / i,
               "comm_s": 0.004, "update_s": 0.001, **{f"compute_s_rank{r}": 0.002 * (r + 1) for r in range(ranks)}}
        if local_from is not None and i >= local_from:  # a local-SGD step: its tail holds rank 0's values only
            rec.update({f"compute_s_rank{r}": 0.003 if r == 0 else 0.0 for r in range(ranks)}, local_sgd=True,
                       averaged=i % 4 == 0)
        lines.append(json.dumps(rec))
    lines.append(json.dumps({"kind": "eval", "step": steps, "epoch": 1.0, "time_s": 0.2, "test_accuracy": 0.9,
                             "train_accuracy": 0.95}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "config.json").write_text(json.dumps({"model": "mlp", "global_batch_size": 64, "workers": ranks,
                                                  "comm": comm, "run_dir": str(path)}))


def test_report_labels_runs_by_what_differs_and_shows_shared_times_once(tmp_path, capsys):
    dirs = [tmp_path / c for c in ("allreduce", "ring", "ring-tcp")]
    for d in dirs:
        _fake_run(d, d.name)
    assert main(["report", *map(str, dirs), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    for comm in ("allreduce", "ring", "ring-tcp"):
        assert f"![time breakdown mlp B=64 P=2 comm={comm}]" in text
    assert "| rank | compute (ms) | wait (ms) |" in text and "transfer (ms)" not in text
    # rank 1 computes 4 ms, rank 0 2 ms: rank 0 waits 2 ms; transfer = rank 0's 4 ms all-reduce - 2 ms wait
    assert "| 0 | 2.000 | 2.000 |" in text and "| 1 | 4.000 | 0.000 |" in text
    assert text.count("All-reduce transfer 2.000 ms and optimizer update 1.000 ms") == 3


def test_report_per_worker_times_leave_out_local_sgd_steps(tmp_path):
    """A local-SGD step all-reduces nothing: its record holds rank 0's compute and zeros for the others, which
    read as rank 1 computing nothing and waiting for rank 0. The table comes from the synchronous steps only
    (post-local SGD), and a run that was local throughout says it has no per-worker times."""
    post, local = tmp_path / "post", tmp_path / "local"
    _fake_run(post, "allreduce", steps=40, local_from=11)  # 10 synchronous steps (5 skipped as warm-up), 30 local
    _fake_run(local, "ring", steps=20, local_from=1)
    assert main(["report", str(post), str(local), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| 0 | 2.000 | 2.000 |" in text and "| 1 | 4.000 | 0.000 |" in text  # the synchronous steps' times
    assert "| 1 | 0.000 |" not in text
    assert "comm=ring: local SGD steps all-reduce nothing, so they carry no per-worker times." in text
    assert (tmp_path / "rep" / "time_breakdown_0.png").is_file()
    assert not (tmp_path / "rep" / "time_breakdown_1.png").exists()


def test_a_target_accuracy_on_a_regression_task_is_refused(tmp_path, capsys):
    # a regression run's evaluations have no accuracy: it used to train and end "did not reach target"
    argv = ["train", "--dataset", "synthetic-linreg", "--n-train", "64", "--model", "mlp", "--workers", "2",
            "--steps", "2", "--global-batch-size", "8", "--target-accuracy", "0.5", "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--target-accuracy needs a classification data set" in err
    assert not (tmp_path / "r").exists()


def test_train_help_gives_one_default_per_option():
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("train", "diversity", "sweep", "predict", "allreduce-bench"):
        for action in sub.choices[name]._actions:
            shown = (action.help or "").replace("%(default)s", str(action.default))
            assert shown.count("(default") + shown.count("; default") <= 1, (name, action.option_strings, shown)
    text = sub.choices["train"].format_help()
    assert "(default: None)" not in text and "(default: the model's own)" in text



def test_each_commands_help_shows_the_lr_and_batch_policy_defaults_it_runs_with():
    """train defaults to --lr auto and goodput; diversity (and sweep's [base]) keep RunConfig's 0.05 and fixed,
    and their help said train's defaults. Each help is checked against the config that command builds."""
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    built = {"train": config_from_args(parser.parse_args(["train"]), train=True),
             "diversity": config_from_args(parser.parse_args(["diversity"]))}
    for command, cfg in built.items():
        helps = {a.dest: " ".join((a.help or "").split()) for a in sub.choices[command]._actions}
        assert f"(default: {cfg.lr}" in helps["lr"], (command, helps["lr"])
        assert f"(default: {cfg.batch_policy}" in helps["batch_policy"], (command, helps["batch_policy"])
    assert (built["diversity"].lr, built["diversity"].batch_policy) == (0.05, "fixed")
    sweep_help = " ".join(" ".join((a.help or "").split()) for a in sub.choices["sweep"]._actions)
    assert "fitted step time x statistical efficiency" in sweep_help  # its [base] --batch-policy is there
    assert "goodput where it can run" not in sweep_help and "auto for synchronous SGD" not in sweep_help

@pytest.mark.spawn
@pytest.mark.timeout(200)
def test_diversity_command_measures_along_training_and_at_the_checkpoint(tmp_path, capsys):
    """`scalesgd diversity --every k` trains, logs the exact whole-data figures every k steps next to the online
    estimate, prints them and plots diversity.png; `--checkpoint` on the same run measures the saved model
    independently (a fresh process-free rebuild), and the two agree at the last step."""
    run = tmp_path / "run"
    code = main(["diversity", "--dataset", "digits", "--model", "mlp", "--width", "32", "--workers", "2",
                 "--steps", "20", "--every", "10", "--global-batch-size", "32", "--diversity", "cheap",
                 "--threads-per-worker", "1", "--no-progress", "--run-dir", str(run)])
    out = capsys.readouterr().out
    assert code == 0 and (run / "diversity.png").stat().st_size > 0
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in lines if r["kind"] == "diversity"]
    assert [r["step"] for r in measured] == [0, 10, 20]
    for r in measured:  # the exact figures obey their identities
        assert r["batch_bound"] == pytest.approx(r["n"] * r["delta"], rel=1e-9)
        assert r["batch_bound"] >= 1.0 and r["delta"] >= 1.0 / r["n"]
    assert measured[0]["batch_bound_est"] is None and measured[-1]["batch_bound_est"] > 0  # online estimate beside
    table = [s.split() for s in out.splitlines() if s.split()[:1] in (["0"], ["10"], ["20"])]
    assert [int(row[0]) for row in table] == [0, 10, 20]
    assert float(table[-1][2]) == pytest.approx(measured[-1]["batch_bound"], abs=0.06)  # printed to 0.1

    assert main(["diversity", "--checkpoint", str(run)]) == 0
    at_ckpt = json.loads((run / "diversity_checkpoint.json").read_text())
    assert at_ckpt["step"] == 20
    assert at_ckpt["batch_bound"] == pytest.approx(measured[-1]["batch_bound"], rel=1e-4)
