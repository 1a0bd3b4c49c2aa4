"""Diversity-inducing mechanisms: per-example stochastic quantization, and the noise they add to the diversity.

Yin et al. 2018 (AISTATS, arXiv 1706.05699, §5) show that independent, zero-mean noise ξᵢ of second moment
E‖ξᵢ‖² = v added to every per-example gradient gᵢ leaves the mean gradient ∇F unchanged and raises
M2 = (1/n)Σᵢ‖gᵢ‖² by v, so the batch-size bound B_S = M2/‖∇F‖² becomes

    B̃_S = B_S + v/‖∇F‖²,

larger batches keep their sample efficiency, at the price of noisier steps. The trainer offers the mechanisms
as options: ``--dropout`` (masks per example, :class:`scalesgd.models.ExampleDropout`), ``--langevin-noise``
(:func:`scalesgd.transforms.langevin`), ``--comm qsgd`` (the QSGD codec on each worker's summed gradient,
:mod:`scalesgd.comm`) and ``--example-qsgd-levels``: each *example's* gradient stochastically quantized
(QSGD, Alistarh et al. 2017, arXiv 1610.02132) before the sum, so the noise is per example, as in the
formula above, with a v known exactly (:func:`example_qsgd`).

Per-example gradients come from ``torch.func`` (``vmap`` of ``grad`` over the batch): b×N floats for a shard
of b examples and N parameters, affordable for small models; :func:`per_example_gradients` refuses more than
:data:`MAX_PER_EXAMPLE_ELEMENTS` with a clear error.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from scalesgd.errors import ConfigError

# b·N floats of per-example gradients one shard may materialise (2^26 float32 = 256 MiB).
MAX_PER_EXAMPLE_ELEMENTS = 2 ** 26


def check_per_example_affordable(model: nn.Module, local_batch_size: int, *, option: str,
                                 smaller_batch: str = "batch") -> None:
    """Raise if per-example gradients of ``local_batch_size`` examples would not fit, or the model draws dropout.
    ``smaller_batch``: how to ask for a smaller batch, in the message's advice (an adaptive batch policy's limit).

    Raises:
        ConfigError: b·N > :data:`MAX_PER_EXAMPLE_ELEMENTS`, or the model has an active dropout layer (torch.func
            would draw one mask for every example in the shard, not the per-example masks the trainer uses).
    """
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if local_batch_size * numel > MAX_PER_EXAMPLE_ELEMENTS:
        raise ConfigError(f"{option} materialises per-example gradients: {local_batch_size} examples x {numel:,} "
                          f"parameters = {local_batch_size * numel:,} floats per worker, more than "
                          f"{MAX_PER_EXAMPLE_ELEMENTS:,}; use a smaller model or {smaller_batch}, more --workers, or "
                          f"--comm qsgd (quantizes each worker's sum instead)")
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        raise ConfigError(f"{option} computes per-example gradients with torch.func, which cannot draw the trainer's "
                          f"per-example dropout masks; use one mechanism at a time (--dropout 0)")


def per_example_gradients(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                          x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every example's loss gradient, flattened in ``model.parameters()`` order (trainable ones).

    Args:
        model: a model without randomness in its forward (see :func:`check_per_example_affordable`).
        loss_fn: ``reduction="sum"`` semantics: ``loss_fn(out, y)`` returns Σᵢ ℓᵢ over its batch.
        x, y: a batch of b examples (tensors, first axis the batch).
    Returns:
        (grads, losses, outputs): grads (b, N) with row i = ∇ℓᵢ(w) (the sum-reduced per-example convention of
        :mod:`scalesgd.diversity`), losses (b,), outputs (b, ...) of the forward pass.
    Raises:
        ConfigError: b·N > :data:`MAX_PER_EXAMPLE_ELEMENTS`, or inputs that are not a tensor.
    """
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"per-example gradients need tensor inputs, got {type(x).__name__}; use a data set of "
                          "tensors or drop --example-qsgd-levels")
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    numel = sum(p.numel() for p in params.values())
    b = int(x.shape[0])
    if b * numel > MAX_PER_EXAMPLE_ELEMENTS:
        raise ConfigError(f"per-example gradients of {b} examples x {numel:,} parameters exceed "
                          f"{MAX_PER_EXAMPLE_ELEMENTS:,} floats; use a smaller batch or model")
    buffers = dict(model.named_buffers())

    def one(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out = torch.func.functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        loss = loss_fn(out, yi.unsqueeze(0))
        return loss, (loss.detach(), out.squeeze(0).detach())

    grads, (losses, outputs) = torch.func.vmap(torch.func.grad(one, has_aux=True), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(b, -1) for g in grads.values()], dim=1) if grads else x.new_zeros(b, 0)
    return flat, losses, outputs


