"""The trainer's in-step noise tap against independent references: cheap = the average over ranks of the
per-rank two-batch estimates from explicit per-rank gradients; exact = the per-example estimate from S₁ of a
per-example autograd loop (``loop_sq_norms``) and S₂ of a separate full-batch backward, inside a real
``train_step``."""

from __future__ import annotations

import copy

import pytest
import torch

from scalesgd.comm import make_comm
from scalesgd.distributed import World
from scalesgd.diversity import NoiseScaleEMA, per_example_noise_stats, two_batch_noise_stats
from scalesgd.ghost_norms import loop_sq_norms
from scalesgd.models import loss_function, mlp
from scalesgd.step import FlatModel, NoiseTap, train_step
from scalesgd.transforms import Hyper, sgd


@pytest.mark.parametrize("shard_sizes", [[5, 5], [4, 3, 3], [7, 6, 6, 6]])
def test_cheap_tap_equals_mean_of_per_rank_two_batch_estimates(shard_sizes):
    g = torch.Generator().manual_seed(len(shard_sizes))
    B, dim = sum(shard_sizes), 50
    per_example = torch.randn(B, dim, generator=g, dtype=torch.float64) + 0.3  # (B, dim)
    shards = torch.split(per_example, shard_sizes)
    model = mlp(input_shape=(4,), num_outputs=2, width=3)
    taps = [NoiseTap("cheap", model, world_size=len(shard_sizes)) for _ in shard_sizes]
    # Each rank's buffer holds Σ_{i∈shard} gᵢ / B; the all-reduce sums the buffers and the tap slots.
    sums = [0.0, 0.0]
    for tap, shard in zip(taps, shards):
        values = tap.local_stats(shard.sum(0) / B, len(shard), B, 1.0 / B)
        sums = [a + b for a, b in zip(sums, values)]
    reduced = per_example.sum(0) / B
    out = taps[0].after_reduce(reduced, sums, shard_sizes, B)

    big_sq = float(reduced.square().sum())
    reference = [two_batch_noise_stats(float((s.mean(0)).square().sum()), len(s), big_sq, B) for s in shards]
    g2 = sum(r.mean_grad_sq_norm for r in reference) / len(reference)
    tr = sum(r.trace_cov for r in reference) / len(reference)
    assert out.mean_grad_sq_norm == pytest.approx(g2, rel=1e-9)
    assert out.trace_cov == pytest.approx(tr, rel=1e-9)
    _, noise = NoiseScaleEMA(0.5).fold(NoiseScaleEMA(0.5).init(), out, 1000)
    metrics = noise.metrics()
    assert (metrics["grad_sq_norm_step"], metrics["trace_cov_step"]) == (out.mean_grad_sq_norm, out.trace_cov)
    assert metrics["batch_bound_est"] == pytest.approx(tr / g2 + 1, rel=1e-9)  # first EMA step: the step's own


