"""End to end through the trainer with ``--batch-policy goodput --lr auto`` (2 gloo workers, digits + MLP, one
spawned run shared by the assertions): the range test's trials and choice are logged and keep to their cost budget (5% of the
run's estimated time), the batch changes with a logged reason, the lr is the found base rate times the AdaScale gain
of the logged estimates, no example repeats within an epoch, and the goodput state is checkpointed. Plus the
configuration rules of the two options (no spawn)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scalesgd.cli import build_parser, config_from_args
from scalesgd.config import RunConfig
from scalesgd.data import load_data
from scalesgd.errors import ConfigError, DivergedError
from scalesgd.goodput import GoodputState
from scalesgd.lr_rules import LrConfig
from scalesgd.lr_probe import LR_PROBE_BUDGET
from scalesgd.run import train
from scalesgd.train_state import TrainState

START_BATCH, EPOCHS = 32, 12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "goodput"
    cfg = RunConfig(dataset="digits", model="mlp", width=32, global_batch_size=START_BATCH, epochs=EPOCHS, lr="auto",
                    lr_schedule="constant", batch_policy="goodput", workers=2, eval_every=100_000,
                    eval_train_examples=64, progress=False, threads_per_worker=1, timeout_s=120, run_dir=str(run_dir),
                    seed=1)
    summary = train(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, summary, records


def _assert_probe_kept_its_budget(auto: dict, probes: list[dict]) -> None:
    """The probe's stopping rule, checked from its log rather than by a clock: no trial started once the cost so
    far plus its longest trial would pass the budget. So its cost can pass the budget only by what lies outside
    that prediction: the set-up and final exchange outside the trials, and the last trial's excess over the
    longest before it. (A wall-time share of 5% is a bench figure; on a tiny run one scheduler stall passes it.)"""
    assert auto["budget_s"] == pytest.approx(LR_PROBE_BUDGET * auto["estimated_run_s"])
    times = [p["trial_s"] for p in probes]
    outside = auto["probe_s"] - sum(times)
    excess = max(0.0, times[-1] - max(times[:-1])) if len(times) > 1 else times[0]
    assert auto["cost_s"] <= auto["budget_s"] + outside + excess + 1e-9


def _assert_trials_continue_from_the_kept_ones(probes: list[dict]) -> None:
    """A kept (stable or flat) trial's loss after is the next trial's loss before; an undone one (rose or
    diverged) leaves the loss before as it was: the state was restored."""
    before = probes[0]["loss_before"]
    for p in probes:
        assert p["loss_before"] == before and p["kept"] == (p["verdict"] in ("stable", "flat"))
        if p["kept"]:
            before = p["loss_after"]


def _adascale_gain(g2: float, tr: float, batch: int, base_batch: int) -> float:
    """AdaScale's r = (σ² + ‖G‖²)/(σ²/S + ‖G‖²), σ² = tr Σ / B₀, S = B/B₀ (Johnson et al. 2020), written out
    here: negative estimates clamped to 0, r clipped to [min(1, S), max(1, S)]."""
    s = batch / base_batch
    var, sqr = max(tr, 0.0) / base_batch, max(g2, 0.0)
    return min(max((var + sqr) / (var / s + sqr), min(1.0, s)), max(1.0, s))


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_lr_auto_logs_its_trials_and_choice_and_keeps_to_its_cost_budget(run):
    cfg, summary, records = run
    probes = [r for r in records if r["kind"] == "lr_probe"]
    (auto,) = [r for r in records if r["kind"] == "lr_auto"]
    assert probes and [p["trial"] for p in probes] == list(range(1, len(probes) + 1)) == list(range(1, auto["trials"] + 1))
    assert all(p["verdict"] in ("stable", "flat", "rose", "diverged") and p["lr"] > 0 for p in probes)
    _assert_trials_continue_from_the_kept_ones(probes)
    assert math.isfinite(auto["lr"]) and auto["lr"] > 0 and auto["reason"]
    # The probe counts in the run's clock, and its cost (all but the kept trials' training steps) keeps to its
    # budget of the run's estimated time (the run at its starting batch) by its stopping rule.
    assert auto["cost_s"] == pytest.approx(auto["probe_s"] - auto["kept_s"]) and 0 <= auto["kept_s"] < auto["probe_s"]
    _assert_probe_kept_its_budget(auto, probes)
    assert auto["kept_examples"] == START_BATCH * probes[0]["steps"] * sum(p["kept"] for p in probes)
    assert summary["train_time_s"] >= auto["probe_s"]
    # It all came before the first training step.
    first_step = next(i for i, r in enumerate(records) if r["kind"] == "step")
    assert records.index(auto) < first_step
    assert summary["final_test_accuracy"] >= 0.85  # digits: chance is 0.1


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_goodput_changes_the_batch_with_a_reason_and_the_lr_follows_the_adascale_gain(run):
    cfg, summary, records = run
    changes = [r for r in records if r["kind"] == "batch_change"]
    assert changes and changes[0]["from"] == START_BATCH
    assert all(c["reason"].startswith(("grow: goodput", "shrink: goodput")) and c["to"] % 2 == 0 for c in changes)
    (auto,) = [r for r in records if r["kind"] == "lr_auto"]
    batch, previous, scaled = START_BATCH, None, False
    for r in records:
        if r["kind"] == "batch_change":
            batch = r["to"]
        if r["kind"] != "step":
            continue
        gain = 1.0 if previous is None else _adascale_gain(previous["grad_sq_norm_est"], previous["trace_cov_est"],
                                                          batch, START_BATCH)
        assert r["lr"] == pytest.approx(auto["lr"] * gain, rel=1e-9)
        assert r["adascale_gain"] == pytest.approx(gain, rel=1e-9)
        scaled |= batch != START_BATCH and abs(gain - 1) > 0.01
        previous = r
    assert scaled  # the gain acted on a changed batch
    # Each epoch is one permutation consumed front to back: examples seen = epoch * n at every step.
    n, seen = load_data(cfg).n_train, 0
    for r in records:
        if r["kind"] == "step":
            seen += r["global_batch_size"]
            assert seen == pytest.approx(r["epoch"] * n, abs=1e-6)
    assert seen == summary["examples"] == EPOCHS * n


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_goodput_state_and_found_lr_are_checkpointed(run):
    cfg, summary, records = run
    ckpt = torch.load(f"{summary['run_dir']}/checkpoint.pt", weights_only=True)
    state = TrainState.from_checkpoint(ckpt["train_state"])
    assert isinstance(state.policy, GoodputState) and state.policy.n_changes == len(
        [r for r in records if r["kind"] == "batch_change"])
    assert state.policy.base_batch_size == START_BATCH and state.policy.times.bins
    assert state.base_lr == [r for r in records if r["kind"] == "lr_auto"][0]["lr"]
    assert state.to_checkpoint()["policy"] == ckpt["train_state"]["policy"]


@pytest.mark.spawn  # the run directory's env.json asks git for the commit
@pytest.mark.timeout(600)
def test_a_too_large_lr_fails_where_lr_auto_trains(tmp_path):
    """The fixed rate the search must avoid: at lr 20 digits/mlp diverges or dies at chance accuracy; --lr auto
    on the same run trains (one worker, in process)."""
    cfg = RunConfig(dataset="digits", model="mlp", width=32, global_batch_size=32, lr=20.0, lr_schedule="constant",
                    epochs=8, workers=1, progress=False, run_dir=str(tmp_path / "big"), seed=1)
    try:
        big = train(cfg)["final_test_accuracy"]
    except DivergedError:
        big = None
    assert big is None or big < 0.3
    # a longer run than the diverging one: the first trial (which sets the budget, so it is not bounded by it)
    # stays a small share of the wall time even when this shared machine stalls it
    summary = train(cfg.replace(lr="auto", epochs=16, run_dir=str(tmp_path / "auto")))
    records = [json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    (auto,) = [r for r in records if r["kind"] == "lr_auto"]
    assert 0 < auto["lr"] < 20 and summary["final_test_accuracy"] >= 0.85
    probes = [r for r in records if r["kind"] == "lr_probe"]
    assert len(probes) == auto["trials"] >= 1 and all(p["verdict"] for p in probes)
    # the probe kept to its stopping rule, and all of it is inside the run's clock
    _assert_probe_kept_its_budget(auto, probes)
    assert summary["train_time_s"] >= auto["probe_s"]


@pytest.mark.spawn  # env.json asks git
@pytest.mark.timeout(600)
def test_lr_auto_backs_off_from_diverging_trials_and_restores_the_state(tmp_path, monkeypatch):
    """A ramp that starts far too high (lr 20 on digits/mlp): the unstable trials are restored from and the
    search backs off to a rate that trains. The budget is lifted so the whole search runs (one worker)."""
    import scalesgd.lr_probe as lr_probe

    monkeypatch.setattr(lr_probe, "LR_PROBE", {**lr_probe.LR_PROBE, "start_lr": 20.0})
    monkeypatch.setattr(lr_probe, "LR_PROBE_BUDGET", 1e9)  # no time limit: the search is a function of losses
    cfg = RunConfig(dataset="digits", model="mlp", width=32, lr="auto", lr_schedule="constant", epochs=8, workers=1,
                    progress=False, run_dir=str(tmp_path / "auto"), seed=1)
    summary = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if r["kind"] == "lr_probe"]
    (auto,) = [r for r in records if r["kind"] == "lr_auto"]
    assert probes[0]["lr"] == 20.0 and probes[0]["verdict"] in ("rose", "diverged")
    assert [p["lr"] for p in probes[:3]] == pytest.approx([20.0, 20.0 / 3, 20.0 / 9])  # backing off by the factor
    assert any(p["verdict"] == "stable" for p in probes)
    # every undone trial was restored from: the unstable ones all started from the initial state, and later
    # trials from the last kept one; a finite run after them
    first_kept = next(i for i, p in enumerate(probes) if p["kept"])
    assert len({p["loss_before"] for p in probes[:first_kept + 1]}) == 1
    _assert_trials_continue_from_the_kept_ones(probes)
    assert auto["lr"] < min(p["lr"] for p in probes if p["verdict"] in ("rose", "diverged"))
    assert summary["final_test_accuracy"] >= 0.85


@pytest.mark.spawn
@pytest.mark.timeout(600)
def test_goodput_times_every_step_even_when_every_step_evaluates(tmp_path):
    """The step times reach the policy through the next step's all-reduce tail, not a collective of their own:
    every step after the warm-up is timed, whatever comes after it (here an evaluation after every step, as on a
    small data set evaluated every tenth of an epoch), and the all-reduce times are the ranks' real ones."""
    from scalesgd.run import TIMING_WARMUP_STEPS

    cfg = RunConfig(dataset="digits", model="mlp", width=32, global_batch_size=32, epochs=1, lr=0.05,
                    lr_schedule="constant", batch_policy="goodput", workers=2, eval_every=1, eval_train_examples=16,
                    progress=False, threads_per_worker=1, timeout_s=120, run_dir=str(tmp_path / "run"), seed=1)
    summary = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert len([r for r in records if r["kind"] == "eval"]) >= len(steps) == summary["steps"]
    policy = TrainState.from_checkpoint(torch.load(f"{summary['run_dir']}/checkpoint.pt",
                                                   weights_only=True)["train_state"]).policy
    full = [r for r in steps if r["global_batch_size"] == START_BATCH]  # an epoch's cut-short tail is not timed
    changes = [r for r in records if r["kind"] == "batch_change"]
    # steps 3.. are timed, each learned at the decision two steps later; the last step's times never arrive, and
    # the first step at a changed batch is left out
    assert policy.n_timings >= len(full) - TIMING_WARMUP_STEPS - 2 - 2 * len(changes) > 0
    assert all(b.comm_s > 0 and b.compute_s > 0 for b in policy.times.bins)


