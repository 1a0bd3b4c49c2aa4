"""bench/soak.py, shortened: a few seconds of training with a worker killed -9 every 3-5 s; every kill is
followed by a restart and the stopped run's parameters equal (torch.equal) an uninterrupted run of as many
steps with the same seed."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_a_short_soak_restarts_after_every_kill_and_ends_bit_identical():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.2", "--kill-every", "3:5",
                           "--checkpoint-every-steps", "50"], capture_output=True, text=True, timeout=540)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    kills = re.findall(r"^kill \d+ at .* first new step ([0-9.]+) s later", out, re.M)
    restarts = int(re.search(r"^restarts: (\d+) \(kills: (\d+)\)", out, re.M).group(1))
    assert len(kills) >= 1 and restarts == len(kills), out
    assert re.search(r"^steps completed: [1-9]\d*$", out, re.M), out
    assert "equal the uninterrupted reference" in out and ": yes (torch.equal" in out, out
    assert out.strip().splitlines()[-1].startswith("verdict: PASS"), out
