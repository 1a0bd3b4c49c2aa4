"""bench/device_check.sh --dry-run: the accelerator check's code paths at tiny sizes on the CPU, one table out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["throughput cnn", "throughput transformer", "exact norms in-step tap cnn", "per_example_sq_norms cnn",
        "exact norms in-step tap transformer", "per_example_sq_norms transformer", "allreduce gloo P=2"]


@pytest.mark.spawn
def test_dry_run_prints_one_table_with_every_row(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    title = text.index("device check (dry run)")
    table = text[title:].splitlines()
    assert table[1].split()[:5] == ["check", "setting", "value", "reference", "ratio"]
    body = table[3:]
    for name in ROWS:
        assert sum(line.startswith(name + " ") for line in body) == 1, (name, text[title:])
    rows = {r["check"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == sorted(ROWS)
    # measured rows carry a positive ratio; the cnn norms agree with the slow loop
    for name in ("throughput cnn", "throughput transformer", "exact norms in-step tap cnn", "per_example_sq_norms cnn",
                 "allreduce gloo P=2"):
        assert rows[name]["ratio"] > 0, rows[name]
    assert "max rel diff" in rows["per_example_sq_norms cnn"]["note"]
    assert float(rows["per_example_sq_norms cnn"]["note"].rsplit(" ", 1)[1]) < 1e-4
