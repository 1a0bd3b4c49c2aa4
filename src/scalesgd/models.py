"""Model constructors, by name.

Every constructor takes explicit keyword arguments: the input shape (without the batch axis), the number
of outputs, and its own knobs (width, dropout, norm). No BatchNorm anywhere: per-example gradients are not
defined under it (examples in a batch stop being independent); ``norm="group"`` offers GroupNorm instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

NORMS = ("none", "group")


def _check(name: str, width: int, dropout: float, norm: str = "none") -> None:
    if width < 1:
        raise ValueError(f"model {name!r}: width must be a positive integer, got {width}; pass --width 32, say")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model {name!r}: dropout must be in [0, 1), got {dropout}; pass --dropout 0.1, say")
    if norm not in NORMS:
        raise ValueError(f"model {name!r}: unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


class ExampleDropout(nn.Dropout):
    """``nn.Dropout`` whose masks belong to the examples: inside :func:`example_randomness` the mask of a row
    is drawn from (seed, step, this layer, the row's position in the *global* batch), so P workers draw for
    their rows exactly the masks one worker draws for the whole batch (P = 2 equals P = 1), every rank's
    rows get their own masks, and a run is reproducible from its seed. Outside that block (evaluation,
    measurements, other callers) it is ``nn.Dropout``, drawing from torch's global generator.

    Each rank draws the mask of the whole global batch and keeps its rows: B·features uniforms per layer and
    step, small beside the layer's own matrix product.
    """

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        self.rows: tuple[int, int, int] | None = None  # (seed of this layer and step, first row, global rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.rows is None:
            return super().forward(x)
        seed, first, total = self.rows
        g = torch.Generator(device=x.device).manual_seed(seed)
        keep = torch.rand((total, *x.shape[1:]), generator=g, device=x.device)[first:first + x.shape[0]] >= self.p
        return x * keep / (1.0 - self.p)


@contextlib.contextmanager
def example_randomness(model: nn.Module, *, seed: int, step: int, first_row: int, global_rows: int) -> Iterator[None]:
    """Within this block every :class:`ExampleDropout` of ``model`` draws per-example masks for rows
    ``first_row …`` of a global batch of ``global_rows`` at training step ``step`` (see the class)."""
    layers = [m for m in model.modules() if isinstance(m, ExampleDropout)]
    for i, m in enumerate(layers):
        digest = hashlib.blake2b(f"dropout/{seed}/{step}/{i}".encode(), digest_size=8).digest()
        m.rows = (int.from_bytes(digest, "little") >> 1, first_row, global_rows)
    try:
        yield
    finally:
        for m in layers:
            m.rows = None


def _group_norm(channels: int) -> nn.Module:
    groups = math.gcd(channels, 8) or 1
    return nn.GroupNorm(groups, channels)


def logreg(*, input_shape: Sequence[int], num_outputs: int, width: int = 1, dropout: float = 0.0,
           norm: str = "none") -> nn.Module:
    """Multinomial logistic regression (or linear regression with ``num_outputs=1``): flatten, one Linear.

    ``width`` and ``norm`` are accepted for a uniform signature and ignored.
    """
    _check("logreg", max(width, 1), dropout)
    layers: list[nn.Module] = [nn.Flatten()]
    if dropout > 0:
        layers.append(ExampleDropout(dropout))
    layers.append(nn.Linear(math.prod(input_shape), num_outputs))
    return nn.Sequential(*layers)


def mlp(*, input_shape: Sequence[int], num_outputs: int, width: int = 256, depth: int = 2,
        dropout: float = 0.0, norm: str = "none") -> nn.Module:
    """Fully connected ReLU network: flatten, ``depth`` hidden layers of ``width`` units, linear head."""
    _check("mlp", width, dropout, norm)
    if depth < 1:
        raise ValueError(f"model 'mlp': depth must be >= 1, got {depth}")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(depth):
        layers.append(nn.Linear(fan_in, width))
        if norm == "group":
            layers.append(nn.LayerNorm(width))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(ExampleDropout(dropout))
        fan_in = width
    layers.append(nn.Linear(fan_in, num_outputs))
    return nn.Sequential(*layers)


def cnn1d(*, input_shape: Sequence[int], num_outputs: int, width: int = 32, dropout: float = 0.0,
          norm: str = "none") -> nn.Module:
    """1-D CNN in the style of the MNIST-1D paper: three strided Conv1d + ReLU, then a linear head.

    Input ``(L,)`` (one channel) or ``(C, L)``.
    """
    _check("cnn1d", width, dropout, norm)
    if len(input_shape) == 1:
        channels, length = 1, int(input_shape[0])
        layers: list[nn.Module] = [nn.Unflatten(1, (1, length))]
    elif len(input_shape) == 2:
        channels, length = int(input_shape[0]), int(input_shape[1])
        layers = []
    else:
        raise ValueError(f"model 'cnn1d' takes inputs of shape (L,) or (C, L), got {tuple(input_shape)}; "
                         "use --model mlp or --model cnn for other shapes")
    specs = [(channels, width, 5, 2, 1), (width, width, 3, 2, 1), (width, width, 3, 2, 1)]
    for c_in, c_out, k, s, p in specs:
        layers.append(nn.Conv1d(c_in, c_out, k, stride=s, padding=p))
        if norm == "group":
            layers.append(_group_norm(c_out))
        layers.append(nn.ReLU())
        length = (length + 2 * p - k) // s + 1
    if length < 1:
        raise ValueError(f"model 'cnn1d': input length {input_shape[-1]} is too short (need >= 9)")
    layers.append(nn.Flatten())
    if dropout > 0:
        layers.append(ExampleDropout(dropout))
    layers.append(nn.Linear(width * length, num_outputs))
    return nn.Sequential(*layers)


def cnn(*, input_shape: Sequence[int], num_outputs: int, width: int = 64, dropout: float = 0.0,
        norm: str = "none") -> nn.Module:
    """Small cuda-convnet-style CNN for 32x32x3 images (the seed paper's CIFAR-10 network, scaled by width).

    conv5x5(width) ReLU maxpool3/2, conv5x5(width) ReLU maxpool3/2, FC(6·width) ReLU, FC(3·width) ReLU, FC.
    Any (C, H, W) input with H, W >= 8 works.
    """
    _check("cnn", width, dropout, norm)
    if len(input_shape) != 3:
        raise ValueError(f"model 'cnn' takes image inputs (C, H, W), got shape {tuple(input_shape)}; "
                         "use --model cnn1d for sequences or --model mlp for flat features")
    c, h, w = (int(v) for v in input_shape)
    layers: list[nn.Module] = []
    for c_in in (c, width):
        layers.append(nn.Conv2d(c_in, width, 5, padding=2))
        if norm == "group":
            layers.append(_group_norm(width))
        layers += [nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)]
        h, w = (h + 1) // 2, (w + 1) // 2
    layers.append(nn.Flatten())
    layers += [nn.Linear(width * h * w, 6 * width), nn.ReLU()]
    if dropout > 0:
        layers.append(ExampleDropout(dropout))
    layers += [nn.Linear(6 * width, 3 * width), nn.ReLU()]
    if dropout > 0:
        layers.append(ExampleDropout(dropout))
    layers.append(nn.Linear(3 * width, num_outputs))
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[..., nn.Module]] = {"logreg": logreg, "mlp": mlp, "cnn1d": cnn1d, "cnn": cnn}

# The width a model gets when the user does not say.
DEFAULT_WIDTH = {"logreg": 1, "mlp": 256, "cnn1d": 32, "cnn": 64}


def build_model(name: str, *, input_shape: Sequence[int], num_outputs: int, seed: int, width: int | None = None,
                depth: int = 2, dropout: float = 0.0, norm: str = "none") -> nn.Module:
    """The model ``name`` of :data:`MODELS` for inputs of ``input_shape``, initialised from ``seed``.

    Seeds torch's global RNG with ``seed`` before building, so every rank gets the same initial weights;
    the RNG is left where initialisation stopped (the trainer saves that state, so a run is the same whether
    the model was built in the worker or handed to it; its training steps draw dropout masks per example,
    see :class:`ExampleDropout`, not from this generator).

    Args:
        name: a key of :data:`MODELS`.
        input_shape: one example's shape, without the batch axis.
        num_outputs: classes (classification) or regression outputs.
        seed: initialisation seed.
        width: the model's width; None takes :data:`DEFAULT_WIDTH`.
        depth: hidden layers (``mlp`` only; ignored by the others).
        dropout, norm: as the constructors take them.
    Raises:
        ValueError: unknown name, or options the model cannot take (the message says which and how to fix).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    torch.manual_seed(seed)
    kwargs: dict = dict(input_shape=input_shape, num_outputs=num_outputs,
                        width=DEFAULT_WIDTH[name] if width is None else width, dropout=dropout, norm=norm)
    if name == "mlp":
        kwargs["depth"] = depth
    return MODELS[name](**kwargs)


def loss_function(task: str, reduction: str = "sum") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of ``task`` (``"classification"``: cross-entropy; ``"regression"``: ½‖out − y‖²).

    ``reduction="sum"`` gives Σᵢ ℓᵢ (the convention of :mod:`scalesgd.step`), ``"none"`` the per-example
    losses (B,) that :mod:`scalesgd.diversity` wants.
    """
    if task == "classification":
        return lambda out, y: nn.functional.cross_entropy(out, y, reduction=reduction)
    if reduction == "none":
        return lambda out, y: 0.5 * (out - y).pow(2).reshape(out.shape[0], -1).sum(1)
    return lambda out, y: 0.5 * nn.functional.mse_loss(out, y, reduction="sum")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