def test_goodput_defaults_the_lr_rule_to_adascale_and_refuses_another():
    assert RunConfig(batch_policy="goodput").effective_lr_rule == "adascale"
    assert RunConfig().effective_lr_rule == "constant" and RunConfig(lr_rule="sqrt").effective_lr_rule == "sqrt"
    assert LrConfig.from_run_config(RunConfig(batch_policy="goodput")).rule == "adascale"
    assert RunConfig(batch_policy="goodput").to_dict()["lr_rule"] == "adascale"
    with pytest.raises(ConfigError, match="AdaScale"):
        RunConfig(batch_policy="goodput", lr_rule="linear")
    with pytest.raises(ConfigError, match="diversity"):
        RunConfig(batch_policy="goodput", diversity="off")
    RunConfig(batch_policy="goodput", lr_rule="adascale")  # the same rule, explicitly: fine


def test_lr_auto_from_the_command_line_and_toml(tmp_path):
    parser = build_parser()
    assert config_from_args(parser.parse_args(["train", "--lr", "auto"])).lr == "auto"
    assert config_from_args(parser.parse_args(["train", "--lr", "0.1"])).lr == 0.1
    toml = tmp_path / "run.toml"
    toml.write_text('lr = "auto"\nbatch-policy = "goodput"\n')
    cfg = config_from_args(parser.parse_args(["train", "--config", str(toml)]))
    assert (cfg.lr, cfg.batch_policy, cfg.effective_lr_rule) == ("auto", "goodput", "adascale")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--lr", "fast"])
    with pytest.raises(ConfigError, match="auto"):
        RunConfig(lr="fast")


