"""Injected stragglers: the spec parser, the reproducible delay sampler, and E[max of P step times] against
Monte Carlo of independent numpy draws; through the CLI, a bad spec is one line and exit 2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scalesgd.cli import main
from scalesgd.config import RunConfig
from scalesgd.errors import ConfigError
from scalesgd.stragglers import (StragglerSpec, expected_local_sgd_compute, expected_max_delay,
                                 expected_step_compute, harmonic, parse_straggler, sample_delay)


def test_parse_forms_and_round_trip():
    assert parse_straggler("rank1x1.5") == parse_straggler("rank 1 x1.5") == StragglerSpec("slow", rank=1, factor=1.5)
    assert parse_straggler("exp:mean=5ms") == StragglerSpec("exp", mean_s=0.005)
    assert parse_straggler("lognormal:mean=5ms,sigma=1") == StragglerSpec("lognormal", mean_s=0.005, sigma=1.0)
    assert parse_straggler("pause:p=0.01,s=0.5") == StragglerSpec("pause", p=0.01, pause_s=0.5)
    assert parse_straggler("exp:mean=300us").mean_s == pytest.approx(3e-4)
    for none in (None, "", "none", "off"):
        assert parse_straggler(none) is None
    for text in ("rank1x1.5", "exp:mean=5ms", "lognormal:mean=5ms,sigma=1", "pause:p=0.01,s=0.5"):
        spec = parse_straggler(text)
        assert parse_straggler(spec.describe()) == spec


@pytest.mark.parametrize("text, words", [
    ("rank1x0.5", ">= 1"), ("exp:mean=-1", "not a time"), ("exp:mean=5ms,sigma=1", "exactly mean"),
    ("gamma:k=2", "unknown form"), ("pause:p=2,s=1", "(0, 1]"), ("lognormal:mean=5ms", "exactly mean, sigma"),
    ("exp:mean", "key=value"), ("lognormal:mean=5ms,sigma=x", "not a number")])
def test_bad_spec_is_one_line_naming_the_forms(text, words):
    with pytest.raises(ConfigError) as e:
        parse_straggler(text)
    msg = str(e.value)
    assert "\n" not in msg and words in msg and "exp:mean=5ms" in msg and repr(text) in msg
    with pytest.raises(ConfigError):
        RunConfig(straggler=text)


def test_bad_spec_through_the_cli_exits_2(capsys):
    assert main(["train", "--straggler", "exp:mean=fast", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--straggler" in err and "not a time" in err


def test_a_slow_rank_the_job_lacks_is_refused_before_anything_starts(tmp_path, capsys):
    # rank 5 of 2 workers would delay no one: refused in one line, exit 2, before any worker is spawned
    argv = ["train", "--dataset", "synthetic-linreg", "--n-train", "64", "--model", "logreg", "--workers", "2",
            "--steps", "1", "--global-batch-size", "8", "--straggler", "rank5x2", "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rank 5" in err and "ranks 0..1" in err and "rank1x2" in err
    assert not (tmp_path / "r").exists()


def test_local_sgd_options_are_checked():
    with pytest.raises(ConfigError, match="--sync-every-after needs --sync-every"):
        RunConfig(sync_every_after=1.0)
    with pytest.raises(ConfigError, match="sync-every must be a positive integer"):
        RunConfig(sync_every=0)
    with pytest.raises(ConfigError, match="lossy codec"):
        RunConfig(sync_every=4, comm="qsgd")
    with pytest.raises(ConfigError, match="no noise estimate"):
        RunConfig(sync_every=4, lr_rule="adascale")


def test_delays_are_a_function_of_seed_rank_step_only():
    spec = parse_straggler("lognormal:mean=5ms,sigma=1")
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    a = [sample_delay(spec, seed=3, rank=r, step=s, compute_s=0.0) for r in range(3) for s in range(50)]
    b = [sample_delay(spec, seed=3, rank=r, step=s, compute_s=1.0) for r in range(3) for s in range(50)]
    assert a == b  # the same draws again, whatever the compute time
    assert len(set(a)) == len(a)  # ranks and steps draw differently
    assert a != [sample_delay(spec, seed=4, rank=r, step=s, compute_s=0.0) for r in range(3) for s in range(50)]
    # the global generators are untouched
    assert torch.equal(torch.get_rng_state(), torch_state) and np.array_equal(np.random.get_state()[1], np_state)


def test_slow_rank_sleeps_its_extra_compute():
    spec = parse_straggler("rank1x3")
    assert sample_delay(spec, seed=0, rank=1, step=5, compute_s=0.02) == pytest.approx(0.04)
    assert sample_delay(spec, seed=0, rank=0, step=5, compute_s=0.02) == 0.0
    assert expected_step_compute(spec, 4, 0.02) == pytest.approx(0.06)
    assert expected_step_compute(spec, 1, 0.02) == pytest.approx(0.02)  # rank 1 is not among P = 1
    assert expected_local_sgd_compute(spec, 4, 0.02, 8) == pytest.approx(0.06)


@pytest.mark.parametrize("text", ["exp:mean=5ms", "lognormal:mean=5ms,sigma=1", "pause:p=0.2,s=0.1"])
def test_sampler_has_the_stated_mean(text):
    spec = parse_straggler(text)
    d = np.array([sample_delay(spec, seed=0, rank=0, step=s, compute_s=0.0) for s in range(20_000)])
    mean = spec.mean_s if spec.kind != "pause" else spec.p * spec.pause_s
    assert abs(d.mean() - mean) < 4 * d.std() / math.sqrt(d.size)


def test_expected_max_of_exponentials_is_mean_times_harmonic():
    spec = parse_straggler("exp:mean=5ms")
    assert harmonic(1) == 1.0 and harmonic(4) == pytest.approx(25 / 12)
    for p in (1, 2, 4, 8):
        assert expected_max_delay(spec, p) == pytest.approx(0.005 * harmonic(p))
    # the sampler's own draws, max over ranks of each step, against μ·H_P
    d = np.array([[sample_delay(spec, seed=1, rank=r, step=s, compute_s=0.0) for r in range(4)] for s in range(10_000)])
    m = d.max(axis=1)
    assert abs(m.mean() - expected_max_delay(spec, 4)) < 4 * m.std() / math.sqrt(m.size)


@pytest.mark.parametrize("p", [1, 2, 4, 16])
def test_expected_max_of_lognormals_matches_monte_carlo(p):
    spec = parse_straggler("lognormal:mean=5ms,sigma=1")
    rng = np.random.default_rng(12345)
    m = rng.lognormal(math.log(0.005) - 0.5, 1.0, size=(200_000, p)).max(axis=1)
    assert abs(expected_max_delay(spec, p) - m.mean()) < 4 * m.std() / math.sqrt(m.size)
    if p == 1:
        assert expected_max_delay(spec, 1) == pytest.approx(0.005, rel=1e-6)


def test_expected_max_pause_and_local_sgd_averaging_absorbs_delays():
    spec = parse_straggler("pause:p=0.01,s=0.5")
    assert expected_max_delay(spec, 4) == pytest.approx(0.5 * (1 - 0.99 ** 4))
    exp = parse_straggler("exp:mean=5ms")
    sync = expected_step_compute(exp, 4, 0.01)
    assert expected_local_sgd_compute(exp, 4, 0.01, 1) == sync
    per_step = [expected_local_sgd_compute(exp, 4, 0.01, h) for h in (2, 8, 32)]
    # E[max of sums]/H falls with H towards compute + μ (each worker's own mean), never below it
    assert sync > per_step[0] > per_step[1] > per_step[2] > 0.01 + 0.005
    assert expected_local_sgd_compute(exp, 4, 0.01, 8) == per_step[1]  # fixed seed: deterministic
