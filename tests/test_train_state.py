"""TrainState round-trips exactly through a checkpoint written with tensors and plain Python only."""

from __future__ import annotations

import dataclasses

import torch

from scalesgd.batch_policy import BatchPolicyState
from scalesgd.data.sharding import Cursor
from scalesgd.diversity import EMAState
from scalesgd.train_state import TrainState
from scalesgd.transforms import Hyper, sgd


def _state() -> tuple[TrainState, object]:
    params = torch.randn(7, generator=torch.Generator().manual_seed(0))
    tx = sgd(momentum=0.9, weight_decay=1e-3, langevin_noise=0.1, seed=5)
    tx_state = tx.init(params)
    for step in range(3):  # a real momentum buffer and an advanced Langevin generator
        _, tx_state = tx.update(torch.randn(7), tx_state, params, Hyper(lr=0.1, step=step))
    comm_gen = torch.Generator().manual_seed(1001)
    torch.rand(3, generator=comm_gen)
    state = TrainState(params=params, tx_state=tx_state, noise_ema=EMAState(0.3, 12.5, 0.27, 3),
                       policy=BatchPolicyState(n_estimates=3, last_change_step=2, n_changes=1, pending_direction=-1,
                                               pending_count=1),
                       global_batch_size=96, cursor=Cursor(2, 40), torch_rng_state=torch.get_rng_state(),
                       comm_generator=comm_gen, step=31, examples=2900, train_time_s=1.25, time_to_target_s=None,
                       train_time_to_target_s=None)
    return state, tx


def _assert_same(a: TrainState, b: TrainState) -> None:
    assert torch.equal(a.params, b.params)
    assert torch.equal(a.torch_rng_state, b.torch_rng_state)
    assert torch.equal(a.comm_generator.get_state(), b.comm_generator.get_state())
    (_, trace_a, langevin_a), (_, trace_b, langevin_b) = a.tx_state, b.tx_state
    assert type(trace_a) is type(trace_b) and torch.equal(trace_a.momentum_buffer, trace_b.momentum_buffer)
    assert torch.equal(langevin_a.generator.get_state(), langevin_b.generator.get_state())
    plain = [f.name for f in dataclasses.fields(TrainState)
             if f.name not in ("params", "tx_state", "torch_rng_state", "comm_generator")]
    assert {k: getattr(a, k) for k in plain} == {k: getattr(b, k) for k in plain}


def test_train_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    state, tx = _state()
    torch.save(state.to_checkpoint(), tmp_path / "state.pt")
    back = TrainState.from_checkpoint(torch.load(tmp_path / "state.pt", weights_only=True))
    _assert_same(state, back)
    # The restored generators continue the same streams, and the restored transform state the same updates.
    assert torch.equal(torch.rand(4, generator=state.comm_generator), torch.rand(4, generator=back.comm_generator))
    g = torch.randn(7, generator=torch.Generator().manual_seed(9))
    d1, _ = tx.update(g.clone(), state.tx_state, state.params, Hyper(lr=0.1, step=3))
    d2, _ = tx.update(g.clone(), back.tx_state, back.params, Hyper(lr=0.1, step=3))
    assert torch.equal(d1, d2)
    # The checkpoint is a copy: training on does not change what was saved.
    saved = state.to_checkpoint()
    state.params.add_(1.0)
    assert not torch.equal(saved["params"], state.params)


def test_state_without_estimator_or_momentum_round_trips(tmp_path):
    state, _ = _state()
    tx = sgd()
    state = state.replace(noise_ema=None, tx_state=tx.init(state.params), time_to_target_s=3.5,
                          train_time_to_target_s=2.0)
    torch.save(state.to_checkpoint(), tmp_path / "s.pt")
    back = TrainState.from_checkpoint(torch.load(tmp_path / "s.pt", weights_only=True))
    assert back.noise_ema is None and back.tx_state[1].momentum_buffer is None
    assert (back.time_to_target_s, back.train_time_to_target_s) == (3.5, 2.0)
    assert back.epoch(100) == 2.4
