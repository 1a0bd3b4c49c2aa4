"""Bad input: one clear line on stderr naming the problem and the fix, a non-zero exit, no traceback,
and nothing half-written."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys

import pytest

from scalesgd.cli import main


def _idx_dir(tmp_path, *, magic=0x00000803, truncate=False, train_labels=(0, 1, 2, 3), rows=28, cols=28,
             header=None):
    """Four IDX files of n = 4 examples; ``train_labels``, ``rows`` x ``cols`` and ``header`` (the training
    images' three header dimensions, whatever the data) make them hostile."""
    d = tmp_path / "idx"
    d.mkdir()
    n = 4
    images = struct.pack(">IIII", magic, n, rows, cols) + bytes(range(256)) * ((n * rows * cols) // 256 + 1)
    images = images[: 16 + n * rows * cols]
    if truncate:
        images = images[: len(images) // 2]
    for prefix, labels in (("train", train_labels), ("t10k", (0, 1, 2, 3))):
        head = struct.pack(">IIII", magic, *header) if header is not None and prefix == "train" else images[:16]
        (d / f"{prefix}-images-idx3-ubyte").write_bytes(head + images[16:])
        (d / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x00000801, n) + bytes(labels))
    return d


def _toml(tmp_path, text):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return p


# (case name, argv builder, words the message must contain)
CASES = [
    ("unknown data set", lambda t: ["--dataset", "imagenet"], ["imagenet", "mnist1d"]),
    ("unknown model", lambda t: ["--model", "resnet"], ["resnet", "mlp"]),
    # a user's model file without its function: the refusal listed only the built-in names, not the
    # MODULE:FUNCTION form the file needs
    ("own model without its function", lambda t: ["--model", "examples/own.py"],
     ["examples/own.py", "mlp", "MODULE:FUNCTION", "examples/own.py:make_model"]),
    ("own data without its function", lambda t: ["--dataset", "examples/own.py"],
     ["examples/own.py", "digits", "MODULE:FUNCTION", "examples/own.py:make_data"]),
    ("missing data file", lambda t: ["--dataset", f"idx:{t / 'nowhere'}"], ["nowhere"]),
    ("truncated data file", lambda t: ["--dataset", f"idx:{_idx_dir(t, truncate=True)}", "--model", "mlp"],
     ["truncated"]),
    ("wrong magic number", lambda t: ["--dataset", f"idx:{_idx_dir(t, magic=0x1234)}", "--model", "mlp"],
     ["magic"]),
    # a 250 among digit labels built a 251-class model
    ("label out of range", lambda t: ["--dataset", f"idx:{_idx_dir(t, train_labels=(0, 1, 250, 3))}", "--model",
                                      "mlp"], ["train-labels-idx1-ubyte", "label 250 at index 2", "0..9",
                                               "download it again"]),
    # 12x0 images "trained" and exited 0
    ("images of zero pixels", lambda t: ["--dataset", f"idx:{_idx_dir(t, rows=12, cols=0)}", "--model", "mlp"],
     ["train-images-idx3-ubyte", "12x0", "download the file again"]),
    # dimensions whose product overflows int64 were a ValueError traceback: 27283913 * 1640088 * 824472 is
    # 2 * 2^64 + 3136, which wrapped to the 3136 pixel bytes the file really holds
    ("header dimensions overflow", lambda t: ["--dataset", f"idx:{_idx_dir(t, header=(27283913, 1640088, 824472))}",
                                              "--model", "mlp"],
     ["train-images-idx3-ubyte", "(27283913, 1640088, 824472)", "file has 3152", "download it again"]),
    ("header dimensions at the limit", lambda t: ["--dataset", f"idx:{_idx_dir(t, header=(2**32 - 1,) * 3)}",
                                                  "--model", "mlp"],
     ["train-images-idx3-ubyte", "(4294967295, 4294967295, 4294967295)", "download it again"]),
    ("header dimensions exceed the file", lambda t: ["--dataset", f"idx:{_idx_dir(t, header=(4, 28, 29))}",
                                                     "--model", "mlp"],
     ["train-images-idx3-ubyte", "(4, 28, 29)", "3264 bytes", "file has 3152", "download it again"]),
    ("batch smaller than workers", lambda t: ["--global-batch-size", "1", "--workers", "2"],
     ["--global-batch-size", "workers"]),
    ("batch larger than data", lambda t: ["--dataset", "digits", "--model", "mlp", "--global-batch-size", "100000"],
     ["larger than the training set"]),
    ("non-positive lr", lambda t: ["--lr", "0"], ["--lr", "positive"]),
    ("negative lr", lambda t: ["--lr", "-0.1"], ["--lr", "positive"]),
    ("unknown comm", lambda t: ["--comm", "carrier-pigeon"], ["carrier-pigeon", "allreduce"]),
    ("socket ring on GPUs", lambda t: ["--comm", "ring-tcp", "--backend", "nccl"], ["ring-tcp", "nccl"]),
    ("bad toml key", lambda t: ["--config", str(_toml(t, "learning_rate = 0.1\n"))], ["learning_rate"]),
    ("broken toml", lambda t: ["--config", str(_toml(t, "lr = = 1\n"))], ["TOML"]),
    ("missing toml", lambda t: ["--config", str(t / "absent.toml")], ["not found"]),
    ("step schedule without milestones", lambda t: ["--lr-schedule", "step"], ["--lr-milestones"]),
    ("bad batch schedule", lambda t: ["--batch-policy", "schedule", "--batch-schedule", "5:x"], ["schedule"]),
    ("target accuracy as percent", lambda t: ["--target-accuracy", "94"], ["fraction"]),
    # goodput (train's default) clips to --max-batch: below P the workers started, wrote a run directory and
    # failed in the policy with "max_batch=1 ..."
    ("max batch below workers", lambda t: ["--max-batch", "1", "--workers", "2"], ["--max-batch 1", "--workers 2"]),
    # under goodput (train's default) the per-example gradients are sized for the largest batch it may choose (the
    # training set): the advice said "a smaller batch", which the user's --global-batch-size 128 already was
    ("per-example quantization under goodput", lambda t: ["--example-qsgd-levels", "4"],
     ["--example-qsgd-levels", "--max-batch", "--batch-policy goodput may grow the global batch to",
      "--batch-policy fixed"]),
]


@pytest.mark.parametrize("name,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(tmp_path, capsys, name, argv, words):
    run_dir = tmp_path / "run"
    args = argv(tmp_path)
    if "--workers" not in args:
        args += ["--workers", "1"]
    code = main(["train", *args, "--run-dir", str(run_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("scalesgd: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert not run_dir.exists(), "nothing may be written for bad input"


def _run_cli(args, tmp_path, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "scalesgd", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=tmp_path)


@pytest.mark.spawn
@pytest.mark.timeout(150)
def test_divergence_stops_names_step_and_keeps_metrics(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run_cli(["--dataset", "synthetic-linreg", "--model", "logreg", "--lr", "1e6", "--workers", "2",
                     "--global-batch-size", "32", "--epochs", "1", "--momentum", "0", "--no-progress",
                     "--run-dir", str(run_dir)], tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "at step" in lines[0] and "--lr" in lines[0] and "Lower the learning rate" in lines[0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["loss"] is None  # the non-finite loss is recorded as null
    assert not (run_dir / "summary.json").exists()
    assert not (run_dir / "checkpoint.pt").exists()


@pytest.mark.spawn
@pytest.mark.timeout(60)
def test_port_in_use(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        run_dir = tmp_path / "run"
        proc = _run_cli(["--dataset", "digits", "--model", "mlp", "--workers", "2", "--steps", "2",
                         "--master-port", str(port), "--no-progress", "--run-dir", str(run_dir)], tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(port) in lines[0] and "in use" in lines[0] and "--master-port" in lines[0]
    assert not run_dir.exists()


def test_gzip_idx_corrupt(tmp_path, capsys):
    d = _idx_dir(tmp_path)
    (d / "train-images-idx3-ubyte").unlink()
    (d / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    code = main(["train", "--dataset", f"idx:{d}", "--model", "mlp", "--workers", "1", "--no-progress",
                 "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.spawn
def test_run_dir_that_already_holds_a_run_is_refused_and_left_as_it_was(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--model", "mlp", "--workers", "1", "--steps", "3",
            "--run-dir", str(run_dir), "--no-progress"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert "metrics.jsonl" in before
    capsys.readouterr()
    code = main(argv)  # again, into the same directory
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("scalesgd: error:"), err
    assert "already holds a run" in lines[0] and "metrics.jsonl" in lines[0] and "--run-dir" in lines[0]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # the old run is intact


# `scalesgd diversity --every 0` trained, measured nothing exact and plotted an empty diversity.png with exit 0;
# --every -3 was refused under another option's name (--exact-diversity-every), which the user never typed
@pytest.mark.parametrize("every", ["0", "-3"])
def test_diversity_every_must_be_positive(tmp_path, capsys, every):
    run_dir = tmp_path / "run"
    code = main(["diversity", "--every", every, "--dataset", "digits", "--model", "mlp", "--steps", "2",
                 "--workers", "1", "--run-dir", str(run_dir), "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("scalesgd: error:"), err
    assert f"--every {every}" in lines[0] and "positive" in lines[0] and "--every 100" in lines[0], err
    assert not run_dir.exists(), "nothing may be written for bad input"
