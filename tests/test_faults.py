"""Issue 17: faults found by trying other projects' bug reports on scalesgd, one test per kind of fault."""

from __future__ import annotations

import dataclasses

import pytest

from scalesgd.cli import main
from scalesgd.config import RunConfig, _field_kind


def _one_error_line(capsys, argv, tmp_path, *, own_options=True):
    """Run the CLI in-process; assert exit 2, exactly one ``scalesgd: error:`` line and no traceback.

    ``own_options``: add ``--run-dir``/``--no-progress`` (off when the case sets them itself, in its file)."""
    run_dir = tmp_path / "run"
    code = main([*argv, *(["--run-dir", str(run_dir), "--no-progress"] if own_options else [])])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (code, captured.err)
    assert len(lines) == 1 and lines[0].startswith("scalesgd: error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not run_dir.exists()
    return lines[0]


# --- 12. every RunConfig option: bad type, non-finite number, out of range -> one line, exit 2 ----------------

# TOML literals of the wrong kind for each kind of field.
_WRONG_KIND = {
    bool: ['"false"', '"true"', "1", "0"],
    int: ['"3"', "true", "2.5", "2.0", "nan"],
    float: ['"0.1"', "true", "nan", "inf", "-inf"],
    str: ["5", "true", "[1, 2]"],
    tuple: ['"abc"', '["a"]', "[nan]", "5"],
    dict: ["5"],
}
# Values of the right kind but outside the option's range (TOML literals).
_OUT_OF_RANGE = {
    "n_train": ["0", "-5"], "dim": ["0"], "noise": ["-0.1"], "replicate": ["0"], "data_seed": ["-1"],
    "width": ["0"], "depth": ["0"], "dropout": ["1.0", "-0.1"], "norm": ['"batch"'], "model": ['"resnet"'],
    "global_batch_size": ["0", "-1"], "lr": ["0", "-0.1"], "momentum": ["1.0", "-0.5"],
    "weight_decay": ["-1e-4"], "lr_schedule": ['"linear"'], "lr_milestones": ["[0]", "[5, 3]", "[-1]"],
    "lr_gamma": ["0", "1.5"], "lr_rule": ['"cubic"'], "warmup_epochs": ["-1"], "base_batch_size": ["0"],
    "langevin_noise": ["-1"], "batch_policy": ['"random"'], "delta": ["0", "-1"], "min_batch": ["0"],
    "max_batch": ["0"], "epochs": ["0", "-2"], "steps": ["0"], "target_accuracy": ["0", "1.5", "94"],
    "target_metric": ['"loss"'], "eval_every": ["0"], "eval_train_examples": ["-1"], "diversity": ['"full"'],
    "diversity_decay": ["0", "1"], "exact_diversity_every": ["-1"], "workers": ["0"], "backend": ['"mpi"'],
    "comm": ['"pigeon"'], "qsgd_levels": ["0", "128"], "master_port": ["0", "70000"],
    "threads_per_worker": ["0"], "timeout_s": ["0", "0.001", "-5"], "check_replicas_every": ["-1"],
    "seed": ["-1"], "batch_schedule": ['"5:x"'],
}
_NO_RANGE = {"dataset", "master_addr", "run_dir", "progress", "nesterov", "extra"}  # checked elsewhere / any value
_CASES = []
for _f in dataclasses.fields(RunConfig):
    if _f.name == "extra":  # not a TOML key (free-form tags)
        continue
    _kind, _ = _field_kind(_f.type)
    _CASES += [(_f.name, v, "kind") for v in _WRONG_KIND[_kind]]
    _CASES += [(_f.name, v, "range") for v in _OUT_OF_RANGE.get(_f.name, [])]


def test_the_table_covers_every_option():
    names = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(_OUT_OF_RANGE) | _NO_RANGE == names, sorted(names - set(_OUT_OF_RANGE) - _NO_RANGE)


@pytest.mark.parametrize("name,value,what", _CASES, ids=[f"{n}={v}" for n, v, _ in _CASES])
def test_every_bad_option_value_is_one_line_and_exit_2(tmp_path, capsys, name, value, what):
    extra = ""
    if name == "nesterov":
        extra = "momentum = 0.9\n"
    if name == "min_batch" or name == "max_batch":
        extra = "batch_policy = \"diversity\"\n"
    if name == "batch_schedule":
        extra = "batch_policy = \"schedule\"\n"
    if name == "lr_milestones":
        extra = "lr_schedule = \"step\"\n"
    # The run directory and progress bar go in the file too: a command-line option would override the value
    # under test (and a case that slipped through would train a whole default run).
    for key, default in (("run_dir", f'"{tmp_path / "run"}"'), ("progress", "false")):
        if key != name:
            extra += f"{key} = {default}\n"
    toml = tmp_path / "bad.toml"
    toml.write_text(f"{extra}{name.replace('_', '-')} = {value}\n")
    line = _one_error_line(capsys, ["train", "--config", str(toml)], tmp_path, own_options=False)
    assert f"--{name.replace('_', '-')}" in line, line


def test_a_quoted_false_does_not_turn_nesterov_on(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text('nesterov = "false"\n')
    line = _one_error_line(capsys, ["train", "--config", str(toml)], tmp_path)
    assert "true or false" in line and "'false'" in line
    toml.write_text("nesterov = false\nlr = 1\nlr-milestones = \"5,8\"\n")  # the right kinds are taken
    from scalesgd.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(toml)]))
    assert cfg.nesterov is False and cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.lr_milestones == (5.0, 8.0)


@pytest.mark.parametrize("argv,words", [
    (["--weight-decay", "nan"], ["--weight-decay", "finite"]),
    (["--langevin-noise", "inf"], ["--langevin-noise", "finite"]),
    (["--lr", "nan"], ["--lr"]),
    (["--timeout-s", "0.001"], ["--timeout-s", "at least"]),
    (["--dataset", "digits", "--model", "mlp", "--steps", "1", "--workers", "2", "--master-addr", "192.0.2.1"],
     ["--master-addr", "192.0.2.1", "not an address of this machine"]),
    (["--dataset", "digits", "--model", "mlp", "--steps", "1", "--workers", "2", "--master-addr", "no.such.host."],
     ["--master-addr", "does not resolve"]),
], ids=["weight-decay-nan", "langevin-inf", "lr-nan", "timeout-tiny", "master-addr-unreachable", "master-addr-unknown"])
def test_bad_command_line_values_are_one_line(tmp_path, capsys, argv, words):
    line = _one_error_line(capsys, ["train", *argv], tmp_path)
    for w in words:
        assert w in line, line
