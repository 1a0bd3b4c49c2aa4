"""Whole-data-set diversity across gloo workers equals one process on the whole data set."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from scalesgd.distributed import init_world, shutdown_world, spawn
from scalesgd.diversity import gradient_diversity
from scalesgd.models import cnn1d, mlp

N = 25  # odd, so the two ranks hold different numbers of examples and n must be all-reduced too


def _problem():
    torch.manual_seed(0)
    models = {"mlp": mlp(input_shape=(16,), num_outputs=4, width=12),
              "cnn1d_groupnorm": cnn1d(input_shape=(16,), num_outputs=4, width=4, norm="group")}
    x, y = torch.randn(N, 16), torch.randint(0, 4, (N,))
    return models, x, y


def _rank_part(rank: int) -> slice:
    cut = 13  # rank 0: examples 0..12, rank 1: 13..24
    return slice(0, cut) if rank == 0 else slice(cut, N)


def _worker(rdv, models, x, y):
    torch.set_num_threads(1)
    world = init_world(rdv, "gloo", timeout_s=60)
    try:
        part = _rank_part(rdv.rank)
        out = {}
        for name, model in models.items():
            # a loader on one rank and tensors on the other: both input kinds take part in the same all-reduce
            if rdv.rank == 0:
                loader = [(x[part][i:i + 5], y[part][i:i + 5]) for i in range(0, 13, 5)]
                stats = gradient_diversity(model, nn.CrossEntropyLoss(), loader, world=world)
            else:
                stats = gradient_diversity(model, nn.CrossEntropyLoss(), x[part], y[part], world=world, batch_size=4)
            out[name] = dataclasses.asdict(stats)
        return out
    finally:
        shutdown_world()


@pytest.mark.spawn
@pytest.mark.timeout(120)
def test_two_workers_on_halves_equal_one_process_on_the_whole():
    models, x, y = _problem()
    results = spawn(_worker, 2, (models, x, y), timeout_s=90)
    for name, model in models.items():
        whole = dataclasses.asdict(gradient_diversity(model, nn.CrossEntropyLoss(), x, y))
        assert whole["n"] == N
        for rank_result in results:  # every rank holds the global answer
            got = rank_result[name]
            assert got["n"] == N
            for field, value in whole.items():
                assert got[field] == pytest.approx(value, rel=1e-5), (name, field)
