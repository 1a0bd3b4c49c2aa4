"""Diversity-inducing mechanisms: per-example QSGD (unbiased, its variance, reproducible, the same at P = 2 as at
P = 1, replicas identical), Langevin noise's variance convention, and B̃_S = B_S + v/‖∇F‖²."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scalesgd.comm import qsgd_decode, qsgd_encode, qsgd_error_variance
from scalesgd.config import RunConfig
from scalesgd.errors import ConfigError
from scalesgd.mechanisms import (ExampleQSGD, check_per_example_affordable, example_generator_seed, example_qsgd,
                                 langevin_example_second_moment, noisy_batch_bound, per_example_gradients)
from scalesgd.models import loss_function, mlp
from scalesgd.transforms import Hyper, apply_updates_, sgd


def _grads(b=4, n=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["max", "l2"])
def test_rows_are_the_codec_with_the_exact_variance(scale):
    g = _grads().float()
    q, var = example_qsgd(g, levels=3, generator_seed=11, bucket_size=256, scale=scale)
    # row 0 is the codec on that row with a generator of that seed, bit for bit
    ref = qsgd_decode(qsgd_encode(g[0], num_levels=3, bucket_size=256, scale=scale,
                                  generator=torch.Generator().manual_seed(11)))
    assert torch.equal(q[0], ref)
    for i in range(4):  # every row's variance is the codec's exact formula on that row
        assert var[i].item() == pytest.approx(qsgd_error_variance(g[i], num_levels=3, bucket_size=256, scale=scale),
                                              rel=1e-9)
    assert not torch.equal(q[1], qsgd_decode(qsgd_encode(g[1], num_levels=3, bucket_size=256, scale=scale,
                                                         generator=torch.Generator().manual_seed(11))))


@pytest.mark.parametrize("levels", [1, 4])
def test_per_example_quantization_is_unbiased_with_the_qsgd_variance(levels):
    g = _grads(b=3, n=300)
    draws = 3000
    errors = torch.empty(draws, 3, 300, dtype=torch.float64)
    for k in range(draws):
        q, var = example_qsgd(g, levels=levels, generator_seed=example_generator_seed(7, k), bucket_size=128)
        errors[k] = q - g
    # Unbiased: the summed gradient Σᵢ Q(gᵢ) averages to Σᵢ gᵢ. Its coordinates' errors have variance (exact,
    # per coordinate) summing to Σᵢ vᵢ; the squared norm of the mean error over K draws has expectation Σᵢ vᵢ / K
    # and, as a sum of many nearly independent squares, stays below 2× that (a 5-sigma bound for 300 terms).
    mean_err = errors.sum(1).mean(0)  # (N,)
    total_var = float(var.sum())
    assert float(mean_err.square().sum()) < 2.0 * total_var / draws
    # ... and not trivially: one draw's error is of the full size
    assert float(errors[0].sum(0).square().sum()) > 0.2 * total_var
    # Variance: E‖Q(gᵢ) − gᵢ‖² per row equals the exact formula (and QSGD's bound), within 5 standard errors.
    sq = errors.square().sum(2)  # (draws, b)
    for i in range(3):
        se = float(sq[:, i].std()) / math.sqrt(draws)
        assert abs(float(sq[:, i].mean()) - float(var[i])) < 5 * se
        d = 128
        bound = sum(min(d / levels ** 2, math.sqrt(d) / levels) * float(chunk.square().sum())
                    for chunk in g[i].split(d))
        assert float(var[i]) <= bound


def test_example_rounding_is_reproducible_and_split_across_ranks():
    g = _grads(b=8, n=100)
    seed = example_generator_seed(5, 10)
    assert example_generator_seed(5, 10) == seed != example_generator_seed(5, 11) != example_generator_seed(6, 10)
    whole, _ = example_qsgd(g, levels=2, generator_seed=seed)
    again, _ = example_qsgd(g, levels=2, generator_seed=example_generator_seed(5, 10))
    other, _ = example_qsgd(g, levels=2, generator_seed=example_generator_seed(5, 11))
    assert torch.equal(whole, again) and not torch.equal(whole, other)
    # two ranks of 3 and 5 rows draw together exactly what one worker draws for all 8
    r0, _ = example_qsgd(g[:3], levels=2, generator_seed=seed, first_row=0, total_rows=8)
    r1, _ = example_qsgd(g[3:], levels=2, generator_seed=seed, first_row=3, total_rows=8)
    assert torch.equal(torch.cat([r0, r1]), whole) and not torch.equal(r1, whole[:5])
    with pytest.raises(ConfigError, match="outside a global batch"):
        example_qsgd(g, levels=2, generator_seed=seed, first_row=3, total_rows=8)


def test_per_example_gradients_match_one_backward_per_example():
    torch.manual_seed(0)
    model = mlp(input_shape=(12,), num_outputs=5, width=8)
    loss_fn = loss_function("classification")
    x, y = torch.randn(6, 12), torch.randint(0, 5, (6,))
    grads, losses, outputs = per_example_gradients(model, loss_fn, x, y)
    assert grads.shape == (6, sum(p.numel() for p in model.parameters()))
    for i in range(6):
        model.zero_grad()
        loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])
        loss.backward()
        ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(grads[i], ref, atol=1e-6) and losses[i].item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.allclose(outputs, model(x), atol=1e-6)
    # the summed, quantized gradient of a shard is Σᵢ Q(gᵢ) with the rows' own seeds
    out, loss_sum, total, sq = ExampleQSGD(3).summed_gradient(model, loss_fn, x, y, seed=1, step=2, first_row=4,
                                                              global_rows=10)
    q, _ = example_qsgd(grads, levels=3, generator_seed=example_generator_seed(1, 2), first_row=4, total_rows=10)
    assert torch.allclose(total, q.sum(0), atol=1e-6) and sq == pytest.approx(float(q.double().square().sum()))
    assert float(loss_sum) == pytest.approx(float(losses.sum())) and torch.allclose(out, outputs)


def test_per_example_gradients_refuse_what_they_cannot_do(monkeypatch):
    model = mlp(input_shape=(12,), num_outputs=5, width=8, dropout=0.5)
    with pytest.raises(ConfigError, match="--dropout 0"):
        check_per_example_affordable(model, 4, option="--example-qsgd-levels")
    import scalesgd.mechanisms as mech

    monkeypatch.setattr(mech, "MAX_PER_EXAMPLE_ELEMENTS", 100)
    with pytest.raises(ConfigError, match="smaller model or batch"):
        check_per_example_affordable(mlp(input_shape=(12,), num_outputs=5, width=8), 4, option="--example-qsgd-levels")
    with pytest.raises(ConfigError, match="exceed"):
        per_example_gradients(mlp(input_shape=(12,), num_outputs=5, width=8), loss_function("classification"),
                              torch.randn(4, 12), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="0..127"):
        RunConfig(example_qsgd_levels=128)
    with pytest.raises(ConfigError, match="one mechanism at a time"):
        RunConfig(example_qsgd_levels=2, dropout=0.1)


def test_langevin_variance_convention():
    """--langevin-noise σ adds N(0, σ²·lr) per coordinate to the weights each step (zero gradient: only noise)."""
    sigma, lr, n = 0.3, 0.04, 200_000
    tx = sgd(langevin_noise=sigma, seed=0)
    params = torch.zeros(n, dtype=torch.float64)
    state = tx.init(params)
    direction, state = tx.update(torch.zeros(n, dtype=torch.float64), state, params, Hyper(lr=lr, step=0))
    apply_updates_(params, direction, lr)
    assert float(params.var()) == pytest.approx(sigma ** 2 * lr, rel=0.02)  # 2% ≈ 6 standard errors at n = 2e5
    assert float(direction.var()) == pytest.approx(sigma ** 2 / lr, rel=0.02)
    # ... which, for a batch of B over N coordinates, is per-example noise of second moment B·N·σ²/lr
    assert langevin_example_second_moment(sigma, lr, 64, 10) == pytest.approx(64 * 10 * sigma ** 2 / lr)


def test_noisy_batch_bound_is_the_measured_bound_of_noisy_per_example_gradients():
    """B̃_S = B_S + v/‖∇F‖² against the exact diversity of quantized per-example gradients averaged over draws."""
    g = _grads(b=40, n=64, seed=3) + 0.8  # a common component, so ‖∇F‖² is not tiny
    mean = g.mean(0)
    m2 = float(g.square().sum(1).mean())
    bs = m2 / float(mean.square().sum())
    draws, tot = 400, 0.0
    for k in range(draws):
        q, var = example_qsgd(g, levels=1, generator_seed=example_generator_seed(0, k), bucket_size=64)
        tot += float(q.square().sum(1).mean())
    v = float(var.mean())
    predicted = noisy_batch_bound(bs, float(mean.square().sum()), v)
    measured = (tot / draws) / float(mean.square().sum())  # E‖Q(gᵢ)‖² over ‖E Q(gᵢ)‖² = ‖∇F‖²
    assert predicted > 1.5 * bs  # the noise matters at s = 1
    assert measured == pytest.approx(predicted, rel=0.02)
    with pytest.raises(ConfigError):
        noisy_batch_bound(bs, 0.0, v)


def _job(tmp_path, workers, name, **kw):
    from scalesgd.run import train

    cfg = RunConfig(dataset="digits", model="mlp", width=16, workers=workers, global_batch_size=32, steps=4,
                    lr=0.1, lr_schedule="constant", check_replicas_every=1, diversity="exact", progress=False,
                    threads_per_worker=1, timeout_s=120, seed=5, run_dir=str(tmp_path / name), **kw)
    train(cfg)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.spawn
def test_example_quantization_in_the_trainer_p2_equals_p1_and_replicas_agree(tmp_path):
    two = [r for r in _job(tmp_path, 2, "P2", example_qsgd_levels=2) if r["kind"] == "step"]  # replicas checked
    one = [r for r in _job(tmp_path, 1, "P1", example_qsgd_levels=2) if r["kind"] == "step"]
    plain = [r for r in _job(tmp_path, 1, "plain") if r["kind"] == "step"]
    assert len(two) == 4 and [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    p2 = torch.load(tmp_path / "P2" / "checkpoint.pt", weights_only=True)["train_state"]["params"]
    p1 = torch.load(tmp_path / "P1" / "checkpoint.pt", weights_only=True)["train_state"]["params"]
    p0 = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["train_state"]["params"]
    assert torch.allclose(p2, p1, rtol=1e-4, atol=1e-6) and not torch.allclose(p1, p0, atol=1e-4)
    # the exact tap measures the quantized gradients: at the first step (the same weights as the plain run's, the
    # same batch) their per-example variance tr Σ̃ = tr Σ + v̄ is well above the plain one (s = 2 roughly doubles it)
    assert two[0]["trace_cov_step"] == pytest.approx(one[0]["trace_cov_step"], rel=1e-4)
    assert one[0]["trace_cov_step"] > 1.3 * plain[0]["trace_cov_step"]