def example_generator_seed(seed: int, step: int) -> int:
    """The seed of the generator whose stream, row by row of the global batch, gives the rounding of every example
    at ``step``: a function of (seed, step) only, so P workers draw for their rows what one worker draws."""
    digest = hashlib.blake2b(f"example-qsgd/{seed}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def example_qsgd(grads: torch.Tensor, *, levels: int, generator_seed: int, first_row: int = 0,
                 total_rows: int | None = None, bucket_size: int = 512, scale: str = "max",
                 with_variance: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize each row (one example's gradient) with QSGD's unbiased stochastic rounding, independently.

    Row i, cut into buckets of ``bucket_size`` coordinates with scale σ (‖·‖∞ for ``"max"``, ‖·‖₂ for ``"l2"``),
    becomes σ·sign(gᵢⱼ)·⌊s·|gᵢⱼ|/σ + u⌋/s with u ~ U[0, 1): E[Q(gᵢ)] = gᵢ, and (Alistarh et al. 2017, arXiv
    1610.02132, Lemma 3.1's proof) each coordinate with x = s·|gᵢⱼ|/σ between levels ℓ = ⌊x⌋ and ℓ + 1 adds
    variance (ℓ + 1 − x)(x − ℓ)·(σ/s)². The uniforms of the whole global batch of ``total_rows`` (padded rows)
    come from one generator seeded with ``generator_seed``; these ``grads`` are its rows ``first_row …``, so a
    shard quantizes its rows exactly as one worker holding the whole batch would (each rank draws the whole
    batch's uniforms and keeps its rows: cheap beside the per-example gradients themselves). Row 0 of a batch
    is bit for bit :func:`scalesgd.comm.qsgd_encode` then :func:`~scalesgd.comm.qsgd_decode` with a generator
    seeded ``generator_seed``.

    Args:
        grads: (b, N) per-example gradients.
        levels: s, 1 … 127.
        generator_seed: the step's seed (:func:`example_generator_seed`).
        first_row, total_rows: where these rows sit in the global batch (default: the whole batch).
        bucket_size, scale: as for :class:`scalesgd.comm.QSGDCodec`.
        with_variance: also return the exact variances (float64 work; the trainer does not need them).
    Returns:
        (quantized (b, N), error_variance (b,) float64 or None): vᵢ = E‖Q(gᵢ) − gᵢ‖², exact (no draw).
    Raises:
        ConfigError: bad levels, bucket size, scale, or rows outside the global batch.
    """
    if not 1 <= int(levels) <= 127:
        raise ConfigError(f"example quantization levels must be in 1..127, got {levels}")
    if int(bucket_size) < 1 or scale not in ("max", "l2"):
        raise ConfigError(f"example quantization needs bucket_size >= 1 and scale max or l2, got {bucket_size}, "
                          f"{scale!r}")
    b, n = grads.shape
    total = b if total_rows is None else int(total_rows)
    if first_row < 0 or first_row + b > total:
        raise ConfigError(f"rows {first_row}..{first_row + b - 1} are outside a global batch of {total}")
    nb = -(-n // bucket_size)
    padded = grads.new_zeros(b, nb * bucket_size)
    padded[:, :n] = grads
    v = padded.view(b, nb, bucket_size)
    mag = v.abs()
    scales = mag.amax(dim=2) if scale == "max" else torch.linalg.vector_norm(v, dim=2)  # (b, nb)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    gen = torch.Generator().manual_seed(int(generator_seed))
    u = torch.rand((total, nb, bucket_size), generator=gen, dtype=grads.dtype)[first_row:first_row + b]
    # The same operations, in the same order, as qsgd_encode/qsgd_decode (so a row equals the codec's result).
    x = torch.addcmul(u, mag, (levels / safe)[:, :, None]).floor_().clamp_(max=levels)
    quantized = x.copysign_(v).mul_((scales / levels)[:, :, None]).view(b, -1)[:, :n].contiguous()
    if not with_variance:
        return quantized, None
    mag64 = mag.double()
    scales64 = mag64.amax(dim=2) if scale == "max" else torch.linalg.vector_norm(mag64, dim=2)
    x64 = (mag64 * (levels / torch.where(scales64 > 0, scales64, torch.ones_like(scales64)))[:, :, None])
    frac = x64.clamp_(max=levels) - x64.floor()
    variance = ((frac * (1 - frac)).sum(dim=2) * (scales64 / levels) ** 2).sum(dim=1)  # (b,)
    return quantized, variance


@dataclass(frozen=True)
class ExampleQSGD:
    """``--example-qsgd-levels``: the step's summed gradient is Σᵢ Q(gᵢ), each example's gradient quantized by
    :func:`example_qsgd` with randomness keyed by (seed, step, row of the global batch).

    Attributes:
        levels: s, 1 … 127.
        bucket_size, scale: as for :class:`scalesgd.comm.QSGDCodec`.
    """

    levels: int
    bucket_size: int = 512
    scale: str = "max"

    def summed_gradient(self, model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, *, seed: int,
                        step: int, first_row: int, global_rows: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(outputs (b, ...), loss sum (), Σᵢ Q(gᵢ) (N,), Σᵢ‖Q(gᵢ)‖²) of this shard, rows ``first_row …`` of a
        global batch of ``global_rows`` at ``step``."""
        grads, losses, outputs = per_example_gradients(model, loss_fn, x, y)
        quantized, _ = example_qsgd(grads, levels=self.levels, bucket_size=self.bucket_size, scale=self.scale,
                                    generator_seed=example_generator_seed(seed, step), first_row=first_row,
                                    total_rows=global_rows, with_variance=False)
        sq = float(quantized.double().square().sum())
        return outputs, losses.sum(), quantized.sum(dim=0), sq


def noisy_batch_bound(batch_bound: float, mean_grad_sq_norm: float, noise_second_moment: float) -> float:
    """B̃_S = B_S + v/‖∇F‖² (Yin et al. 2018, §5): the bound under independent zero-mean per-example noise of
    second moment v = E‖ξᵢ‖² (mean over examples if it varies), in squared-gradient units like ‖∇F‖².

    Raises:
        ConfigError: ‖∇F‖² ≤ 0 or v < 0.
    """
    if not mean_grad_sq_norm > 0 or noise_second_moment < 0:
        raise ConfigError(f"noisy_batch_bound needs ||grad F||^2 > 0 and v >= 0, got {mean_grad_sq_norm}, "
                          f"{noise_second_moment}")
    return batch_bound + noise_second_moment / mean_grad_sq_norm


def langevin_example_second_moment(noise_std: float, lr: float, batch_size: int, numel: int) -> float:
    """The per-example noise second moment v that Langevin noise equals in one step's distribution.

    ``--langevin-noise σ`` adds N(0, σ²/lr) per coordinate to the step's descent direction (the mean gradient),
    one draw per step (:func:`scalesgd.transforms.langevin`). Independent per-example noise of second moment v
    over N coordinates adds v/B to the mean gradient's second moment; so in distribution Langevin noise is
    per-example noise with v = B·N·σ²/lr, and B̃_S = B_S + B·N·σ²/(lr·‖∇F‖²) at that batch and rate.
    """
    if lr <= 0 or batch_size < 1 or noise_std < 0:
        raise ConfigError(f"need lr > 0, batch >= 1, noise >= 0; got {lr}, {batch_size}, {noise_std}")
    return batch_size * numel * noise_std ** 2 / lr

