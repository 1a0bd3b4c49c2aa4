"""Smoke test of bench/throughput.py --loop: the two training loops alternate on the same two processes, and the
per-step wall and CPU times and their paired ratios come out for every batch (tiny sizes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_loop_mode_prints_and_saves_a_ratio_per_batch(tmp_path):
    out = tmp_path / "loop.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--loop", "--tasks", "digits-mlp", "--batches", "32", "64",
                           "--steps", "4", "--repeats", "1", "--batch-policy", "goodput", "--json", str(out)],
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("loop digits-mlp")]
    assert [line.split()[2] for line in lines] == ["B=32", "B=64"]
    results = json.loads(out.read_text())
    assert sorted(results) == ["digits-mlp B=32", "digits-mlp B=64"]
    for r in results.values():
        assert r["batch_policy"] == "goodput" and r["steps"] == 4 and r["workers"] == 2
        assert all(math.isfinite(r[k]) for k in ("ours_cpu_s", "ddp_cpu_s", "ours_wall_s", "ddp_wall_s"))
        assert r["cpu_ratio"] is None or r["cpu_ratio"] > 0  # None: no pair with both differences positive
        # every rank ran both loops once at both lengths: one steady per-step time and one set-up each
        assert all(len(rank[key]) == 1 for rank in r["per_rank"] for key in ("ours_cpu", "ddp_cpu", "ours_setup_wall"))
