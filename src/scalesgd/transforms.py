"""Gradient transformations in the style of optax: ``(init, update)`` pairs composed with :func:`chain`.

They act on the flat parameter and gradient vectors (every parameter of the model is a view into one flat
buffer, see :mod:`scalesgd.step`), so an update is a handful of vector operations. Transformations produce
a *descent direction* d; :func:`apply_updates_` takes the step w ← w − lr·d in one fused pass, as
``torch.optim.SGD`` does. ``chain(add_decayed_weights(wd), trace(momentum, nesterov), langevin(sigma))``
reproduces ``torch.optim.SGD(lr, momentum, weight_decay, nesterov)`` operation for operation:

    d = g + wd·w;  buf = d (first step) or momentum·buf + d;  d = buf (or d + momentum·buf, Nesterov);
    w ← w − lr·d

State is returned by ``update``; the buffers inside it are updated in place for speed, but nothing is
hidden in the transformation objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch


@dataclass(frozen=True)
class Hyper:
    """Per-step hyperparameters: the learning rate in use and the step number."""

    lr: float
    step: int


class GradientTransformation(NamedTuple):
    init: Callable[[torch.Tensor], Any]
    update: Callable[[torch.Tensor, Any, torch.Tensor, Hyper], tuple[torch.Tensor, Any]]


def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """d ← g + wd·w (L2 regularisation folded into the gradient, as torch.optim.SGD does)."""

    def init(params: torch.Tensor) -> None:
        return None

    def update(updates, state, params, hyper):
        if weight_decay:
            updates = updates.add_(params, alpha=weight_decay)
        return updates, state

    return GradientTransformation(init, update)


class TraceState(NamedTuple):
    momentum_buffer: torch.Tensor | None


def trace(momentum: float, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum: buf ← d (first step), then buf ← momentum·buf + d; output buf (or d + m·buf)."""

    def init(params: torch.Tensor) -> TraceState:
        return TraceState(None)

    def update(updates, state, params, hyper):
        if momentum == 0:
            return updates, state
        buf = state.momentum_buffer
        if buf is None:
            buf = updates.clone()
        else:
            torch.add(updates, buf, alpha=momentum, out=buf)  # momentum·buf + d in one pass
        out = updates.add_(buf, alpha=momentum) if nesterov else buf
        return out, TraceState(buf)

    return GradientTransformation(init, update)


class LangevinState(NamedTuple):
    generator: torch.Generator


def langevin(noise_std: float, seed: int) -> GradientTransformation:
    """Langevin noise (SGLD-style, a diversity-inducing mechanism of Yin et al. 2018, arXiv 1706.05699, §5).

    Variance convention: with σ = ``noise_std`` and learning rate η, each step adds ξ ~ N(0, σ²/η · I) to the
    descent direction, which the step w ← w − η·d turns into N(0, σ²·η · I) on the weights: variance σ²·η per
    coordinate and step. σ² = 2/τ gives SGLD at temperature τ (Welling & Teh 2011: N(0, 2η) for τ = 1). Added
    after momentum, so the noise is not accumulated by it. One draw per step, from a generator seeded from the
    run's seed alone: every rank adds the same noise and the replicas stay identical. Without momentum, in one
    step's distribution it equals independent per-example noise of second moment v = B·N·σ²/η on the B examples'
    gradients (N parameters; :func:`scalesgd.mechanisms.langevin_example_second_moment`).

    Args:
        noise_std: σ ≥ 0 (0: no noise, no draw).
        seed: the run's seed.
    """

    def init(params: torch.Tensor) -> LangevinState:
        return LangevinState(torch.Generator(device=params.device).manual_seed(seed + 7919))

    def update(updates, state, params, hyper):
        if noise_std == 0:
            return updates, state
        noise = torch.randn(updates.shape, generator=state.generator, device=updates.device,
                            dtype=updates.dtype)
        return updates.add_(noise, alpha=noise_std / math.sqrt(hyper.lr)), state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations in order; the state is the tuple of their states."""

    def init(params: torch.Tensor) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params, hyper):
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, hyper)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def sgd(*, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
        langevin_noise: float = 0.0, seed: int = 0) -> GradientTransformation:
    """SGD as torch.optim.SGD defines it (dampening 0), optionally with Langevin noise."""
    return chain(add_decayed_weights(weight_decay), trace(momentum, nesterov), langevin(langevin_noise, seed))


def apply_updates_(params: torch.Tensor, direction: torch.Tensor, lr: float) -> None:
    """w ← w − lr·d, in place on the flat parameter vector (one fused pass)."""
    params.add_(direction, alpha=-lr)


# The state types of this module, by name, so a saved state tree can be rebuilt without pickled classes.
_STATE_TYPES = {cls.__name__: cls for cls in (TraceState, LangevinState)}


def state_to_tree(state: Any) -> Any:
    """A transformation state as tensors and plain Python only, loadable with ``torch.load(weights_only=True)``.

    Tuples become lists, this module's named states ``{"type": name, "fields": [...]}``, a
    ``torch.Generator`` ``{"generator": get_state(), "device": str}``; tensors are cloned to the CPU.
    Inverse: :func:`state_from_tree`.
    """
    if isinstance(state, torch.Generator):
        return {"generator": state.get_state(), "device": str(state.device)}
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, tuple) and type(state).__name__ in _STATE_TYPES:
        return {"type": type(state).__name__, "fields": [state_to_tree(v) for v in state]}
    if isinstance(state, (tuple, list)):
        return [state_to_tree(v) for v in state]
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"cannot save transformation state of type {type(state).__name__}")


def state_from_tree(tree: Any, device: torch.device | str = "cpu") -> Any:
    """Rebuild a transformation state written by :func:`state_to_tree`; tensors go to ``device``."""
    if isinstance(tree, dict) and "generator" in tree:
        gen = torch.Generator(device=tree["device"])
        gen.set_state(tree["generator"])
        return gen
    if isinstance(tree, dict):
        return _STATE_TYPES[tree["type"]](*(state_from_tree(v, device) for v in tree["fields"]))
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, list):
        return tuple(state_from_tree(v, device) for v in tree)
    return tree
