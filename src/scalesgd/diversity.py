"""Gradient diversity: per-example squared gradient norms, exact data-set statistics and online estimators.

Conventions (one for the whole module, DESIGN rule 13): a *per-example gradient* is the gradient of that
example's own loss, ``g_i = grad_w loss(w; z_i)``, whatever reduction the training loss uses ("sum-reduced
per-example gradients"). The gradient of the mean loss over a batch of b examples is ``G_b = (1/b) sum_i g_i``.

Three layers, fastest first:

* :class:`GhostNormTap` computes ``||g_i||^2`` for every example of a batch inside the ordinary backward pass,
  from each layer's input (saved by a forward hook) and output gradient (seen by a tensor hook), without
  materialising per-example gradients where a cheaper identity exists ("ghost norms"):
  Linear ``||a_i||^2 ||b_i||^2`` (Goodfellow, arXiv 1510.01799); layers with a sequence/spatial axis of length
  T (Linear on (B, T, d), Conv after unfolding) ``<A_i A_i^T, B_i B_i^T>`` when ``2 T^2 < d p``, otherwise the
  layer's per-example gradient is materialised (Li et al., arXiv 2110.05679; Bu et al., arXiv 2205.10683):
  by one batched matmul on the unfolded input for small layers, and for large convolutions through the
  convolution's own weight-gradient kernel (``torch.nn.grad.conv2d_weight``, a memory-bounded chunk of
  examples per call as separate groups), which on CPU is faster than the matmul and needs no unfolded copy
  of the input. Whole-model norm = sum over layers.
  It never reads or writes ``.grad``.
* :func:`per_example_sq_norms` and :func:`gradient_diversity` wrap the tap for a model, a loss and data.
  :func:`loop_sq_norms` and :func:`vmap_sq_norms` are the slow, obviously correct references.
* :func:`per_example_noise_stats`, :func:`two_batch_noise_stats` (and its average over the workers,
  :func:`rank_averaged_two_batch_noise_stats`, the one the trainer runs) and :class:`NoiseScaleEMA` estimate
  ``||G||^2`` and ``tr Sigma`` online during training, smooth them separately and only then form
  ``B_simple = tr Sigma / ||G||^2`` and the batch-size bound ``n Delta = B_simple + 1``
  (McCandlish et al., arXiv 1812.06162; Yin et al., arXiv 1706.05699; REFERENCES section 3).
* :func:`measure_exact_diversity` and :func:`diversity_at_checkpoint`: the exact whole-data figures of a run.

Names: ``sum_grad_sq_norm`` is ``||sum_i g_i||^2`` of the summed gradient, ``mean_grad_sq_norm`` (and the
metrics' ``grad_sq_norm_*``) ``||G||^2`` of the mean gradient; the two differ by n^2.
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scalesgd.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Per-layer temporaries (unfolded inputs, Gram matrices, materialised per-example gradients) are built for
# chunks of examples no larger than this, so the tap's extra memory stays bounded whatever the batch size.
# 4 MiB keeps the small CNN's peak within ~1.1x of a plain step (bench/diversity_overhead.py); larger
# chunks (fewer, bigger kernel calls) bought no speed there.
DEFAULT_CHUNK_BYTES = 4 * 2**20

# A conv layer whose per-example weight gradient costs at least this many multiply-adds is materialised with
# the convolution's own weight-gradient kernel, chunks of examples as groups (fast, no unfolded input copy);
# smaller layers are unfolded and done in one batched matmul, where per-call overhead would dominate a loop.
_CONV_LOOP_MIN_MACS = 2_000_000


# --------------------------------------------------------------------------------------------------------
# Per-example losses


def per_example_losses(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each example's own loss, shape (B,), whatever reduction ``loss_fn`` was built with.

    ``loss_fn`` is either a ``torch.nn`` loss module (its ``reduction`` is overridden to ``"none"`` on a copy)
    or a function returning per-example losses of shape (B,) or (B, ...) (summed over the trailing axes),
    e.g. ``lambda out, y: F.cross_entropy(out, y, reduction="none")``.
    """
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        loss_fn = copy.copy(loss_fn)
        loss_fn.reduction = "none"
    losses = loss_fn(outputs, targets)
    batch = outputs.shape[0]
    if losses.dim() == 0 or losses.shape[0] != batch:
        raise ConfigError(
            f"loss_fn returned shape {tuple(losses.shape)} for a batch of {batch}; per-example statistics need "
            "each example's loss: pass a torch.nn loss module, or a function returning shape (B,), e.g. "
            "lambda out, y: F.cross_entropy(out, y, reduction='none')")
    if losses.dim() > 1:
        losses = losses.reshape(batch, -1).sum(1)
    return losses  # (B,)


# --------------------------------------------------------------------------------------------------------
# The ghost-norm tap


def _overrides(module: nn.Module, base: type) -> bool:
    """True when ``module``'s class replaces ``base.forward`` (then the base class's formula may not hold)."""
    return type(module).forward is not base.forward


def _kind(module: nn.Module) -> str | None:
    """The closed-form rule that applies to ``module``'s own parameters, or None (torch.func fallback)."""
    for base, kind in ((nn.Linear, "linear"), (nn.Conv1d, "conv"), (nn.Conv2d, "conv"),
                       (nn.Embedding, "embedding"), (nn.LayerNorm, "layernorm"), (nn.GroupNorm, "groupnorm"),
                       (nn.modules.batchnorm._BatchNorm, "batchnorm")):
        if isinstance(module, base) and not _overrides(module, base):
            return kind
    return None


