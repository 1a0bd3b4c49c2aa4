"""experiments/mechanisms/mechanisms.py stays runnable: its core at tiny size (``--quick``), and its pieces."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "mechanisms" / "mechanisms.py"


@pytest.fixture(scope="module")
def mech(load_script):
    with load_script(SCRIPT, "mechanisms_experiment") as module:
        yield module



def test_quick_run_writes_the_report_and_its_checks_hold(mech, tmp_path):
    r = mech.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    assert (tmp_path / "gain_cost.png").stat().st_size > 0 and (tmp_path / "predicted.png").stat().st_size > 0
    labels = [m.label for m in r["mechs"]]
    assert {m.kind for m in r["mechs"]} == {"plain", "dropout", "langevin", "example-gauss", "example-qsgd", "qsgd"}
    for label in labels:
        assert f"| {label} |" in text
    plain = r["ckpt"]["plain"][0]
    assert plain["bs_ghost"] == pytest.approx(plain["bs"], rel=1e-3)  # ghost norms against torch.func
    # every mechanism raises the diversity at the same weights; the per-example Gaussian most, as predicted
    for label in labels[1:]:
        c = r["ckpt"][label][0]
        assert c["bs"] == pytest.approx(plain["bs"], rel=1e-6) and c["measured"] > c["bs"]
    gauss = next(c for k, c in r["ckpt"].items() if k.startswith("example-gauss"))[0]
    assert gauss["measured"] == pytest.approx(gauss["predicted"], rel=0.1)
    qsgd = next(c for k, c in r["ckpt"].items() if k.startswith("example-qsgd"))[0]
    assert qsgd["measured"] == pytest.approx(qsgd["predicted"], rel=0.1)
    assert r["p2"] < 1e-6  # dropout: two shards draw what one worker draws


def test_step_level_bound_of_the_plain_step_is_b_s(mech):
    """With batches drawn with replacement, 1 + B·E‖G_B − ∇F‖²/‖∇F‖² = B_S: the step-level measure agrees with the
    data-set one on plain SGD (many draws; loose tolerance for the draws' noise)."""
    data = mech.load()
    model = mech.build(8, 0)
    rows = mech._rows(model, data)
    full = rows.mean(0)
    g2 = float(full.square().sum())
    bs = float(rows.square().sum(1).mean()) / g2
    flat = mech.FlatModel(model, 1, torch.device("cpu"))
    measured, predicted = mech.step_level_bound(flat, mech.Mechanism("plain"), data, full, bs, batch=32, lr=0.5,
                                                draws=300, seed=0)
    assert predicted == pytest.approx(bs) and measured == pytest.approx(bs, rel=0.15)


def test_table_cells_and_cross_term(mech):
    assert mech._cross_sq([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])]) == pytest.approx(3.0)
    assert mech._ms([1.0, math.inf], cap=40.0) == "≥ 20.5 ± 19.5 (1/2 not reached)"
    assert mech._ms([math.inf]) == "not reached (1/1)" and mech._ms([2.0, 4.0]) == "3.00 ± 1.00"