@pytest.mark.spawn  # env.json asks git
@pytest.mark.timeout(600)
def test_lr_auto_with_a_base_batch_size_trains_at_the_rate_it_found(tmp_path):
    """The range test's trials run at the starting batch (32); with --lr-rule linear --base-batch-size 8 the rate
    found there is the rule's rate at 32, so the base lr is it / (32/8). Stored as the base lr itself, it was
    multiplied by 4 (mnist1d/cnn1d: trained at 0.9 past a diverged 1.35 probe, chance accuracy). One worker,
    in process; the first step's lr is the rate found, below every rate the probe saw rise or diverge."""
    cfg = RunConfig(dataset="digits", model="mlp", width=32, global_batch_size=32, lr="auto", lr_rule="linear",
                    base_batch_size=8, lr_schedule="constant", epochs=2, workers=1, progress=False,
                    run_dir=str(tmp_path / "run"), seed=1)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (auto,) = [r for r in records if r["kind"] == "lr_auto"]
    first = next(r for r in records if r["kind"] == "step")
    assert first["global_batch_size"] == 32
    assert first["lr"] == pytest.approx(auto["lr_at_start_batch"]) == pytest.approx(auto["lr"] * 32 / 8)
    unstable = [p["lr"] for p in records if p["kind"] == "lr_probe" and p["verdict"] in ("rose", "diverged")]
    assert all(first["lr"] < u for u in unstable)
    assert "the linear rule's factor 4" in auto["reason"]
