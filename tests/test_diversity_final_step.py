"""``scalesgd diversity --every k`` measures the final step too when the run's length is not a multiple of k."""

from __future__ import annotations

import json

import pytest

from scalesgd.cli import main


@pytest.mark.spawn  # env.json asks git
@pytest.mark.timeout(200)
def test_the_final_step_is_measured_whatever_every_is(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["diversity", "--dataset", "digits", "--model", "mlp", "--width", "16", "--workers", "1",
                 "--steps", "13", "--every", "5", "--global-batch-size", "32", "--diversity", "cheap",
                 "--no-progress", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    measured = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "diversity"]
    assert [r["step"] for r in measured] == [0, 5, 10, 13]
    assert measured[-1]["batch_bound_est"] > 0  # the online estimate beside it, at the same step
    table = [s.split() for s in out.splitlines() if s.split()[:1] in (["0"], ["5"], ["10"], ["13"])]
    assert [int(row[0]) for row in table] == [0, 5, 10, 13]
    # the last row is the final model's: the saved checkpoint, measured independently, agrees
    assert main(["diversity", "--checkpoint", str(run)]) == 0
    at_ckpt = json.loads((run / "diversity_checkpoint.json").read_text())
    assert at_ckpt["step"] == 13
    assert at_ckpt["batch_bound"] == pytest.approx(measured[-1]["batch_bound"], rel=1e-4)
