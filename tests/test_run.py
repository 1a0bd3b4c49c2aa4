"""End to end through the trainer (2 gloo workers, digits + MLP): AdaScale's lr follows the logged estimates,
exact diversity lines come at the asked steps and agree with the saved checkpoint, and the diversity policy
changes the batch mid-run without repeating an example within an epoch. One spawned run serves them all."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scalesgd.config import RunConfig
from scalesgd.data import load_data
from scalesgd.diversity import gradient_diversity
from scalesgd.models import build_model, loss_function
from scalesgd.run import train
from scalesgd.train_state import TrainState

pytestmark = pytest.mark.spawn  # every test here reads one shared 2-worker training run

START_BATCH, STEPS, EVERY, LR = 16, 130, 13, 0.05


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "adaptive"
    cfg = RunConfig(dataset="digits", model="mlp", width=32, global_batch_size=START_BATCH, steps=STEPS, lr=LR,
                    lr_schedule="constant", lr_rule="adascale", batch_policy="diversity", delta=2.0,
                    diversity="cheap", exact_diversity_every=EVERY, workers=2, eval_every=1000,
                    eval_train_examples=64, progress=False, threads_per_worker=1, timeout_s=120,
                    run_dir=str(run_dir), seed=1)
    summary = train(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, summary, records


def _steps(records):
    return [r for r in records if r["kind"] == "step"]


def _adascale_gain(g2: float, tr: float, batch: int, base_batch: int) -> float:
    """AdaScale's r = (σ² + ‖G‖²)/(σ²/S + ‖G‖²), σ² = tr Σ / B₀, S = B/B₀ (Johnson et al. 2020), written out
    here (not lr_rules.adascale_gain): negative estimates clamped to 0, r clipped to [min(1, S), max(1, S)]."""
    s = batch / base_batch
    var, sqr = max(tr, 0.0) / base_batch, max(g2, 0.0)
    return min(max((var + sqr) / (var / s + sqr), min(1.0, s)), max(1.0, s))


@pytest.mark.timeout(300)
def test_diversity_policy_changes_the_batch_and_never_repeats_an_example(run):
    cfg, summary, records = run
    changes = [r for r in records if r["kind"] == "batch_change"]
    assert changes and all(c["reason"] for c in changes) and changes[0]["from"] == START_BATCH
    steps = _steps(records)
    by_step = {r["step"]: r for r in steps}
    n = load_data(cfg).n_train
    for c, nxt in zip(changes, changes[1:] + [None]):
        # The change applies from the next step on (whose line carries step + 1) until the next change; only
        # an epoch's last batch may be smaller (what is left of the epoch).
        last = nxt["step"] if nxt else STEPS
        for k in range(c["step"] + 1, last + 1):
            r = by_step[k]
            assert r["global_batch_size"] == c["to"] or (r["global_batch_size"] < c["to"] and r["epoch"] % 1 == 0)
            assert r["local_batch_size"] == r["global_batch_size"] // 2
    assert len({r["global_batch_size"] for r in steps}) > 1 and summary["steps"] == STEPS
    # Each epoch is one permutation consumed front to back: the examples seen equal epoch·n at every step,
    # so no batch wraps past an epoch's end and none is repeated within it, whatever the batch sizes.
    seen = 0
    for r in steps:
        seen += r["global_batch_size"]
        assert seen == pytest.approx(r["epoch"] * n, abs=1e-6)
    assert seen == summary["examples"]


@pytest.mark.timeout(300)
def test_adascale_lr_is_base_lr_times_the_gain_of_the_logged_estimates(run):
    cfg, _, records = run
    batch, previous, grown = START_BATCH, None, False
    for r in records:
        if r["kind"] == "batch_change":
            batch = r["to"]
        if r["kind"] != "step":
            continue
        gain = 1.0 if previous is None else _adascale_gain(previous["grad_sq_norm_est"], previous["trace_cov_est"],
                                                          batch, START_BATCH)
        assert r["lr"] == pytest.approx(LR * gain, rel=1e-9) and r["adascale_gain"] == pytest.approx(gain, rel=1e-9)
        grown |= batch > START_BATCH and gain > 1.01
        previous = r
    assert grown  # the test saw the gain act, not only r = 1 at the base batch


@pytest.mark.timeout(300)
def test_exact_diversity_lines_at_every_k_steps_and_the_last_agrees_with_the_checkpoint(run):
    cfg, summary, records = run
    lines = [r for r in records if r["kind"] == "diversity"]
    assert [r["step"] for r in lines] == list(range(0, STEPS + 1, EVERY))
    assert lines[0]["batch_bound_est"] is None and all(math.isfinite(r["batch_bound_est"]) for r in lines[1:])
    assert all(r["batch_bound"] == pytest.approx(r["b_simple"] + 1) for r in lines)
    ckpt = torch.load(f"{summary['run_dir']}/checkpoint.pt", weights_only=True)
    assert ckpt["step"] == STEPS
    ds = load_data(cfg)
    model = build_model(cfg.model, input_shape=ds.input_shape, num_outputs=ds.num_outputs, seed=0, width=cfg.width)
    model.load_state_dict(ckpt["model"])
    model.train()
    stats = gradient_diversity(model, loss_function(ds.task, "none"), ds.x_train, ds.y_train)
    assert lines[-1]["batch_bound"] == pytest.approx(stats.batch_bound, rel=1e-4)
    assert lines[-1]["delta"] == pytest.approx(stats.delta, rel=1e-4)
    # The saved TrainState is the run's end state and reads back as written.
    state = TrainState.from_checkpoint(ckpt["train_state"])
    assert state.step == STEPS and state.examples == summary["examples"]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(state.params, flat)
    assert state.global_batch_size == [r for r in records if r["kind"] == "batch_change"][-1]["to"]
    again = state.to_checkpoint()
    assert all(torch.equal(again[k], ckpt["train_state"][k]) if isinstance(again[k], torch.Tensor)
               else again[k] == ckpt["train_state"][k] for k in ("params", "torch_rng_state", "step", "policy",
                                                                 "noise_ema", "cursor", "global_batch_size"))