def _conv_padding(module: nn.Module) -> tuple[list[int], str]:
    """Explicit (left, right) padding per spatial dim, in F.pad order (last dim first), and the pad mode."""
    k, dil = module.kernel_size, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            per_dim = [(0, 0)] * len(k)
        else:  # "same": the same split torch uses (extra element at the end when the total is odd)
            per_dim = [((d * (kk - 1)) // 2, d * (kk - 1) - (d * (kk - 1)) // 2) for d, kk in zip(dil, k)]
    else:
        per_dim = [(p, p) for p in module.padding]
    pads: list[int] = []
    for left, right in reversed(per_dim):
        pads += [left, right]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return pads, mode


def _chunks(batch: int, bytes_per_example: int, chunk_bytes: int) -> Iterator[slice]:
    step = max(1, chunk_bytes // max(1, bytes_per_example))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


def _gram_or_full(a: torch.Tensor, b: torch.Tensor, chunk_bytes: int) -> tuple[torch.Tensor, str]:
    """Per-example ``||b_i^T a_i||_F^2`` for a (B, G, T, d) and b (B, G, T, p), summed over the G groups.

    Gram form ``<a_i a_i^T, b_i b_i^T>`` costs ~T^2 (d + p) per group, the materialised gradient ~T d p;
    the Gram form is chosen when ``2 T^2 < d p`` (REFERENCES section 3). Returns (B,) and the form used.
    """
    batch, groups, t, d = a.shape
    p = b.shape[-1]
    out = a.new_empty(batch)
    gram = 2 * t * t < d * p
    per_example = groups * (2 * t * t if gram else p * d) * a.element_size()
    for s in _chunks(batch, per_example, chunk_bytes):
        if gram:
            ga = torch.matmul(a[s], a[s].transpose(-1, -2))  # (c, G, T, T)
            gb = torch.matmul(b[s], b[s].transpose(-1, -2))  # (c, G, T, T)
            out[s] = (ga * gb).sum((1, 2, 3))
        else:
            w = torch.matmul(b[s].transpose(-1, -2), a[s])  # (c, G, p, d): per-example gradients
            out[s] = w.square().sum((1, 2, 3))
    return out, "gram" if gram else "materialised"


class _Handler:
    """Hooks for one layer (or one fallback subtree): what to save in forward, what to add in backward."""

    def __init__(self, name: str, module: nn.Module, kind: str):
        self.name, self.module, self.kind = name, module, kind
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        self.weight_grad = isinstance(weight, torch.Tensor) and weight.requires_grad
        self.bias_grad = isinstance(bias, torch.Tensor) and bias.requires_grad


class GhostNormTap:
    """Per-example squared gradient norms from an ordinary backward pass ("ghost norms").

    Construct once per model (hooks are registered once); use as::

        out = model(x)
        loss = loss_fn(out, y).sum() * loss_scale      # e.g. loss_scale = 1 / global_batch_size
        with tap.capture():
            loss.backward()
        sq_norms = tap.sq_norms(loss_scale)            # (B,): ||grad loss_i||^2, sum-reduced convention

    The forward hooks save only what the backward needs (for a plain Linear just ``||a_i||^2``, shape (B,));
    the norms are computed inside the backward hooks, layer by layer, so no per-example gradient outlives its
    layer. ``.grad`` is never touched. With ``enabled=False`` every hook returns at once.

    Supported with closed forms: Linear (any number of middle axes), Conv1d/Conv2d (any stride, padding,
    padding mode, dilation, groups), Embedding, LayerNorm, GroupNorm, BatchNorm in eval mode. BatchNorm in
    training mode is refused (its examples are not independent). Any other module that owns trainable
    parameters is handled, with its whole subtree, by torch.func (``vmap(grad(functional_call))``) on the
    saved inputs, with one warning per tap. A module called more than once per forward (weight sharing) or
    a parameter shared by two modules is an error: per-layer norms do not add up for shared weights.

    The batch axis is axis 0 of every parametrised layer's input. Dropout and other randomness are those of
    the forward pass that was run: the norms are of that pass's per-example gradients.

    Args:
        model: the model; hooks go on its submodules.
        enabled: whether hooks do anything now (see :attr:`enabled`).
        chunk_bytes: bound on per-layer temporaries (examples are processed in chunks).
    """

    def __init__(self, model: nn.Module, *, enabled: bool = True, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if chunk_bytes < 1:
            raise ConfigError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.enabled = enabled
        self.chunk_bytes = int(chunk_bytes)
        self._capturing = False
        self._in_fallback = False
        self._parts: list[torch.Tensor] = []
        self._fired: set[str] = set()
        self._reused: set[str] = set()
        self._captured = False
        # layer name -> the rule its norms came from ("outer", "gram", "materialised", "conv-loop",
        # "embedding", "norm", "func"); filled by the hooks, for inspection and tests
        self.forms: dict[str, str] = {}
        self._handles: list[Any] = []
        self._handlers: list[_Handler] = []
        fallback_names: list[str] = []
        skip_prefixes: list[str] = []
        owner: dict[int, str] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._handles.append(module.register_forward_hook(self._batchnorm_check(name)))
            if any(name.startswith(prefix) for prefix in skip_prefixes):
                continue
            kind = _kind(module)
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if kind is None:
                kind = "fallback"
                fallback_names.append(f"{name or '<model>'} ({type(module).__name__})")
                skip_prefixes.append(f"{name}." if name else "")
                own = [p for p in module.parameters() if p.requires_grad]
            for p in own:
                if id(p) in owner:
                    raise ConfigError(
                        f"a parameter is shared by modules {owner[id(p)]!r} and {name!r} (tied weights); per-layer "
                        "ghost norms do not add up for a shared parameter: untie the weights, or use vmap_sq_norms")
                owner[id(p)] = name
            handler = _Handler(name or "<model>", module, kind)
            self._handlers.append(handler)
            hook = getattr(self, f"_forward_{kind}")
            if kind == "fallback":
                self._handles.append(module.register_forward_hook(
                    lambda m, args, kwargs, out, h=handler, f=hook: f(h, args, kwargs, out), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(
                    lambda m, inp, out, h=handler, f=hook: f(h, inp[0], out)))
        if fallback_names:
            warnings.warn(
                "ghost norms: no closed form for " + ", ".join(fallback_names) + "; their per-example norms come "
                "from torch.func (vmap of grad) on the saved inputs, which is slower. Supported closed forms: "
                "Linear, Conv1d, Conv2d, Embedding, LayerNorm, GroupNorm, BatchNorm in eval mode.",
                stacklevel=2)

    # ---- public API

    @contextmanager
    def capture(self) -> Iterator["GhostNormTap"]:
        """Record the per-example norms of the backward pass run inside this block (one batch)."""
        self._parts, self._fired, self._reused = [], set(), set()
        self._captured = False
        self._capturing = True
        try:
            yield self
        finally:
            self._capturing = False
            self._captured = True

    def sq_norms(self, loss_scale: float = 1.0) -> torch.Tensor:
        """``||grad_w loss_i||^2`` per example, shape (B,), for the last captured backward.

        Args:
            loss_scale: the factor c in the backpropagated loss ``c * sum_i loss_i`` (``1/B`` for a mean
                loss over B examples). Norms scale with c^2; this divides it out, so the result is in the
                sum-reduced per-example convention of the module docstring.
        """
        if not self._captured:
            raise ConfigError("sq_norms() needs a backward pass run inside `with tap.capture():` first")
        if self._reused:
            raise ConfigError(
                f"module(s) {sorted(self._reused)} ran more than once in the captured pass (shared weights or "
                "recomputation); ghost norms need each parametrised layer called once per forward; use "
                "vmap_sq_norms for such models")
        if not self._parts:
            raise ConfigError(
                "the captured backward reached no parametrised layer whose forward ran with the tap enabled: "
                "run the forward pass with grad enabled and tap.enabled = True before the captured backward")
        if not loss_scale or not math.isfinite(loss_scale):
            raise ConfigError(f"loss_scale must be finite and non-zero, got {loss_scale}")
        total = torch.stack(self._parts).sum(0)  # (B,)
        return total / (float(loss_scale) ** 2)

    def close(self) -> None:
        """Remove every hook; the tap does nothing afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "GhostNormTap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing shared by the hooks

    def _active_forward(self, out: Any) -> bool:
        return (self.enabled and not self._in_fallback and torch.is_grad_enabled()
                and isinstance(out, torch.Tensor) and out.requires_grad)

    def _add(self, handler: _Handler, part: torch.Tensor, form: str) -> None:
        self.forms[handler.name] = form
        if handler.name in self._fired:
            self._reused.add(handler.name)
        self._fired.add(handler.name)
        self._parts.append(part)

    def _batchnorm_check(self, name: str) -> Callable:
        def check(module: nn.Module, inp: Any, out: Any) -> None:
            if not (self.enabled and torch.is_grad_enabled() and not self._in_fallback):
                return
            if module.training or module.running_mean is None:
                raise ConfigError(
                    f"per-example gradient norms are undefined under BatchNorm in training mode (layer "
                    f"{name!r}): it normalises with the batch's own statistics, so the examples in a batch are "
                    "not independent and no example has a gradient of its own. Use GroupNorm (--norm group) or "
                    "LayerNorm, or call model.eval() so BatchNorm uses its running statistics")
        return check

    # ---- Linear

    def _forward_linear(self, h: _Handler, x: torch.Tensor, out: torch.Tensor) -> None:
        if not self._active_forward(out):
            return
        x = x.detach()
        if x.dim() == 2:
            # ||grad_W||^2 + ||grad_c||^2 = ||b_i||^2 (||a_i||^2 + 1): keep only the (B,) factor, not the input
            if h.weight_grad:
                coef = torch.linalg.vector_norm(x, dim=1).square_()  # (B,)
                if h.bias_grad:
                    coef.add_(1.0)
            else:
                coef = None  # bias only
            out.register_hook(lambda g: self._backward_linear2d(h, coef, g))
        elif x.dim() > 2:
            out.register_hook(lambda g: self._backward_linear_seq(h, x, g))
        else:
            raise ConfigError(f"layer {h.name!r}: per-example norms need a batch axis; got an input of shape "
                              f"{tuple(x.shape)}")

    def _backward_linear2d(self, h: _Handler, coef: torch.Tensor | None, g: torch.Tensor) -> None:
        if not self._capturing:
            return
        with torch.no_grad():
            part = torch.linalg.vector_norm(g, dim=1).square_()  # (B,) ||b_i||^2
            if coef is not None:
                part.mul_(coef)
            self._add(h, part, "outer")

    def _backward_linear_seq(self, h: _Handler, x: torch.Tensor, g: torch.Tensor) -> None:
        if not self._capturing:
            return
        with torch.no_grad():
            batch = x.shape[0]
            a = x.reshape(batch, 1, -1, x.shape[-1])  # (B, 1, T, d)
            b = g.reshape(batch, 1, -1, g.shape[-1])  # (B, 1, T, p)
            part, form = _gram_or_full(a, b, self.chunk_bytes) if h.weight_grad else (x.new_zeros(batch), "bias")
            if h.bias_grad:
                part = part + b.sum(2).square().sum((1, 2))
            self._add(h, part, form)

    # ---- Conv1d / Conv2d

    def _forward_conv(self, h: _Handler, x: torch.Tensor, out: torch.Tensor) -> None:
        if not self._active_forward(out):
            return
        x = x.detach()
        if x.dim() != len(h.module.kernel_size) + 2:
            raise ConfigError(f"layer {h.name!r}: per-example norms need a batched input (B, C, ...); got shape "
                              f"{tuple(x.shape)}")
        out.register_hook(lambda g: self._backward_conv(h, x, g))

    def _backward_conv(self, h: _Handler, x: torch.Tensor, g: torch.Tensor) -> None:
        if not self._capturing:
            return
        with torch.no_grad():
            part, form = self._conv_weight_sq(h.module, x, g) if h.weight_grad else (x.new_zeros(x.shape[0]), "bias")
            if h.bias_grad:
                part = part + g.flatten(2).sum(2).square().sum(1)
            self._add(h, part, form)

    def _conv_weight_sq(self, m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Per-example ``||grad_weight||^2`` of Conv1d/Conv2d ``m`` from its input x and output gradient g."""
        batch, groups = x.shape[0], m.groups
        pads, mode = _conv_padding(m)
        explicit = not (mode == "constant" and pads[0::2] == pads[1::2])  # asymmetric or non-zero padding
        sym_padding = [0] * len(m.kernel_size) if explicit else list(reversed(pads[0::2]))
        t = math.prod(g.shape[2:])
        d = (x.shape[1] // groups) * math.prod(m.kernel_size)
        p = g.shape[1] // groups
        if 2 * t * t >= d * p and groups * p * d * t >= _CONV_LOOP_MIN_MACS:
            # large layer, materialised through the conv weight-gradient kernel, the c examples of a chunk
            # stacked along channels as c independent groups of one call: as few calls as the memory budget
            # for their c per-example gradients allows (many small calls are slow when cores are contended)
            weight_grad = torch.nn.grad.conv1d_weight if x.dim() == 3 else torch.nn.grad.conv2d_weight
            c_out, per_group_in = m.weight.shape[0], m.weight.shape[1]
            chunk = max(1, self.chunk_bytes // (m.weight.numel() * x.element_size()))
            norms = []
            for start in range(0, batch, chunk):
                xs, gs = x[start:start + chunk], g[start:start + chunk]
                c = xs.shape[0]
                if explicit:
                    xs = F.pad(xs, pads, mode=mode)
                w = weight_grad(xs.reshape(1, -1, *xs.shape[2:]), (c * c_out, per_group_in, *m.kernel_size),
                                gs.reshape(1, -1, *gs.shape[2:]), stride=m.stride, padding=sym_padding,
                                dilation=m.dilation, groups=c * groups)  # (c * C_out, ...): per-example grads
                norms.append(torch.linalg.vector_norm(w.reshape(c, -1), dim=1))
            return torch.cat(norms).square_(), "conv-loop"
        # small layer, or Gram form: unfold (im2col) and do the whole batch in chunks
        out, form = x.new_empty(batch), ""
        two_d = x.dim() == 4
        kernel = tuple(m.kernel_size) if two_d else (1, m.kernel_size[0])
        dilation = tuple(m.dilation) if two_d else (1, m.dilation[0])
        stride = tuple(m.stride) if two_d else (1, m.stride[0])
        padding = tuple(sym_padding) if two_d else (0, sym_padding[0])
        per_example = (d * groups * t + groups * (2 * t * t if 2 * t * t < d * p else p * d)) * x.element_size()
        for s in _chunks(batch, per_example, self.chunk_bytes):
            xs = x[s]
            if explicit:
                xs = F.pad(xs, pads, mode=mode)
            if not two_d:
                xs = xs.unsqueeze(2)
            cols = F.unfold(xs, kernel, dilation=dilation, padding=padding, stride=stride)  # (c, G*d, T)
            c = cols.shape[0]
            a = cols.reshape(c, groups, d, t).transpose(-1, -2)  # (c, G, T, d)
            b = g[s].reshape(c, groups, p, t).transpose(-1, -2)  # (c, G, T, p)
            out[s], form = _gram_or_full(a, b, self.chunk_bytes)
        return out, form

    # ---- Embedding

    def _forward_embedding(self, h: _Handler, idx: torch.Tensor, out: torch.Tensor) -> None:
        if not self._active_forward(out):
            return
        if h.module.scale_grad_by_freq:
            raise ConfigError(f"layer {h.name!r}: Embedding(scale_grad_by_freq=True) scales gradients by counts "
                              "over the whole batch, so examples have no gradient of their own; turn it off")
        if idx.dim() < 1:
            raise ConfigError(f"layer {h.name!r}: per-example norms need a batch axis on the indices")
        out.register_hook(lambda g: self._backward_embedding(h, idx, g))

    def _backward_embedding(self, h: _Handler, idx: torch.Tensor, g: torch.Tensor) -> None:
        if not self._capturing:
            return
        with torch.no_grad():
            batch, vocab = idx.shape[0], h.module.num_embeddings
            flat_idx = idx.reshape(batch, -1)  # (B, T)
            rows = g.reshape(batch, flat_idx.shape[1], -1)  # (B, T, D)
            example = torch.arange(batch, device=idx.device).unsqueeze(1).expand_as(flat_idx)
            keys = (example * vocab + flat_idx).reshape(-1)  # (B*T,) one key per (example, row)
            rows = rows.reshape(keys.shape[0], -1)
            if h.module.padding_idx is not None:
                keep = flat_idx.reshape(-1) != h.module.padding_idx
                keys, rows = keys[keep], rows[keep]
            uniq, inverse = torch.unique(keys, return_inverse=True)
            summed = rows.new_zeros(uniq.shape[0], rows.shape[1]).index_add_(0, inverse, rows)  # (U, D)
            part = g.new_zeros(batch).index_add_(0, uniq // vocab, summed.square().sum(1))
            self._add(h, part, "embedding")

    # ---- LayerNorm, GroupNorm, BatchNorm (eval)

    def _forward_layernorm(self, h: _Handler, x: torch.Tensor, out: torch.Tensor) -> None:
        self._forward_norm(h, x, out)

    _forward_groupnorm = _forward_layernorm
    _forward_batchnorm = _forward_layernorm

    def _forward_norm(self, h: _Handler, x: torch.Tensor, out: torch.Tensor) -> None:
        if not self._active_forward(out):
            return
        x = x.detach()
        out.register_hook(lambda g: self._backward_norm(h, x, g))

    def _backward_norm(self, h: _Handler, x: torch.Tensor, g: torch.Tensor) -> None:
        if not self._capturing:
            return
        with torch.no_grad():
            m, batch = h.module, x.shape[0]
            if h.kind == "layernorm":
                x_hat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
                sum_dims = tuple(range(1, x.dim() - len(m.normalized_shape)))
            else:
                if h.kind == "groupnorm":
                    x_hat = F.group_norm(x, m.num_groups, None, None, m.eps)
                else:
                    x_hat = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
                sum_dims = tuple(range(2, x.dim()))
            part = x.new_zeros(batch)
            if h.weight_grad:
                gw = (x_hat * g).sum(sum_dims) if sum_dims else x_hat * g
                part = part + gw.reshape(batch, -1).square().sum(1)
            if h.bias_grad:
                gb = g.sum(sum_dims) if sum_dims else g
                part = part + gb.reshape(batch, -1).square().sum(1)
            self._add(h, part, "norm")

    # ---- anything else: torch.func on the saved inputs

    def _forward_fallback(self, h: _Handler, args: tuple, kwargs: dict, out: Any) -> None:
        if not (self.enabled and not self._in_fallback and torch.is_grad_enabled()):
            return
        outs = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, (tuple, list)) else None
        if outs is None or not all(isinstance(o, torch.Tensor) for o in outs):
            raise ConfigError(f"layer {h.name!r} ({type(h.module).__name__}): the torch.func fallback needs a "
                              "tensor or a tuple of tensors as output")
        live = [o for o in outs if o.requires_grad]
        if not live:
            return
        saved_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        saved_kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        live_pos = [i for i, o in enumerate(outs) if o.requires_grad]
        torch.autograd.graph.register_multi_grad_hook(
            live, lambda grads: self._backward_fallback(h, saved_args, saved_kwargs, live_pos, grads))

    def _backward_fallback(self, h: _Handler, args: tuple, kwargs: dict, live_pos: list[int],
                           grads: Sequence[torch.Tensor | None]) -> None:
        if not self._capturing:
            return
        module = h.module
        params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
        batch = next(g.shape[0] for g in grads if g is not None)

        def batched(v: Any) -> bool:
            return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch

        def loss_one(prm: dict, args_i: tuple, kwargs_i: dict, grads_i: tuple) -> torch.Tensor:
            call_args = tuple(a.unsqueeze(0) if batched_a else a for a, batched_a in zip(args_i, arg_dims))
            call_kwargs = {k: v.unsqueeze(0) if kwarg_dims[k] == 0 else v for k, v in kwargs_i.items()}
            out = torch.func.functional_call(module, prm, call_args, call_kwargs)
            outs = [out] if isinstance(out, torch.Tensor) else list(out)
            # <output_i, grad_output_i>: its gradient w.r.t. the parameters is example i's gradient
            return sum((outs[pos] * g.unsqueeze(0)).sum() for pos, g in zip(live_pos, grads_i) if g is not None)

        arg_dims = tuple(0 if batched(a) else None for a in args)
        kwarg_dims = {k: 0 if batched(v) else None for k, v in kwargs.items()}
        grad_dims = tuple(None if g is None else 0 for g in grads)
        self._in_fallback = True
        try:
            per_grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, arg_dims, kwarg_dims, grad_dims),
                                        randomness="error")(params, args, kwargs, tuple(grads))
        except RuntimeError as e:
            if "randomness" in str(e):
                raise ConfigError(
                    f"layer {h.name!r} ({type(module).__name__}) draws random numbers (dropout?) inside a module "
                    "that needs the torch.func fallback, whose recomputation cannot reproduce them; move the "
                    "randomness out of that module or put the model in eval mode") from e
            raise
        finally:
            self._in_fallback = False
        with torch.no_grad():
            part = sum(v.reshape(batch, -1).square().sum(1) for v in per_grads.values())
            self._add(h, part, "func")


# --------------------------------------------------------------------------------------------------------
# Per-example norms for a model, a loss and a batch: fast path and references


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (requires_grad=True); nothing to measure")
    return params


def _norms_and_grad(tap: GhostNormTap, model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor,
                    targets: torch.Tensor, params: list[torch.Tensor],
                    want_grad: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """One forward and one backward of ``sum_i loss_i``: per-example sq norms (B,) and the summed gradient."""
    with torch.enable_grad():
        losses = per_example_losses(loss_fn, model(inputs), targets)  # (B,)
        with tap.capture():
            grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
    sq = tap.sq_norms(1.0)
    if not want_grad:
        return sq, None
    return sq, [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]


def per_example_sq_norms(model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """``||grad_w loss(w; z_i)||^2`` for every example of a batch, by ghost norms in one backward pass.

    The gradient is that of example i's own loss (sum-reduced convention), independent of the reduction
    ``loss_fn`` was built with: a mean-reduced loss gives the same result as a sum-reduced one.

    Args:
        model: a model in the mode you want measured (train: with dropout; eval: without).
        loss_fn: ``torch.nn`` loss module or function returning per-example losses (see
            :func:`per_example_losses`).
        inputs: (B, ...) batch; targets: (B, ...) matching targets.
    Returns:
        (B,) tensor of squared norms in the parameters' dtype. ``.grad`` is not touched.
    """
    params = _trainable(model)
    with GhostNormTap(model) as tap:
        sq, _ = _norms_and_grad(tap, model, loss_fn, inputs, targets, params, want_grad=False)
    return sq.detach()


def loop_sq_norms(model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Slow reference for :func:`per_example_sq_norms`: one autograd call per example.

    Runs one batched forward and then ``autograd.grad(loss_i)`` for each i, so every example's gradient comes
    from the *same* forward pass (same dropout masks) as the fast path's. Correct as long as examples do not
    interact in the forward pass (no BatchNorm in training mode). Returns (B,).
    """
    params = _trainable(model)
    with torch.enable_grad():
        losses = per_example_losses(loss_fn, model(inputs), targets)  # (B,)
        out = []
        for i in range(losses.shape[0]):
            grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
            out.append(sum(gr.double().square().sum() for gr in grads if gr is not None))
    return torch.stack(out).to(losses.dtype)


def vmap_sq_norms(model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, *,
                  randomness: str = "error") -> torch.Tensor:
    """Second reference: per-example gradients materialised with ``torch.func.vmap(grad(functional_call))``.

    Each example runs its own forward pass of batch size 1, so stochastic layers draw their own randomness;
    compare with the fast path only for deterministic forwards (``randomness="error"`` enforces it). Returns (B,).
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError("the model has no trainable parameters (requires_grad=True); nothing to measure")
    buffers = dict(model.named_buffers())

    def loss_one(prm: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, (prm, buffers), (x.unsqueeze(0),))
        return per_example_losses(loss_fn, out, y.unsqueeze(0)).sum()

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0), randomness=randomness)(
        params, inputs, targets)
    return sum(g.reshape(inputs.shape[0], -1).square().sum(1) for g in grads.values())


# --------------------------------------------------------------------------------------------------------
# Exact diversity of a data set (streaming, optionally across workers)


@dataclass(frozen=True)
class DiversityStats:
    """Gradient diversity of a set of n examples (Yin et al. 2018; REFERENCES section 3).

    All gradients are per-example loss gradients g_i (sum-reduced convention); G = (1/n) sum_i g_i is the
    gradient of the mean loss.

    Attributes:
        n: number of examples.
        sum_sq_norms: S1 = sum_i ||g_i||^2.
        sum_grad_sq_norm: S2 = ||sum_i g_i||^2 (of the *summed* gradient; ``mean_grad_sq_norm`` is S2 / n^2).
        delta: Delta = S1 / ||sum_i g_i||^2, in [1/n, inf).
        m2: M2 = S1 / n.
        mean_grad_sq_norm: ||G||^2 = ||sum_i g_i||^2 / n^2.
        trace_cov: tr Sigma = M2 - ||G||^2 (per-example covariance over the n examples, 1/n normalised).
        batch_bound: B_S = n Delta = M2 / ||G||^2, the batch size up to which minibatch SGD keeps its
            sample efficiency.
        b_simple: the gradient noise scale tr Sigma / ||G||^2 (McCandlish et al. 2018); n Delta = b_simple + 1.
    """

    n: int
    sum_sq_norms: float
    sum_grad_sq_norm: float
    delta: float
    m2: float
    mean_grad_sq_norm: float
    trace_cov: float
    batch_bound: float
    b_simple: float


def diversity_from_sums(sum_sq_norms: float, sum_grad: torch.Tensor | float, n: int) -> DiversityStats:
    """:class:`DiversityStats` from S1 = sum_i ||g_i||^2, the summed gradient (vector, or its squared norm) and n."""
    if n < 1:
        raise ConfigError(f"diversity needs at least one example, got n={n}")
    grad_sq = float(sum_grad) if not isinstance(sum_grad, torch.Tensor) else float(
        sum_grad.double().square().sum())
    s1 = float(sum_sq_norms)
    delta = s1 / grad_sq if grad_sq > 0 else math.inf
    m2 = s1 / n
    g2 = grad_sq / (n * n)
    trace = m2 - g2
    return DiversityStats(n=int(n), sum_sq_norms=s1, sum_grad_sq_norm=grad_sq, delta=delta, m2=m2,
                          mean_grad_sq_norm=g2, trace_cov=trace, batch_bound=n * delta,
                          b_simple=trace / g2 if g2 > 0 else math.inf)


def _batches(inputs_or_loader: torch.Tensor | Iterable, targets: torch.Tensor | None,
             batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(inputs_or_loader, torch.Tensor):
        if targets is None:
            raise ConfigError("gradient_diversity: with an input tensor, pass the targets too")
        if targets.shape[0] != inputs_or_loader.shape[0]:
            raise ConfigError(f"gradient_diversity: {inputs_or_loader.shape[0]} inputs but {targets.shape[0]} "
                              "targets")
        for start in range(0, inputs_or_loader.shape[0], batch_size):
            yield inputs_or_loader[start:start + batch_size], targets[start:start + batch_size]
    else:
        if targets is not None:
            raise ConfigError("gradient_diversity: pass targets only with an input tensor; a loader yields "
                              "(x, y) batches itself")
        for batch in inputs_or_loader:
            x, y = batch[0], batch[1]
            yield x, y


def gradient_diversity(model: nn.Module, loss_fn: LossFn, inputs_or_loader: torch.Tensor | Iterable,
                       targets: torch.Tensor | None = None, *, world: Any = None,
                       batch_size: int = 512) -> DiversityStats:
    """Exact gradient diversity Delta = sum_i ||g_i||^2 / ||sum_i g_i||^2 of a data set at the current weights.

    Streams batches: the numerator accumulates per-example squared norms (ghost norms), the denominator the
    summed gradient vector (float64), both from one backward pass per batch. With ``world`` (a
    :class:`scalesgd.distributed.World` of size > 1) every rank passes its own part of the data set and the
    numerator, n and the summed gradient are all-reduced in one call, so the result is that of the union.

    Args:
        model: the model, in the mode to measure (its dropout, if in train mode, is part of the gradients).
        loss_fn: ``torch.nn`` loss module or per-example loss function (reduction is irrelevant).
        inputs_or_loader: an (N, ...) input tensor, or an iterable of (x, y) batches.
        targets: the (N, ...) targets when ``inputs_or_loader`` is a tensor.
        world: optional World; ranks must call this collectively.
        batch_size: chunk size for tensor inputs.
    Returns:
        :class:`DiversityStats` (Yin et al. 2018, eq. 3; n Delta = B_simple + 1).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    params = _trainable(model)
    numel = sum(p.numel() for p in params)
    device = params[0].device
    acc = torch.zeros(numel + 2, dtype=torch.float64, device=device)  # [sum_i g_i (flat), S1, n]
    with GhostNormTap(model) as tap:
        for x, y in _batches(inputs_or_loader, targets, batch_size):
            sq, grads = _norms_and_grad(tap, model, loss_fn, x, y, params, want_grad=True)
            offset = 0
            for gr in grads:
                acc[offset:offset + gr.numel()] += gr.detach().reshape(-1).double()
                offset += gr.numel()
            acc[numel] += sq.double().sum()
            acc[numel + 1] += sq.shape[0]
    if world is not None and world.size > 1:
        import torch.distributed as dist

        dist.all_reduce(acc)
    n = int(round(float(acc[numel + 1])))
    return diversity_from_sums(float(acc[numel]), acc[:numel], n)


# --------------------------------------------------------------------------------------------------------
# Online estimators during training


def local_grad_sq_norm(grads: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    """``||G||^2`` of a gradient held as one flat buffer (one dot product) or as a list of tensors; 0-d tensor."""
    if isinstance(grads, torch.Tensor):
        flat = grads.reshape(-1)
        return torch.dot(flat, flat)
    return sum(torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads)


@dataclass(frozen=True)
class NoiseStats:
    """One step's unbiased estimates of the gradient noise.

    Attributes:
        mean_grad_sq_norm: ||G||^2, the squared norm of the gradient of the *mean* loss (not of the sum).
        trace_cov: tr Sigma, the trace of the per-example gradient covariance.
    """

    mean_grad_sq_norm: float
    trace_cov: float


def per_example_noise_stats(sum_sq_norms: float, sum_grad_sq_norm: float, batch_size: int) -> NoiseStats:
    """Unbiased ||G||^2 and tr Sigma from one batch's per-example norms (lowest-variance path).

    With g_i the per-example loss gradients of the batch (sum-reduced convention; their mean is the mean-loss
    gradient), S1 = sum_i ||g_i||^2 and S2 = ||sum_i g_i||^2 (= b^2 ||G_b||^2 if you hold the mean gradient):
    ``||G||^2_hat = (S2 - S1) / (b (b - 1))``, ``tr Sigma_hat = S1 / b - ||G||^2_hat``
    (REFERENCES section 3; E S1 = b (tr Sigma + ||G||^2), E S2 = b tr Sigma + b^2 ||G||^2).

    Raises:
        ConfigError: if ``batch_size`` < 2.
    """
    b = int(batch_size)
    if b < 2:
        raise ConfigError(f"the per-example estimate needs a batch of at least 2 examples, got {b}")
    s1, s2 = float(sum_sq_norms), float(sum_grad_sq_norm)
    g2 = (s2 - s1) / (b * (b - 1))
    return NoiseStats(mean_grad_sq_norm=g2, trace_cov=s1 / b - g2)


def two_batch_noise_stats(small_mean_grad_sq_norm: float, small_batch_size: int, big_mean_grad_sq_norm: float,
                          big_batch_size: int) -> NoiseStats:
    """Unbiased ||G||^2 and tr Sigma from the squared norms of two mean-loss gradients (no per-example norms).

    ``small``: ||G_s||^2 of a gradient of the mean loss over B_s examples; ``big``: ||G_b||^2 of the mean
    gradient over B_b examples that include them. Since E||G_B||^2 = ||G||^2 + tr Sigma / B:
    ``||G||^2_hat = (B_b ||G_b||^2 - B_s ||G_s||^2) / (B_b - B_s)``,
    ``tr Sigma_hat = (||G_s||^2 - ||G_b||^2) / (1/B_s - 1/B_b)`` (McCandlish et al. 2018, appendix A.1).
    :func:`rank_averaged_two_batch_noise_stats` averages this over the P workers of a step.

    Raises:
        ConfigError: unless 0 < B_s < B_b.
    """
    bs, bb = int(small_batch_size), int(big_batch_size)
    if not 0 < bs < bb:
        raise ConfigError(f"the two-batch estimate needs 0 < small batch < big batch, got {bs} and {bb}: it needs "
                          "at least 2 workers; on one worker use the per-example path (--diversity exact)")
    gs, gb = float(small_mean_grad_sq_norm), float(big_mean_grad_sq_norm)
    return NoiseStats(mean_grad_sq_norm=(bb * gb - bs * gs) / (bb - bs), trace_cov=(gs - gb) / (1.0 / bs - 1.0 / bb))


def two_batch_rank_terms(local_mean_grad_sq_norm: float, local_batch_size: int,
                         global_batch_size: int) -> tuple[float, float]:
    """One rank's two scalars (u_p, v_p) for :func:`rank_averaged_two_batch_noise_stats`; summed over ranks.

    With ||G_s,p||^2 the squared norm of rank p's mean gradient over its B_s,p examples and B the global batch:
    ``u_p = B_s,p ||G_s,p||^2 / (B - B_s,p)``, ``v_p = ||G_s,p||^2 / (1/B_s,p - 1/B)``; (0, 0) for a rank with no
    examples or with the whole batch (it has no smaller batch to compare).
    """
    bs, bb = int(local_batch_size), int(global_batch_size)
    if not 0 < bs < bb:
        return 0.0, 0.0
    g2 = float(local_mean_grad_sq_norm)
    return bs * g2 / (bb - bs), g2 / (1.0 / bs - 1.0 / bb)


def rank_averaged_two_batch_noise_stats(sum_u: float, sum_v: float, global_mean_grad_sq_norm: float,
                                        shard_sizes: Sequence[int], global_batch_size: int) -> NoiseStats | None:
    """The mean over ranks of :func:`two_batch_noise_stats` (rank p's B_s,p examples against the global batch),
    from the all-reduced sums of :func:`two_batch_rank_terms` and the reduced gradient alone.

    Each per-rank estimate is linear in ||G_s,p||^2 and ||G_B||^2, so their average over the P' ranks with
    0 < B_s,p < B needs only Sigma_p u_p and Sigma_p v_p (two scalars riding on the gradient's all-reduce):
    ``||G||^2_hat = (||G_B||^2 Sigma_p B/(B - B_s,p) - Sigma_p u_p) / P'``,
    ``tr Sigma_hat = (Sigma_p v_p - ||G_B||^2 Sigma_p 1/(1/B_s,p - 1/B)) / P'``. Averaging the P estimates
    cuts the variance of one (McCandlish et al. 2018, appendix A.1).

    Args:
        sum_u, sum_v: Sigma_p u_p and Sigma_p v_p over all ranks.
        global_mean_grad_sq_norm: ||G_B||^2 of the all-reduced mean gradient over the global batch.
        shard_sizes: B_s,p of every rank (P,).
        global_batch_size: B = Sigma_p B_s,p.
    Returns:
        :class:`NoiseStats`, or None when no rank holds a proper part of the batch (P = 1, or B < 2).
    """
    bb = int(global_batch_size)
    ranks = [int(bs) for bs in shard_sizes if 0 < bs < bb]
    if not ranks:
        return None
    p = len(ranks)
    gb = float(global_mean_grad_sq_norm)
    coef_g = sum(bb / (bb - bs) for bs in ranks)
    coef_t = sum(1.0 / (1.0 / bs - 1.0 / bb) for bs in ranks)
    return NoiseStats(mean_grad_sq_norm=(gb * coef_g - float(sum_u)) / p, trace_cov=(float(sum_v) - gb * coef_t) / p)


@dataclass(frozen=True)
class EMAState:
    """Bias-uncorrected EMAs of ||G||^2 (of the mean gradient) and tr Sigma; ``weight`` = 1 - decay^steps
    corrects them."""

    mean_grad_sq_norm_avg: float = 0.0
    trace_cov_avg: float = 0.0
    weight: float = 0.0
    steps: int = 0


@dataclass(frozen=True)
class DiversityEstimate:
    """Smoothed estimates. ``grad_sq_norm_est`` is ||G||^2 of the *mean*-loss gradient (not of the sum),
    ``trace_cov_est`` tr Sigma, ``b_simple_est`` their ratio, ``batch_bound_est`` = b_simple + 1 = n Delta,
    ``diversity_est`` = batch_bound / n. NaN before the first update; inf when ||G||^2_est <= 0 (noise wins)."""

    grad_sq_norm_est: float
    trace_cov_est: float
    b_simple_est: float
    batch_bound_est: float
    diversity_est: float
    steps: int


@dataclass(frozen=True)
class NoiseEstimate:
    """What the trainer's estimate stage reports after a step: the smoothed estimates and the step's own.

    Attributes:
        smoothed: :class:`DiversityEstimate` after folding in this step.
        step: this step's unbiased :class:`NoiseStats`, or None when the step gave none (batch < 2, one
            worker on the two-batch path, or a non-finite value that was not folded in).
    """

    smoothed: DiversityEstimate
    step: NoiseStats | None

    def metrics(self) -> dict[str, float]:
        """The ``metrics.jsonl`` keys: ``grad_sq_norm_est``, ``trace_cov_est``, ``batch_bound_est``,
        ``diversity_est`` and, when the step gave an estimate, ``grad_sq_norm_step``, ``trace_cov_step``
        (every ``grad_sq_norm_*`` is ||G||^2 of the mean gradient)."""
        out = {"grad_sq_norm_est": self.smoothed.grad_sq_norm_est, "trace_cov_est": self.smoothed.trace_cov_est,
               "batch_bound_est": self.smoothed.batch_bound_est, "diversity_est": self.smoothed.diversity_est}
        if self.step is not None:
            out["grad_sq_norm_step"] = self.step.mean_grad_sq_norm
            out["trace_cov_step"] = self.step.trace_cov
        return out


def batch_bound_over_run(grad_sq_norms: Sequence[float], trace_covs: Sequence[float]) -> float | None:
    """B_S for a whole run from its per-step estimates of ||G||^2 (mean gradient) and tr Sigma:
    ``1 + sum tr / sum ||G||^2``.

    Numerator and denominator are averaged over every step and the ratio taken last (REFERENCES section 3):
    :class:`NoiseScaleEMA` with the whole run as its horizon. Steps where either estimate is not finite are
    skipped. Returns None when no step is usable or the summed ||G||^2 is not positive (noise wins).
    """
    pairs = [(float(g), float(t)) for g, t in zip(grad_sq_norms, trace_covs, strict=True)
             if math.isfinite(g) and math.isfinite(t)]
    g2_sum = sum(g for g, _ in pairs)
    if not pairs or g2_sum <= 0:
        return None
    return 1.0 + sum(t for _, t in pairs) / g2_sum


@dataclass(frozen=True)
class NoiseScaleEMA:
    """Smooth ||G||^2 and tr Sigma separately (bias-corrected EMA), then take the ratio.

    Each per-step estimate is unbiased but very noisy (its ||G||^2 is often negative when B_simple >> b), and
    the ratio of two noisy numbers is biased; averaging numerator and denominator first and dividing last
    removes most of that (REFERENCES section 3: ratio of means 409.8 vs true 415.3; plug-in per batch 60.7).

    ``decay=0.99`` (default): a time constant of 1/(1-decay) = 100 steps, i.e. an effective sample of
    (1+decay)/(1-decay) ~ 200 steps, which cuts the per-step noise by ~14x -- enough for +-10% at
    B_simple/b ~ 6 -- while still following the drift of the statistics over a training run of thousands of
    steps (they change on the scale of epochs, not steps). Use 0.995-0.999 for small batches or slow drift.
    """

    decay: float = 0.99

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {self.decay}; 0.99 averages over ~100 steps")

    def init(self) -> EMAState:
        return EMAState()

    def update(self, state: EMAState | None, g2_hat: float, tr_hat: float) -> EMAState:
        """Fold one step's estimates of ||G||^2 and tr Sigma into the state; returns the new state."""
        state = EMAState() if state is None else state
        a = self.decay
        return EMAState(mean_grad_sq_norm_avg=a * state.mean_grad_sq_norm_avg + (1 - a) * float(g2_hat),
                        trace_cov_avg=a * state.trace_cov_avg + (1 - a) * float(tr_hat),
                        weight=a * state.weight + (1 - a), steps=state.steps + 1)

    def estimate(self, state: EMAState, n: int) -> DiversityEstimate:
        """Bias-corrected ||G||^2, tr Sigma, B_simple, n Delta and Delta for a data set of n examples."""
        if n < 1:
            raise ConfigError(f"n (the data set size) must be positive, got {n}")
        if state.steps == 0:
            nan = math.nan
            return DiversityEstimate(nan, nan, nan, nan, nan, 0)
        g2 = state.mean_grad_sq_norm_avg / state.weight
        tr = state.trace_cov_avg / state.weight
        b_simple = tr / g2 if g2 > 0 else math.inf
        bound = b_simple + 1.0
        return DiversityEstimate(grad_sq_norm_est=g2, trace_cov_est=tr, b_simple_est=b_simple,
                                 batch_bound_est=bound, diversity_est=bound / n, steps=state.steps)

    def fold(self, state: EMAState, step: NoiseStats | None, n: int) -> tuple[EMAState, NoiseEstimate]:
        """Fold a step's :class:`NoiseStats` into the state when both values are finite (a diverging step's
        inf/NaN would poison the average for good); returns the new state and the :class:`NoiseEstimate`."""
        usable = step if step is not None and all(
            math.isfinite(v) for v in (step.mean_grad_sq_norm, step.trace_cov)) else None
        if usable is not None:
            state = self.update(state, usable.mean_grad_sq_norm, usable.trace_cov)
        return state, NoiseEstimate(smoothed=self.estimate(state, n), step=usable)


# --------------------------------------------------------------------------------------------------------
# Exact whole-data diversity of a training run


def measure_exact_diversity(model: nn.Module, loss_fn: LossFn, x_train: torch.Tensor | None,
                            y_train: torch.Tensor | None, *, world: Any = None, batch_size: int = 1024,
                            dataset: Any = None) -> dict[str, float]:
    """Exact Delta_S, M2, ||G||^2 (mean gradient), tr Sigma, B_S and B_simple over a whole training set at the
    current weights, as the flat record a ``diversity`` line of ``metrics.jsonl`` holds.

    Every rank of ``world`` streams its contiguous part of (x_train, y_train) (N, ...) and the sums are
    all-reduced (Yin et al. 2018, eq. 3); ranks must call this collectively.

    Args:
        model: the model at the weights to measure.
        loss_fn: per-example loss (``reduction="none"``).
        x_train, y_train: the whole training set (every rank passes all of it).
        dataset: instead of the tensors, a :class:`scalesgd.data.Dataset` read by index (its
            ``train_batch``), for sets not held in memory; a dataset in memory uses its tensors.
        world: optional :class:`scalesgd.distributed.World`.
        batch_size: chunk size per backward pass.
    Returns:
        ``{"delta", "m2", "mean_grad_sq_norm", "trace_cov", "batch_bound", "b_simple", "n"}``.
    """
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    if dataset is not None and dataset.in_memory:
        x_train, y_train, dataset = dataset.x_train, dataset.y_train, None
    device = world.device if world is not None else next(model.parameters()).device
    n = dataset.n_train if dataset is not None else x_train.shape[0]
    part = torch.tensor_split(torch.arange(n), size)[rank]
    if dataset is None:
        x, y = x_train[part].to(device), y_train[part].to(device)
        stats = gradient_diversity(model, loss_fn, x, y, world=world, batch_size=batch_size)
    else:
        from scalesgd.data.user import to_device

        def batches():  # this rank's part, read a chunk at a time
            for chunk in torch.split(part, batch_size):
                xb, yb = dataset.train_batch(chunk)
                yield to_device(xb, device), yb.to(device)

        stats = gradient_diversity(model, loss_fn, batches(), world=world)
    return {"delta": stats.delta, "m2": stats.m2, "mean_grad_sq_norm": stats.mean_grad_sq_norm,
            "trace_cov": stats.trace_cov, "batch_bound": stats.batch_bound, "b_simple": stats.b_simple,
            "n": stats.n}


def diversity_at_checkpoint(path: Any) -> dict[str, float]:
    """Exact whole-data diversity at a run's saved checkpoint (``RUN_DIR`` or ``RUN_DIR/checkpoint.pt``).

    Rebuilds the run's data set and model from the config saved in the checkpoint, loads the weights and
    measures in train mode (dropout, if any, is part of the gradients, as during training). Writes
    ``diversity_checkpoint.json`` next to the checkpoint and returns ``{"step", **measure_exact_diversity}``.

    Raises:
        ScalesgdError: if there is no checkpoint at ``path``.
    """
    from pathlib import Path

    from scalesgd.config import RunConfig
    from scalesgd.data import load_data
    from scalesgd.errors import ScalesgdError
    from scalesgd.user_code import build_run_model, loss_for
    from scalesgd.writer import write_json_atomic

    path = Path(path)
    ckpt_path = path / "checkpoint.pt" if path.is_dir() else path
    if not ckpt_path.exists():
        raise ScalesgdError(f"no checkpoint at {ckpt_path}; pass a run directory written by `scalesgd train`")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    known = {k: v for k, v in ckpt["config"].items() if k in RunConfig.__dataclass_fields__}
    known["lr_milestones"] = tuple(known.get("lr_milestones", ()))
    cfg = RunConfig(**known)
    ds = load_data(cfg)
    model = build_run_model(cfg, input_shape=ds.input_shape, num_outputs=ds.num_outputs)  # the run's own
    model.load_state_dict(ckpt["model"])
    model.train()
    stats = {"step": ckpt["step"], **measure_exact_diversity(model, loss_for(cfg.loss, ds.task, "none"), ds.x_train,
                                                             ds.y_train, dataset=ds)}
    write_json_atomic(ckpt_path.parent / "diversity_checkpoint.json", stats)
    return stats
