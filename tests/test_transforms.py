"""The flat-vector SGD transformation equals torch.optim.SGD (the slow, obviously-correct reference)."""

from __future__ import annotations

import pytest
import torch

from scalesgd.transforms import Hyper, apply_updates_, chain, langevin, sgd


@pytest.mark.parametrize("momentum,wd,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 1e-2, False),
                                                  (0.8, 5e-4, True)])
def test_sgd_matches_torch_optim(momentum, wd, nesterov):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(257, generator=g)
    grads = [torch.randn(257, generator=g) for _ in range(12)]
    lrs = [0.1 * (0.9 ** k) for k in range(12)]

    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([ref], lr=lrs[0], momentum=momentum, weight_decay=wd, nesterov=nesterov)
    for lr, grad in zip(lrs, grads):
        opt.param_groups[0]["lr"] = lr
        ref.grad = grad.clone()
        opt.step()

    tx = sgd(momentum=momentum, weight_decay=wd, nesterov=nesterov)
    w = w0.clone()
    state = tx.init(w)
    for k, (lr, grad) in enumerate(zip(lrs, grads)):
        direction, state = tx.update(grad.clone(), state, w, Hyper(lr=lr, step=k))
        apply_updates_(w, direction, lr)
    torch.testing.assert_close(w, ref.detach(), rtol=1e-6, atol=1e-7)


def test_langevin_noise_is_seeded_and_scaled():
    w = torch.zeros(10000)
    tx = chain(langevin(0.5, seed=3))
    s1 = tx.init(w)
    u1, _ = tx.update(torch.zeros(10000), s1, w, Hyper(lr=0.04, step=0))
    s2 = tx.init(w)
    u2, _ = tx.update(torch.zeros(10000), s2, w, Hyper(lr=0.04, step=0))
    assert torch.equal(u1, u2)  # same seed on every rank: replicas stay identical
    step = torch.zeros(10000)
    apply_updates_(step, u1, 0.04)
    assert abs(float(step.std()) - 0.5 * 0.2) < 0.005  # the parameter step's noise std = noise * sqrt(lr)
