"""experiments/lr_rules stays runnable: its committed sweep spec, shrunk to a tiny size, runs end to end, and
every variant's runs use the learning rate its rule prescribes from the one lr tuned at the base batch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scalesgd.sweep import read_spec_file, run_sweep, spec_from_mappings

SPEC = Path(__file__).resolve().parents[1] / "experiments" / "lr_rules" / "mnist1d.toml"


def _steps(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "step"]


@pytest.mark.spawn  # the run directory records the git revision (a subprocess)
@pytest.mark.timeout(300)
def test_lr_rules_experiment_runs_tiny_and_each_rule_sets_its_lr(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALESGD_CACHE", str(tmp_path / "cache"))
    sweep, base = read_spec_file(SPEC)
    assert set(sweep["variants"]) == {"linear-warmup", "linear", "sqrt", "adascale"}
    b0 = base["base_batch_size"]
    assert sweep["tune_batch"] == b0 == min(sweep["batch_sizes"]) and sweep["stop_at_target"] is False
    # Tiny: two batch sizes, two seeds, two lrs, two passes over 256 examples; warm-up over half of one.
    sweep.update(batch_sizes=[b0, 4 * b0], seeds=[0, 1], lrs=[0.02, 0.04], target=0.15)
    sweep["variants"]["linear-warmup"]["warmup_epochs"] = 0.5
    base.update(n_train=256, epochs=2, width=32, eval_train_examples=100)
    spec = spec_from_mappings(sweep, base, source=str(SPEC))
    out = tmp_path / "sweep"
    lines: list[str] = []
    result, report = run_sweep(spec, out, log=lines.append)

    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2 + 4 * 2 * 2  # the tuning runs at B0 on [base], then every variant, B and seed
    lr0 = result.chosen_lr[(1, 1, b0, "")]
    assert lr0 in (0.02, 0.04) and {result.chosen_lr[g.key] for g in result.groups} == {lr0}
    text = report.read_text()
    for name in ("linear-warmup", "linear", "sqrt", "adascale"):
        assert f"## {name}\n" in text
    assert "final_accuracy.png" in text and (out / "final_accuracy.png").stat().st_size > 1000
    assert "every run trains the whole budget" in text

    b = 4 * b0
    for variant, factor in (("linear", b / b0), ("sqrt", math.sqrt(b / b0))):
        steps = _steps(out / "runs" / f"{variant}-B{b}-P1-lr{lr0:g}-s0-r1")
        assert [s["lr"] for s in steps] == pytest.approx([lr0 * factor] * len(steps))
        assert steps[-1]["epoch"] == pytest.approx(2.0)  # the whole budget, whatever the target
    warm = _steps(out / "runs" / f"linear-warmup-B{b}-P1-lr{lr0:g}-s0-r1")
    # Goyal's ramp: from η0 (a tenth of 4η0 would be lower still: the ramp starts at min(1, k/10)·η0) to 4η0.
    assert warm[0]["lr"] == pytest.approx(lr0 * 0.4) and warm[-1]["lr"] == pytest.approx(4 * lr0)
    assert all(a["lr"] <= c["lr"] for a, c in zip(warm, warm[1:]))
    # AdaScale: η0·r with r = S(B_noise + B0)/(B_noise + B), B_noise = tr Σ/‖G‖² from the estimate the trainer
    # held before the step (logged on the previous step's line).
    ada = _steps(out / "runs" / f"adascale-B{b}-P1-lr{lr0:g}-s0-r1")
    checked = 0
    for prev, step in zip(ada, ada[1:]):
        g2, tr = prev.get("grad_sq_norm_est"), prev.get("trace_cov_est")
        if g2 is None or tr is None or not (g2 > 0 and tr > 0):
            continue
        noise = tr / g2
        gain = (b / b0) * (noise + b0) / (noise + b)
        assert step["lr"] == pytest.approx(lr0 * gain, rel=1e-9) and 1 <= gain <= b / b0
        checked += 1
    assert checked >= 5
    # At B0 every rule's factor is 1 (no warm-up at B0 for the rules without one): those runs are the base run.
    base_run = _steps(out / "runs" / f"B{b0}-P1-lr{lr0:g}-s0-r1")
    for variant in ("linear", "sqrt", "adascale"):
        same = _steps(out / "runs" / f"{variant}-B{b0}-P1-lr{lr0:g}-s0-r1")
        assert [s["loss"] for s in same] == [s["loss"] for s in base_run]
