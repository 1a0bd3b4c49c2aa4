"""The measuring half of the performance model: compute profile, all-reduce sweep, run reader, `predict` CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from scalesgd import perf_model as pm
from scalesgd.errors import ConfigError, DataError
from scalesgd.cli import build_parser
from scalesgd.predict import measure_allreduce, profile_compute, read_run, statistical_inputs


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def test_profile_compute_times_each_size_and_restores_threads():
    before = torch.get_num_threads()
    model = tiny_model()
    w0 = [p.detach().clone() for p in model.parameters()]
    prof = profile_compute(model, (12,), 3, [8, 2, 32, 8], steps=3, warmup_steps=1)
    assert prof.local_batch_sizes == (2, 8, 32)
    assert len(prof.median_s) == 3 and all(t > 0 for t in prof.median_s)
    assert prof.fit.t0_s >= 0 and prof.fit.t1_s >= 0
    assert prof.threads == 1 and torch.get_num_threads() == before
    # the update really ran (the timing covers fwd + bwd + update, like a training step)
    assert any(not torch.equal(a, b) for a, b in zip(w0, model.parameters()))


def test_profile_compute_regression_task():
    model = nn.Sequential(nn.Linear(5, 2))
    prof = profile_compute(model, (5,), 2, [4, 16], steps=2, warmup_steps=0, task="regression")
    assert len(prof.median_s) == 2


def test_profile_compute_rejects_bad_input():
    with pytest.raises(ConfigError):
        profile_compute(tiny_model(), (12,), 3, [8], steps=2)
    with pytest.raises(ConfigError):
        profile_compute(tiny_model(), (12,), 3, [8, 16], steps=0)


@pytest.mark.spawn
@pytest.mark.timeout(120)
@pytest.mark.parametrize("comm", ["allreduce", "ring-tcp"])
def test_measure_allreduce_two_gloo_processes(comm):
    sweep = measure_allreduce([4, 1 << 12, 1 << 18], world_size=2, repeats=3, warmup=1, timeout_s=100, comm=comm)
    assert sweep.world_size == 2 and len(sweep.median_s) == 3
    assert all(t > 0 for t in sweep.median_s)
    assert sweep.network.alpha_s >= 0 and sweep.network.beta_s_per_byte >= 0
    assert "measured here" in sweep.network.source and f"--comm {comm}" in sweep.network.source
    # our ring sends small messages by recursive doubling, and the fitted network models that; the built-in does not
    assert sweep.network.doubling_max_bytes == (256 << 10 if comm == "ring-tcp" else 0)


def write_run(run_dir, *, bounds, evals, target=0.9, batch=64):
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for i, b in enumerate(bounds):
            f.write(json.dumps({"kind": "step", "step": i + 1, "epoch": (i + 1) / 10, "global_batch_size": batch,
                                "batch_bound_est": b}) + "\n")
        for epoch, acc in evals:
            f.write(json.dumps({"kind": "eval", "step": int(epoch * 10), "epoch": epoch, "test_accuracy": acc}) + "\n")
    (run_dir / "config.json").write_text(json.dumps({"global_batch_size": batch, "target_accuracy": target}))
    (run_dir / "summary.json").write_text(json.dumps({"target_accuracy": target, "epochs": evals[-1][0]}))


def test_read_run_takes_median_bound_and_interpolated_epoch_at_target(tmp_path):
    write_run(tmp_path / "r", bounds=[None, float("nan"), 100.0, 300.0, 200.0],
              evals=[(1.0, 0.5), (2.0, 0.91), (3.0, 0.95)])
    facts = read_run(tmp_path / "r")
    assert facts.batch_bound == 200.0
    # rundata.passes_to_target: between epoch 1 (0.5) and epoch 2 (0.91), 0.9 lies 0.4/0.41 of the way
    assert facts.passes_to_target == pytest.approx(1.0 + 0.4 / 0.41)
    assert facts.global_batch_size == 64 and facts.target_accuracy == 0.9


def test_read_run_averages_numerator_and_denominator_over_the_run(tmp_path):
    """With per-step estimates logged, B_S = 1 + Σ tr/Σ g2 (ratio last), not the median of the smoothed ratios."""
    write_run(tmp_path / "r", bounds=[500.0, 500.0, 500.0], evals=[(1.0, 0.95)])
    steps = [(4.0, 100.0), (1.0, 200.0), (-0.5, 60.0), (float("nan"), 1.0)]  # (|G|^2, tr Sigma); one unusable
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        for g2, tr in steps:
            f.write(json.dumps({"kind": "step", "step": 9, "epoch": 0.9, "grad_sq_norm_step": g2,
                                "trace_cov_step": tr}) + "\n")
    facts = read_run(tmp_path / "r")
    assert facts.batch_bound == pytest.approx(1 + 360.0 / 4.5)
    assert "3 per-step estimates" in facts.batch_bound_how


def test_predict_says_why_a_run_gives_no_batch_bound(tmp_path):
    """Per-step estimates whose ‖G‖² sums to <= 0 give no B_S, and predict says so instead of asking for a tap."""
    write_run(tmp_path / "r", bounds=[None], evals=[(1.0, 0.95)])
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "step", "step": 2, "epoch": 0.2, "grad_sq_norm_step": -1.0,
                            "trace_cov_step": 5.0}) + "\n")
    assert read_run(tmp_path / "r").batch_bound is None
    args = parse(["--from-run", str(tmp_path / "r")])
    with pytest.raises(ConfigError, match="gradient noise swamps"):
        statistical_inputs(batch_bound=args.batch_bound, passes_at_small_batch=args.passes_at_small_batch,
                           small_batch_size=args.small_batch_size, from_run=args.from_run)


def test_read_run_target_not_reached_and_missing_dir(tmp_path):
    write_run(tmp_path / "r", bounds=[50.0], evals=[(1.0, 0.5)])
    assert read_run(tmp_path / "r").passes_to_target is None
    with pytest.raises(DataError):
        read_run(tmp_path / "nope")


def parse(argv):
    return build_parser().parse_args(["predict", *argv])


FAST = ["--profile-batch-sizes", "4,32", "--profile-steps", "2", "--network", "25 Gbit/s, 10 us"]


def test_predict_cli_prints_table_recommendation_and_writes_outputs(tmp_path, capsys):
    args = parse([*FAST, "--batch-bound", "200", "--passes-at-small-batch", "10", "--small-batch-size", "32",
                  "--batch-sizes", "32,256,2048", "--max-workers", "1024", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "fastest: B=" in text and "cheapest within 10% of fastest" in text
    assert "time to acc" in text
    out = tmp_path / "out"
    for name in ("predictions.csv", "prediction.json", "time_to_accuracy_vs_batch.png",
                 "time_to_accuracy_vs_workers.png"):
        assert (out / name).stat().st_size > 0
    info = json.loads((out / "prediction.json").read_text())
    assert info["batch_bound"] == 200 and info["network"]["alpha_s"] == pytest.approx(10e-6)
    # passes at the measured batch are reproduced by the model
    assert info["passes_min"] * (1 + 32 / 199) == pytest.approx(10.0)
    rows = (out / "predictions.csv").read_text().splitlines()
    assert max(int(r.split(",")[1]) for r in rows[1:]) == 1024
    # what --batch-policy goodput would settle at on the recommended P: a legal batch, printed and saved
    for p, choice in info["goodput"].items():
        assert choice["global_batch_size"] % int(p) == 0 and f"goodput at P={p} converges to B=" in text


def test_goodput_batch_is_the_trainer_policys_choice_on_the_profile():
    """predict's goodput batch maximises the trainer's goodput over multiples of P (brute force here), with the
    step time the policy would fit to the same timings."""
    from scalesgd import goodput as gp
    from scalesgd.predict import ComputeProfile, goodput_batch

    fit = pm.fit_compute([8, 32, 128, 512], [1e-3 + 2e-6 * b for b in (8, 32, 128, 512)])
    prof = ComputeProfile((8, 32, 128, 512), tuple(1e-3 + 2e-6 * b for b in (8, 32, 128, 512)), fit, 1)
    net = pm.Network(alpha_s=50e-6, beta_s_per_byte=1e-9)
    choice, model = goodput_batch(prof, workers=4, network=net, grad_bytes=4e5, batch_bound=301.0, n_train=60000,
                                  base_batch_size=32)
    assert model.alpha_c_s == pytest.approx(1e-3, rel=1e-6) and model.beta_c_s == pytest.approx(2e-6, rel=1e-6)
    assert model.alpha_n_s == pytest.approx(float(pm.allreduce_time(4e5, 4, net)))
    step = lambda b: 1e-3 + 2e-6 * (b / 4) + model.alpha_n_s
    best = max(range(4, 60001, 4), key=lambda b: b / step(b) * (300 + 32) / (300 + b))
    assert choice.global_batch_size == best
    assert choice.efficiency == pytest.approx(gp.efficiency(best, 32, 300.0))


@pytest.mark.parametrize("comm", ["allreduce", "ring-tcp"])
def test_predict_with_a_given_network_models_our_rings_recursive_doubling(tmp_path, capsys, comm):
    args = parse([*FAST, "--comm", comm, "--batch-bound", "200", "--passes-at-small-batch", "10",
                  "--batch-sizes", "64", "--max-workers", "1024", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    info = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert info["network"]["doubling_max_bytes"] == (256 << 10 if comm == "ring-tcp" else 0)
    text = capsys.readouterr().out
    assert ("recursive doubling up to" in text) == (comm == "ring-tcp")
    # the recommendation says which algorithm it priced (which P wins depends on the profile just timed)
    said = next(line for line in text.splitlines() if line.startswith("all-reduce of the gradient, as modelled:"))
    net = pm.Network(**info["network"])
    for p in {info["recommendation"]["fastest"]["workers"], info["recommendation"]["cheapest"]["workers"]}:
        algorithm = pm.allreduce_algorithm(info["grad_bytes"], p, net)
        assert f"{algorithm} at P={p}" in said
        # the 32 KB gradient goes by recursive doubling on our rings at any power of two P > 1
        assert algorithm == ("none" if p == 1 else "recursive doubling" if comm == "ring-tcp" else "ring")


def test_predict_cli_from_run(tmp_path, capsys):
    write_run(tmp_path / "r", bounds=[150.0, 250.0], evals=[(4.0, 0.8), (6.5, 0.92)])
    args = parse([*FAST, "--from-run", str(tmp_path / "r"), "--batch-sizes", "64,512", "--max-workers", "8"])
    assert args.func(args) == 0
    # 0.9 lies 0.1/0.12 of the way from epoch 4 (0.8) to epoch 6.5 (0.92): 4 + 2.5 * 5/6 = 6.083 passes
    assert "6.08 passes at B=64" in capsys.readouterr().out


def test_predict_cli_errors_say_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="--batch-bound"):
        args = parse([*FAST, "--passes-at-small-batch", "10"])
        args.func(args)
    with pytest.raises(ConfigError, match="--passes-at-small-batch"):
        args = parse([*FAST, "--batch-bound", "100"])
        args.func(args)
    with pytest.raises(ConfigError, match="network"):
        args = parse(["--network", "fast please", "--batch-bound", "100", "--passes-at-small-batch", "3"])
        args.func(args)
    write_run(tmp_path / "r", bounds=[150.0], evals=[(1.0, 0.5)])
    with pytest.raises(ConfigError, match="reached its target"):
        args = parse([*FAST, "--from-run", str(tmp_path / "r")])
        args.func(args)


def test_predicted_local_batch_matches_ceil():
    assert int(pm.local_batch_size(100, 8)) == 13


def test_predict_prices_stragglers_and_local_sgd(tmp_path, capsys):
    common = [*FAST, "--batch-bound", "200", "--passes-at-small-batch", "10", "--batch-sizes", "64",
              "--max-workers", "8"]
    tables = {}
    for name, extra in (("plain", []), ("delayed", ["--straggler", "exp:mean=5ms", "--sync-every", "4"])):
        args = parse([*common, *extra, "--out", str(tmp_path / name)])
        assert args.func(args) == 0
        rows = list(csv.DictReader((tmp_path / name / "predictions.csv").open()))
        tables[name] = {int(r["workers"]): r for r in rows}
    assert "exp:mean=0.005s, parameters averaged every 4 step(s)" in capsys.readouterr().out
    info = json.loads((tmp_path / "delayed" / "prediction.json").read_text())
    assert info["straggler"] == "exp:mean=0.005s" and info["sync_every"] == 4
    prof = info["compute_profile"]
    fit = pm.ComputeFit(t0_s=prof["t0_s"], t1_s=prof["t1_s"], knots_b=tuple(prof["knots_b"]),
                        knots_s=tuple(prof["knots_s"]))
    for p in (2, 4, 8):
        plain, delayed = tables["plain"][p], tables["delayed"][p]
        # the communication is the given network's, over H; the compute (profiled afresh in each call) carries
        # E[max over P of a period's summed delay]/H, which lies between the mean 5 ms and 5 ms * H_P
        assert float(delayed["comm_s"]) == pytest.approx(float(plain["comm_s"]) / 4, rel=1e-6)
        own = float(fit(-(-64 // p)))
        assert own + 0.005 < float(delayed["compute_s"]) < own + 0.005 * sum(1 / k for k in range(1, p + 1))
    with pytest.raises(ConfigError, match="--straggler"):
        args = parse([*common, "--straggler", "exp"])
        args.func(args)


def test_predict_scales_local_sgd_passes_by_the_measured_curve_and_recommends_h(tmp_path, capsys):
    common = [*FAST, "--batch-bound", "200", "--passes-at-small-batch", "10", "--batch-sizes", "64",
              "--max-workers", "4"]
    tables = {}
    for name, extra in (("sync", []), ("h4", ["--sync-every", "4", "--passes-vs-h", "1:10,4:11,16:12"])):
        args = parse([*common, *extra, "--out", str(tmp_path / name)])
        assert args.func(args) == 0
        tables[name] = {int(r["workers"]): r for r in csv.DictReader((tmp_path / name / "predictions.csv").open())}
    out = capsys.readouterr().out
    for p in (2, 4):  # passes at H = 4 are the synchronous ones times 11/10
        assert float(tables["h4"][p]["passes"]) == pytest.approx(1.1 * float(tables["sync"][p]["passes"]), rel=1e-6)
    # one worker's local SGD is synchronous SGD: its passes are not scaled
    assert float(tables["h4"][1]["passes"]) == pytest.approx(float(tables["sync"][1]["passes"]), rel=1e-6)
    info = json.loads((tmp_path / "h4" / "prediction.json").read_text())
    assert info["passes_vs_h"] == {"1": 10.0, "4": 11.0, "16": 12.0}
    recs = info["sync_every_recommendation"]
    assert sorted(r["sync_every"] for r in recs) == [1, 4, 16]
    assert [r["time_to_accuracy_s"] for r in recs] == sorted(r["time_to_accuracy_s"] for r in recs)
    for r in recs:
        assert r["time_to_accuracy_s"] == pytest.approx(r["time_per_pass_s"] * r["passes"])
    assert f"recommended --sync-every {recs[0]['sync_every']}" in out
    assert "local SGD at B=64, P=1," not in out  # H is chosen among several workers, where it changes anything
    with pytest.raises(ConfigError, match="outside the measured"):
        args = parse([*common, "--sync-every", "32", "--passes-vs-h", "1:10,4:11,16:12"])
        args.func(args)
    with pytest.raises(ConfigError, match="--passes-vs-h"):
        args = parse([*common, "--passes-vs-h", "1:10,4"])
        args.func(args)
