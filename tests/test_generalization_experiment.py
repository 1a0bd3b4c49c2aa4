"""experiments/generalization/generalization.py: its batched trainer against torch.optim.SGD on the project's model,
the init scale, the out-of-sample gradient norm against a per-example loop, stopping and divergence, and the whole
script at a tiny size (report and figures written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from scalesgd.models import build_model

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "generalization" / "generalization.py"


@pytest.fixture(scope="module")
def gen(load_script):
    with load_script(SCRIPT, "generalization_experiment") as module:
        yield module



def _data(n=40, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(classes, (n,), generator=g)


def test_ensemble_steps_equal_torch_sgd_on_the_project_model(gen):
    """Each copy's trajectory is torch.optim.SGD (momentum 0.9) on build_model("mlp", depth=1) from the same seed,
    first layer scaled, on the same rows."""
    x, y = _data()
    seeds, scales, lrs = [0, 1, 2], [1.0, 3.0, 0.5], [0.1, 0.02, 0.3]
    ens = gen.Ensemble(input_dim=6, num_outputs=3, width=5, seeds=seeds, init_scales=scales)
    refs, opts = [], []
    for seed, c, lr in zip(seeds, scales, lrs):
        m = build_model("mlp", input_shape=(6,), num_outputs=3, seed=seed, width=5, depth=1)
        with torch.no_grad():
            m[1].weight.mul_(c)
        refs.append(m)
        opts.append(torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9))
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        idx = torch.randint(len(x), (3, 7), generator=g)
        losses = ens.step(x[idx], y[idx], torch.tensor(lrs), momentum=0.9)
        for k, (m, opt) in enumerate(zip(refs, opts)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x[idx[k]]), y[idx[k]])
            loss.backward()
            opt.step()
            assert losses[k].item() == pytest.approx(loss.item(), rel=1e-5)
    for k, m in enumerate(refs):
        for p, q in zip(ens.module(k).parameters(), m.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_init_scale_scales_only_the_first_layer_weight(gen):
    ens = gen.Ensemble(input_dim=64, num_outputs=10, width=256, seeds=[4, 4], init_scales=[1.0, 20.0])
    base, scaled = ens.module(0), ens.module(1)
    torch.testing.assert_close(scaled[1].weight, 20.0 * base[1].weight)
    assert scaled[1].weight.std().item() == pytest.approx(20.0 * base[1].weight.std().item(), rel=1e-5)
    for name in ("1.bias", "3.weight", "3.bias"):
        torch.testing.assert_close(dict(scaled.named_parameters())[name], dict(base.named_parameters())[name])
    ref = build_model("mlp", input_shape=(64,), num_outputs=10, seed=4, width=256, depth=1)
    torch.testing.assert_close(base[1].weight, ref[1].weight)


def test_out_of_sample_gradient_norm_equals_a_per_example_loop(gen):
    """grad_norm_stats (ghost norms) = mean over rows of ‖∇_w f(w; z)‖ from one autograd call per example."""
    x, y = _data(n=30, d=8, classes=4, seed=1)
    ens = gen.Ensemble(input_dim=8, num_outputs=4, width=16, seeds=[0])
    gen.train(ens, x, y, torch.tensor([0.5]), batch=8, steps=20, momentum=0.9,
              generator=torch.Generator().manual_seed(0))
    model = ens.module(0)
    norms = []
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        norms.append(torch.sqrt(sum(g.double().square().sum() for g in grads)))
    expected = torch.stack(norms).mean().item()
    assert expected > 1e-3  # a trained-for-20-steps model still has gradients worth comparing
    assert gen.grad_norm_stats(model, x, y) == pytest.approx(expected, rel=1e-5)


def test_train_freezes_copies_at_the_target_and_on_divergence(gen):
    x, y = _data(n=32, d=6, classes=3, seed=2)
    ens = gen.Ensemble(input_dim=6, num_outputs=3, width=8, seeds=[0, 0, 0])
    loss0, _ = ens.evaluate(x, y)
    # copy 0: the target is above the initial loss, so it stops at the first check and never moves;
    # copy 1: an absurd step overflows; copy 2: trains to the end.
    start = [p[0].clone() for p in ens.params]
    stopped = gen.train(ens, x, y, torch.tensor([0.1, 1e30, 0.1]), batch=32, steps=6, momentum=0.0,
                        generator=torch.Generator().manual_seed(0), target_loss=float(loss0[0]) + 1.0, check_every=3)
    assert stopped.tolist()[0] == 3 and stopped.tolist()[1] < 3
    # the target was met by copy 2 as well at the first check (same init, same target): all stop at step 3
    assert stopped.tolist()[2] == 3
    torch.testing.assert_close(ens.params[0][1], torch.zeros_like(ens.params[0][1]))  # diverged copy zeroed
    assert not torch.equal(ens.params[0][0], start[0])  # three steps were taken before the check
    stopped = gen.train(gen.Ensemble(input_dim=6, num_outputs=3, width=8, seeds=[0]), x, y, torch.tensor([0.1]),
                        batch=8, steps=5, momentum=0.9, generator=torch.Generator().manual_seed(0),
                        target_loss=1e-9, check_every=2)
    assert stopped.tolist() == [5]  # never reached: runs to the end


def test_script_at_tiny_size_writes_the_report(gen, tmp_path):
    settings = gen.Settings(
        sweeps=(gen.SweepSpec("digits", 120, 60, width=8, batches=(8, 120), epochs=2, base_lr=0.1),),
        init=gen.InitSpec(n_train=120, n_test=60, width=8, scales=(1.0, 5.0), batch=16,
                          lrs={1.0: (0.1, 0.2), 5.0: (0.01,)}, max_epochs=2, target_loss=1e-3),
        seeds=(0, 1))
    assert gen.main(settings, tmp_path) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| 8 | 30 |" in report and "| 120 | 2 |" in report  # steps = round(epochs·n/B); B = n is full batch
    assert "| 1 |" in report and "| 5 | 0.01 |" in report
    assert "nan" not in report.lower()
    for png in ("batch_sweep.png", "init_scale.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