def test_exact_tap_in_a_real_step_equals_per_example_autograd_reference():
    torch.manual_seed(0)
    model = mlp(input_shape=(6,), num_outputs=3, width=8).double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    B = x.shape[0]
    loss_fn = loss_function("classification")
    # References on a copy at the same weights, before the step moves them.
    ref_model = copy.deepcopy(model)
    s1_loop = float(loop_sq_norms(ref_model, loss_function("classification", "none"), x, y).sum())
    grads = torch.autograd.grad(loss_fn(ref_model(x), y), list(ref_model.parameters()))  # Σᵢ gᵢ
    s2 = float(sum(g.square().sum() for g in grads))
    ref = per_example_noise_stats(s1_loop, s2, B)

    flat = FlatModel(model, 1, torch.device("cpu"))
    tap = NoiseTap("exact", model, world_size=1)
    tx = sgd()
    result, _ = train_step(flat=flat, loss_fn=loss_fn, x=x, y=y, global_batch_size=B, shard_sizes=[B], rank=0,
                           comm=make_comm("allreduce", World(rank=0, size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")), tx=tx, tx_state=tx.init(flat.params),
                           hyper=Hyper(lr=0.1, step=0), tap=tap, classification=True)
    tap.close()
    assert result.noise.mean_grad_sq_norm == pytest.approx(ref.mean_grad_sq_norm, rel=1e-9)
    assert result.noise.trace_cov == pytest.approx(ref.trace_cov, rel=1e-9)
    assert not any(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))  # it stepped


def test_cheap_on_one_worker_uses_the_exact_path():
    assert NoiseTap("cheap", mlp(input_shape=(2,), num_outputs=2, width=2), world_size=1).mode == "exact"


def test_step_without_tap_reports_no_noise_estimate():
    model = mlp(input_shape=(3,), num_outputs=2, width=4)
    flat = FlatModel(model, 1, torch.device("cpu"))
    tx = sgd()
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    result, _ = train_step(flat=flat, loss_fn=loss_function("classification"), x=x, y=y, global_batch_size=4,
                           shard_sizes=[4], rank=0, comm=make_comm("allreduce", World(rank=0, size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")), tx=tx,
                           tx_state=tx.init(flat.params), hyper=Hyper(lr=0.1, step=0))
    assert result.noise is None and result.global_batch_size == 4


class _TailOfPeer:
    """Two ranks' tail all-reduce, written out: the statistics tail of this rank's buffer plus a recorded one of
    the other rank (the gradient part is left alone: only the tail is under test)."""

    def __init__(self, peer_tail: torch.Tensor | None = None):
        self.peer_tail, self.seen = peer_tail, None

    def allreduce_(self, buffer, exact_tail=0):
        from scalesgd.comm_protocol import CommStats

        self.seen = buffer[-exact_tail:].clone()
        if self.peer_tail is not None:
            buffer[-exact_tail:] += self.peer_tail
        return CommStats(bytes_sent=0)


def test_previous_step_times_ride_in_the_tail_and_come_back_as_means_over_ranks():
    loss_fn = loss_function("classification")
    x, y = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1, 1, 0])
    results = []
    peer = _TailOfPeer()
    for rank, times, comm in ((1, (0.25, 0.125), peer), (0, (0.5, 0.0625), None)):
        torch.manual_seed(0)
        flat = FlatModel(mlp(input_shape=(3,), num_outputs=2, width=4), 2, torch.device("cpu"))
        tx = sgd()
        tap = NoiseTap("cheap", flat.model, world_size=2)
        flat.last_times = times  # as if this rank had taken a step before
        result, _ = train_step(flat=flat, loss_fn=loss_fn, x=x[3 * rank:3 * rank + 3], y=y[3 * rank:3 * rank + 3],
                               global_batch_size=6, shard_sizes=[3, 3], rank=rank,
                               comm=comm or _TailOfPeer(peer.seen), tx=tx, tx_state=tx.init(flat.params),
                               hyper=Hyper(lr=0.1, step=0), tap=tap, classification=True)
        results.append(result)
    alone, summed = results  # rank 1 saw only its own tail; rank 0 the sum of both
    assert alone.previous_comm_s == pytest.approx(0.25 / 2) and alone.previous_update_s == pytest.approx(0.125 / 2)
    assert summed.previous_comm_s == pytest.approx((0.5 + 0.25) / 2)
    assert summed.previous_update_s == pytest.approx((0.0625 + 0.125) / 2)
    # the slots do not touch their neighbours: both ranks' compute times, the loss over the 6 examples, no requests
    assert summed.compute_s_per_rank[1] == pytest.approx(alone.compute_s, rel=1e-6)
    assert summed.compute_s_per_rank[0] == pytest.approx(summed.compute_s, rel=1e-6)
    assert summed.global_batch_size == 6 and not summed.checkpoint_requested and not summed.stop_requested
    assert summed.noise is not None and alone.noise is not None
