"""Bad input a new user meets: a file where a directory goes, damaged run files, a damaged or foreign checkpoint,
a wrong TOML key or value, a run without passes to a target. Each is one line on stderr naming the problem and
the fix, exit 2 through ``scalesgd.cli.main``, no traceback, nothing written."""

from __future__ import annotations

import json
import os

from pathlib import Path

import pytest
import torch

from scalesgd.cli import main
from scalesgd.config import RunConfig
from scalesgd.errors import ConfigError, DataError
from scalesgd.rundata import RunData
from scalesgd.writer import check_output_dir, load_checkpoint


def one_error_line(capsys, *words):
    """The command's stderr is one ``scalesgd: error:`` line, no traceback, holding every word."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scalesgd: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# 1, 2: a file (or a place under a file) where an output directory goes


@pytest.fixture
def afile(tmp_path):
    f = tmp_path / "afile"
    f.write_text("not a directory\n")
    return f


TRAIN = ["train", "--dataset", "digits", "--model", "mlp", "--steps", "2", "--workers", "1"]


@pytest.mark.parametrize("sub", ["", "sub"])
def test_train_run_dir_that_is_a_file_is_refused_before_anything_starts(tmp_path, afile, capsys, sub):
    run_dir = afile / sub if sub else afile
    assert main([*TRAIN, "--run-dir", str(run_dir)]) == 2
    one_error_line(capsys, "--run-dir", str(afile), "not a directory")
    assert afile.read_text() == "not a directory\n" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_run_dir_under_a_directory_without_write_permission_is_refused(tmp_path, monkeypatch):
    # CI runs as root, for whom permission bits grant everything: the permission answer is stubbed at the one
    # call the check makes, so the branch that turns it into one line is exercised everywhere.
    ro = tmp_path / "ro"
    ro.mkdir()
    asked = []
    monkeypatch.setattr("scalesgd.writer.os.access", lambda p, mode: asked.append(Path(p)) or False)
    with pytest.raises(ConfigError, match="no write permission"):
        check_output_dir(ro / "a" / "b", "--run-dir")
    assert asked == [ro]  # the nearest existing folder is the one asked about


def test_directories_that_exist_or_can_be_made_pass(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper", "--out")  # creatable: fine
    check_output_dir(tmp_path, "--out")  # an existing directory: fine
    check_output_dir(None, "--out")  # not given: the command's default
    assert sorted(tmp_path.iterdir()) == []  # a check, nothing made


def test_sweep_out_and_report_dir_that_are_files_are_refused(tmp_path, afile, capsys):
    sweep = ["sweep", "--batch-sizes", "8", "--seeds", "0", "--target", "0.5", "--dataset", "digits"]
    assert main([*sweep, "--out", str(afile)]) == 2
    one_error_line(capsys, "--out", str(afile), "not a directory")
    assert main([*sweep, "--out", str(tmp_path / "sw"), "--report-dir", str(afile / "rep")]) == 2
    one_error_line(capsys, "--report-dir", str(afile), "not a directory")
    assert not (tmp_path / "sw").exists()  # nothing trained or written


def fake_run(run_dir, *, target=None, extra_lines=()):
    """A run directory as `scalesgd train` writes it (config, metrics, summary), without training."""
    run_dir.mkdir()
    lines = [{"kind": "step", "step": s, "epoch": s / 10, "global_batch_size": 32, "loss": 1.0 / s, "time_s": 0.1 * s,
              "grad_sq_norm_step": 2.0, "trace_cov_step": 100.0, "batch_bound_est": 51.0} for s in range(1, 11)]
    lines += [{"kind": "eval", "step": 5, "epoch": 0.5, "test_accuracy": 0.6, "test_loss": 1.0, "time_s": 0.5,
               "train_time_s": 0.5},
              {"kind": "eval", "step": 10, "epoch": 1.0, "test_accuracy": 0.8, "test_loss": 0.5, "time_s": 1.0,
               "train_time_s": 1.0}]
    text = "".join(json.dumps(r) + "\n" for r in [*lines, *extra_lines])
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "config.json").write_text(json.dumps({"model": "mlp", "dataset": "digits", "global_batch_size": 32,
                                                     "workers": 1, "target_accuracy": target}))
    (run_dir / "summary.json").write_text(json.dumps({"steps": 10, "epochs": 1.0, "target_accuracy": target}))
    return run_dir


def test_report_and_predict_out_that_are_files_are_refused(tmp_path, afile, capsys):
    run = fake_run(tmp_path / "run")
    assert main(["report", str(run), "--out", str(afile)]) == 2
    one_error_line(capsys, "--out", str(afile))
    assert main(["predict", "--batch-bound", "50", "--passes-at-small-batch", "2", "--out", str(afile / "p")]) == 2
    one_error_line(capsys, "--out", str(afile), "not a directory")


# ---------------------------------------------------------------------------------------------------------
# 3: damaged metrics.jsonl


def test_non_utf8_bytes_in_metrics_name_the_line(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\x00\xff\xfe\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:13 is not UTF-8"):
        RunData.open(run).records
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2
    one_error_line(capsys, "metrics.jsonl:13", "UTF-8")
    assert main(["predict", "--from-run", str(run)]) == 2
    one_error_line(capsys, "metrics.jsonl:13", "UTF-8")


def test_only_the_last_line_is_cut_off_an_earlier_bad_line_is_damage(tmp_path):
    run = fake_run(tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([*lines, '{"kind": "st']) + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:13 is not valid JSON .*cut off mid-write"):
        RunData.open(run).records
    lines[3] = lines[3][:20]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:4 is not valid JSON .*damaged") as e:
        RunData.open(run).records
    assert "cut off" not in str(e.value).split("(only")[0]


@pytest.mark.parametrize("key,value", [("grad_sq_norm_step", "x"), ("epoch", None), ("loss", [1.0]),
                                       ("test_accuracy", "0.9")])
def test_a_string_where_a_number_goes_names_the_key(tmp_path, key, value):
    kind = "eval" if key == "test_accuracy" else "step"
    rec = {"kind": kind, "step": 11, "epoch": 1.1, key: value}
    run = fake_run(tmp_path / "run", extra_lines=[rec])
    with pytest.raises(DataError, match=rf"metrics.jsonl:13: '{key}' is .* not a number"):
        RunData.open(run).records


def test_local_sgd_flags_and_backup_ranks_pass_with_their_own_types(tmp_path):
    # what the trainer writes on a local-SGD step and on a backup-workers step
    lines = [{"kind": "step", "step": 11, "epoch": 1.1, "local_sgd": True, "averaged": False},
             {"kind": "step", "step": 12, "epoch": 1.2, "backup_used_ranks": [0, 2]}]
    run = fake_run(tmp_path / "run", extra_lines=lines)
    steps = RunData.open(run).steps
    assert steps[-2]["averaged"] is False and steps[-1]["backup_used_ranks"] == [0, 2]


@pytest.mark.parametrize("key,value,wanted", [("averaged", "yes", "a boolean"), ("local_sgd", 1, "a boolean"),
                                              ("backup_used_ranks", [0, "1"], "a list of ranks"),
                                              ("backup_used_ranks", 0, "a list of ranks")])
def test_a_flag_or_rank_list_of_the_wrong_type_names_the_key(tmp_path, key, value, wanted):
    run = fake_run(tmp_path / "run", extra_lines=[{"kind": "step", "step": 11, "epoch": 1.1, key: value}])
    with pytest.raises(DataError, match=rf"metrics.jsonl:13: '{key}' is .* not {wanted}"):
        RunData.open(run).records


def test_numbers_and_nulls_pass_and_other_kinds_are_not_checked(tmp_path):
    run = fake_run(tmp_path / "run", extra_lines=[{"kind": "step", "step": 11, "epoch": 1.1, "loss": None},
                                                  {"kind": "note", "text": "free"}])
    assert len(RunData.open(run).records) == 14


# ---------------------------------------------------------------------------------------------------------
# 4: damaged or foreign checkpoints


def small_config():
    return RunConfig(dataset="synthetic-logreg", n_train=64, dim=4, model="logreg", global_batch_size=8).to_dict()


def write_checkpoint(path, model_name):
    from scalesgd.data import load_data
    from scalesgd.user_code import build_run_model

    cfg = RunConfig(**{**small_config(), "model": model_name, "lr_milestones": ()})
    ds = load_data(cfg)
    model = build_run_model(cfg, input_shape=ds.input_shape, num_outputs=ds.num_outputs)
    torch.save({"model": model.state_dict(), "step": 3, "config": small_config()}, path)


class _Evil:
    def __reduce__(self):
        # code a weights_only load must refuse: it would create the file named by HARDEN_EVIL
        return (exec, (f"open({os.environ['HARDEN_EVIL']!r}, 'w').close()",))


@pytest.mark.parametrize("how", ["garbage", "truncated", "pickled-code", "not-a-dict", "missing-keys", "other-model"])
def test_a_bad_checkpoint_is_one_line_naming_it(tmp_path, capsys, monkeypatch, how):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "checkpoint.pt"
    if how == "garbage":
        ckpt.write_text("garbage\n")
    elif how == "truncated":
        write_checkpoint(ckpt, "logreg")
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif how == "pickled-code":
        evil = tmp_path / "evil-ran"
        monkeypatch.setenv("HARDEN_EVIL", str(evil))
        torch.save({"model": _Evil(), "step": 1, "config": {}}, ckpt)
    elif how == "not-a-dict":
        torch.save([1, 2, 3], ckpt)
    elif how == "missing-keys":
        torch.save({"model": {}, "step": 1}, ckpt)
    else:
        write_checkpoint(ckpt, "mlp")  # an mlp's weights, but the config says logreg
    assert main(["diversity", "--checkpoint", str(run)]) == 2
    line = one_error_line(capsys, str(ckpt))
    assert "weights_only" not in line and ("damaged" in line or "not a scalesgd checkpoint" in line)
    if how == "pickled-code":
        assert not (tmp_path / "evil-ran").exists()  # refused, never run
    assert not (run / "diversity_checkpoint.json").exists()


def test_a_good_checkpoint_still_loads(tmp_path):
    write_checkpoint(tmp_path / "checkpoint.pt", "logreg")
    blob = load_checkpoint(tmp_path / "checkpoint.pt")
    assert blob["step"] == 3 and set(blob["model"]) and blob["config"]["model"] == "logreg"
    with pytest.raises(DataError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------------------------------------
# 5, 6: TOML keys and values


def test_a_wrong_type_toml_value_names_the_key_and_the_file(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text('lr = "fast"\n')
    assert main([*TRAIN, "--config", str(toml)]) == 2
    one_error_line(capsys, str(toml), "key 'lr'", "--lr must be", "'fast'")
    toml.write_text("momentum = 2.0\n")  # the right kind, out of range: RunConfig's own check, still named
    assert main([*TRAIN, "--config", str(toml)]) == 2
    one_error_line(capsys, str(toml), "key 'momentum'", "--momentum must be in [0, 1)")
    assert main([*TRAIN, "--config", str(toml), "--momentum", "3"]) == 2  # the command line's value: no file
    assert str(toml) not in one_error_line(capsys, "--momentum must be in [0, 1), got 3")
    toml.write_text('progress = "false"\n')
    assert main([*TRAIN, "--config", str(toml)]) == 2
    one_error_line(capsys, str(toml), "'progress'", "true or false")


def test_a_negated_flag_as_a_toml_key_gets_the_hint(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text("no_progress = true\n")
    assert main([*TRAIN, "--config", str(toml)]) == 2
    one_error_line(capsys, "unknown key 'no_progress'", "use progress = false")
    toml.write_text("no-nesterov = true\n")
    assert main([*TRAIN, "--config", str(toml)]) == 2
    one_error_line(capsys, "unknown key 'no-nesterov'", "use nesterov = false")
    toml.write_text("no_lr = 1\n")  # not a flag: no negation hint
    assert main([*TRAIN, "--config", str(toml)]) == 2
    assert "= false" not in one_error_line(capsys, "unknown key 'no_lr'")


# ---------------------------------------------------------------------------------------------------------
# 7: predict from a run without passes to a target


@pytest.mark.parametrize("target,why", [(None, "trained without --target-accuracy"),
                                        (0.99, "never reached its target 0.99")])
def test_predict_from_a_run_without_passes_says_how_to_get_them(tmp_path, capsys, target, why):
    run = fake_run(tmp_path / "run", target=target)
    assert main(["predict", "--from-run", str(run)]) == 2
    one_error_line(capsys, why, "--target-accuracy", "--passes-at-small-batch", "--small-batch-size 32")


def test_predict_target_reads_the_passes_from_the_runs_own_evaluations(tmp_path, capsys):
    from scalesgd import perf_model as pm
    from scalesgd.predict import statistical_inputs

    run = fake_run(tmp_path / "run")  # no --target-accuracy; evaluations 0.6 at epoch 0.5, 0.8 at epoch 1.0
    bound, passes_min, how = statistical_inputs(batch_bound=None, passes_at_small_batch=None, small_batch_size=32,
                                                from_run=run, target=0.7)
    assert bound == pytest.approx(1 + 10 * 100.0 / (10 * 2.0))  # 1 + Σ tr / Σ |G|^2 of the fake steps
    # 0.7 lies half-way between the evaluations: 0.75 passes at the run's B = 32
    assert passes_min == pytest.approx(pm.passes_min_from_measurement(0.75, 32, pm.batch_crit_from_bound(bound)))
    assert "0.75 passes at B=32" in how
    assert main(["predict", "--from-run", str(run), "--target", "0.9"]) == 2
    one_error_line(capsys, "never reached its target 0.9")
    assert main(["predict", "--batch-bound", "50", "--target", "0.7"]) == 2
    one_error_line(capsys, "--target 0.7 needs --from-run")
    assert main(["predict", "--from-run", str(run), "--target", "70"]) == 2
    one_error_line(capsys, "(0, 1]")


def test_a_sweeps_damaged_status_or_cached_bound_is_not_a_traceback(tmp_path):
    from scalesgd.sweep.runner import _read_status, _Runner
    from scalesgd.sweep.spec import STATUS_FILE, spec_from_mappings

    for content in (b"\x00\xff\xfe", b"[1, 2]", b"{not json"):
        (tmp_path / STATUS_FILE).write_bytes(content)
        assert _read_status(tmp_path) == ""  # the status only says why a point stopped: unreadable is ""
    (tmp_path / STATUS_FILE).write_text(json.dumps({"status": "diverged", "message": "loss nan"}))
    assert _read_status(tmp_path) == "loss nan"
    spec = spec_from_mappings({"batch_sizes": [8], "target": 0.5}, {"dataset": "digits"}, source="test")
    runner = _Runner(spec=spec, out=tmp_path, log=print, train_missing=False)
    (tmp_path / "bounds").mkdir()
    cached = tmp_path / "bounds" / "init-r1-s0.json"
    cached.write_text(json.dumps({"batch_bound": 12.5}))
    assert runner.init_bound(1, 0) == 12.5
    for content in (b"\xff\xfe", b"{}", b"[]", b'{"batch_bound": "x"}'):
        cached.write_bytes(content)
        with pytest.raises(DataError, match="init-r1-s0.json is damaged.*delete it"):
            runner.init_bound(1, 0)
