"""Per-example squared gradient norms ("ghost norms") and their slow references.

Convention (DESIGN rule 13): a *per-example gradient* is the gradient of that example's own loss,
``g_i = grad_w loss(w; z_i)``, whatever reduction the training loss uses ("sum-reduced per-example gradients").

* :class:`GhostNormTap` computes ``||g_i||^2`` for every example of a batch inside the ordinary backward pass,
  from each layer's input (saved by a forward hook) and output gradient (seen by a tensor hook), without
  materialising per-example gradients where a cheaper identity exists ("ghost norms"):
  Linear ``||a_i||^2 ||b_i||^2`` (Goodfellow, arXiv 1510.01799); layers with a sequence/spatial axis of length
  T (Linear on (B, T, d), Conv after unfolding) ``<A_i A_i^T, B_i B_i^T>`` when ``2 T^2 < d p``, otherwise the
  layer's per-example gradient is materialised (Li et al., arXiv 2110.05679; Bu et al., arXiv 2205.10683):
  by one batched matmul on the unfolded input for small layers, and for large convolutions through the
  convolution's own weight-gradient kernel (``torch.nn.grad.conv2d_weight``, a memory-bounded chunk of
  examples per call as separate groups), which on CPU is faster than the matmul and needs no unfolded copy
  of the input. MultiheadAttention (hence PyTorch's transformer layers) is handled by running torch's own
  attention arithmetic with its q/k/v and output projections exposed to the same Linear rule.
  Whole-model norm = sum over layers. It never reads or writes ``.grad``.
* :func:`per_example_sq_norms` wraps the tap for a model, a loss and a batch.
  :func:`loop_sq_norms` and :func:`vmap_sq_norms` are the slow, obviously correct references.
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

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
                       (nn.modules.batchnorm._BatchNorm, "batchnorm"), (nn.MultiheadAttention, "mha")):
        if isinstance(module, base) and not _overrides(module, base):
            return kind
    return None


def _batch_first(module: nn.Module) -> bool | None:
    """``batch_first`` of a PyTorch transformer container (layer, stack or whole model), None for other modules."""
    if isinstance(module, nn.Transformer):
        return module.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        module = module.layers[0] if len(module.layers) else None
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return getattr(getattr(module, "self_attn", None), "batch_first", None)
    return None


def _batch_dims(model: nn.Module) -> dict[int, int]:
    """id(module) -> the batch axis of its inputs: 1 inside PyTorch's transformer modules built with
    ``batch_first=False`` (their Linear and LayerNorm sublayers see (T, B, ...) tensors), 0 everywhere else."""
    dims: dict[int, int] = {}
    for module in model.modules():  # pre-order: an inner container overrides an outer one
        batch_first = _batch_first(module)
        if batch_first is not None:
            for sub in module.modules():
                dims[id(sub)] = 0 if batch_first else 1
    return dims


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An attention mask as F.multi_head_attention_forward uses it: boolean True -> -inf, float as given."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise ConfigError(f"attention masks must be bool or floating point, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


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
    the Gram form is chosen when ``2 T^2 < d p``. Returns (B,) and the form used.
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

    def __init__(self, name: str, module: nn.Module, kind: str, batch_dim: int = 0):
        self.name, self.module, self.kind, self.batch_dim = name, module, kind, batch_dim
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        self.weight_grad = isinstance(weight, torch.Tensor) and weight.requires_grad
        self.bias_grad = isinstance(bias, torch.Tensor) and bias.requires_grad
        # the trainable parameters whose per-example part this handler adds when it sees the batch
        if kind in ("mha", "fallback", "shared"):
            self.params = [p for p in module.parameters() if p.requires_grad]
        else:
            self.params = [p for p in (weight, bias) if isinstance(p, torch.Tensor) and p.requires_grad]
        self.shared_shape: tuple[int, ...] | None = None  # its input's shape when it was called without the batch
        self.modes: list[_AttentionMode] = []  # MultiheadAttention: the interception active in its forward


class _AttentionMode(TorchFunctionMode):
    """Active only while one MultiheadAttention's forward runs: routes its call of
    ``F.multi_head_attention_forward`` to the tap's own implementation (:meth:`GhostNormTap._mha_forward`),
    the same arithmetic with each projection's input and output gradient visible; every other call passes."""

    def __init__(self, tap: "GhostNormTap", handler: _Handler):
        super().__init__()
        self.tap, self.handler, self.calls = tap, handler, 0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            self.calls += 1
            return self.tap._mha_forward(self.handler, *args, **kwargs)
        return func(*args, **kwargs)


# What a forward may read of a parameter without using its values: attribute getters and methods that give
# metadata only (``self.wte.weight.dtype``, ``.shape``, ``.size(0)``); reading them outside the layer is no tie.
_METADATA = frozenset({"shape", "dtype", "device", "requires_grad", "ndim", "is_cuda", "is_leaf", "layout",
                       "is_sparse", "is_quantized", "is_meta", "names", "itemsize", "nbytes", "size", "dim", "numel",
                       "stride", "is_contiguous", "element_size", "data_ptr", "storage_offset", "is_floating_point",
                       "is_complex", "nelement", "ndimension", "get_device"})


def _metadata_only(func: Callable) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property getter: the name is its descriptor's
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name in _METADATA


class _OutsideUses(TorchFunctionMode):
    """Active only during the tap's trace forward (:meth:`GhostNormTap._probe`): records the handled parameters
    that a torch function receives while the layer that owns them is not running — a weight used outside its
    layer's call besides inside it, e.g. GPT's tied output layer ``h @ self.wte.weight.T`` next to
    ``self.wte(tokens)``. Such a parameter's per-example gradient has two parts whose squared norms do not add,
    so its layer's closed form alone would give too-small norms."""

    def __init__(self, owners: dict[int, "_Handler"], running: dict[int, int], outside: set[int]):
        super().__init__()
        self.owners, self.running, self.outside = owners, running, outside

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        for t in [] if _metadata_only(func) else tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                owner = self.owners.get(id(t))  # parameters are alive, so their ids are theirs alone
                if owner is not None and not self.running[id(owner)]:
                    self.outside.add(id(t))
        return func(*args, **kwargs)


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
    padding mode, dilation, groups), Embedding, LayerNorm, GroupNorm, BatchNorm in eval mode, and
    MultiheadAttention (packed in_proj or separate q/k/v weights, bias_k/bias_v, add_zero_attn, any mask,
    need_weights either way), hence TransformerEncoderLayer/TransformerDecoderLayer and the stacks built from
    them. MultiheadAttention passes its projection weights to ``F.multi_head_attention_forward`` directly, not
    through its Linear submodules, so no submodule hook sees them: while its forward runs the tap routes that
    call (a ``TorchFunctionMode``) to its own implementation of the same function, identical arithmetic with
    each projection's input saved and a hook on its output, and applies the Linear rule to each projection
    (in_proj's q, k and v blocks are disjoint rows, so their squared norms add). BatchNorm in
    training mode is refused (its examples are not independent). Any other module that owns trainable
    parameters is handled, with its whole subtree, by torch.func (``vmap(grad(functional_call))``) on the
    saved inputs, with one warning per tap; its output may be any nesting of tuples, lists and dicts of
    tensors and Nones. A module called more than once per forward (weight sharing) or
    a parameter shared by two modules is an error: per-layer norms do not add up for shared weights. A parameter
    used by its layer's call and also directly outside it (GPT's tied output layer ``h @ self.wte.weight.T``)
    is found by the trace forward below (every torch function's arguments are checked against the running
    layers); that layer's per-example part then comes from the whole-model torch.func fallback, which
    differentiates both uses together (exact, slower; one warning naming the parameter).

    Layers called on an input without the batch axis (a position embedding on ``arange(T)``, a Linear on a shared
    (T, d) tensor), the model's own raw parameters (an ``nn.Parameter`` position table, a class token), parameters
    used without calling their layer, and a closed-form layer's parameters other than its weight and bias get
    their exact per-example part from ``vmap(grad(functional_call))`` of the whole model with only those
    parameters free, from the model's saved inputs and its outputs' gradients (the squared norm is additive over
    disjoint parameter sets), with one warning per tap naming them; calling such a layer on its input expanded
    to the batch (``self.pos(pos.expand(B, T))``) keeps the fast path. B is the size of the batch axis of the
    model's first tensor input. Which layers see the batch is traced once per input signature by one extra
    forward (no grad, random state restored) of B' != B copies of the first example: an input is batched when
    its batch axis follows the batch size, so a shared (T, ...) input is recognised even when T == B.

    The batch axis is axis 0 of every parametrised layer's input, except inside PyTorch's transformer
    modules (Transformer, TransformerEncoder/Decoder and their layers) built with ``batch_first=False``,
    whose sublayers see (T, B, ...) tensors and are read with the batch on axis 1 (MultiheadAttention follows
    its own ``batch_first``). Dropout and other randomness are those of the forward pass that was run: the
    norms are of that pass's per-example gradients.

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
        # Per forward: the batch size B (leading axis of the model's first tensor input), the layers called on an
        # input without the batch axis, and the model's inputs and output gradients (for the shared fallback)
        self._batch: int | None = None
        self._shared: dict[str, _Handler] = {}
        self._root: dict[str, Any] | None = None
        self._covered: set[int] = set()  # ids of the handlers that added a part in the captured backward
        self._got_grad: set[int] = set()  # ids of the parameters that received a gradient in the captured backward
        self._warned: set[str] = set()
        # Which layers see the batch: per input signature, layer name -> whether its input depended on the example,
        # traced once by a vmapped forward of one example (:meth:`_probe`); None while a forward is not traced
        self._probed: dict[tuple, dict[str, bool]] = {}
        self._batched: dict[str, bool] | None = None
        self._probe_record: dict[str, bool] | None = None
        # layer name -> its parameters the trace saw used outside the layer's call too (tied weights)
        self._tied: dict[str, list[str]] = {}
        self._probe_batch = 0
        self._model = model
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        # layer name -> the rule its norms came from ("outer", "gram", "materialised", "conv-loop",
        # "embedding", "norm", "func"); filled by the hooks, for inspection and tests
        self.forms: dict[str, str] = {}
        self._handles: list[Any] = []
        self._handlers: list[_Handler] = []
        fallback_names: list[str] = []
        skip_prefixes: list[str] = []
        owner: dict[int, str] = {}
        batch_dims = _batch_dims(model)
        self._root_handler = _Handler("<shared>", model, "shared", batch_dims.get(id(model), 0))
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                # a pre-hook: refused before it runs, so neither the trace nor the forward updates its statistics
                self._handles.append(module.register_forward_pre_hook(self._batchnorm_check(name)))
            if any(name.startswith(prefix) for prefix in skip_prefixes):
                continue
            kind = _kind(module)
            # MultiheadAttention's parameters include out_proj's, which its forward uses without calling out_proj
            own = [p for p in module.parameters(recurse=kind == "mha") if p.requires_grad]
            if not own:
                continue
            if kind is None and not name and any(p.requires_grad for c in module.children() for p in c.parameters()):
                # the model's own parameters (a raw nn.Parameter position table, a class token): no handler; the
                # shared fallback covers just them, so its children keep their closed forms
                continue
            if kind is None:
                kind = "fallback"
                fallback_names.append(f"{name or '<model>'} ({type(module).__name__})")
                own = [p for p in module.parameters() if p.requires_grad]
            if kind in ("fallback", "mha"):
                skip_prefixes.append(f"{name}." if name else "")
            for p in own:
                if id(p) in owner:
                    raise ConfigError(
                        f"a parameter is shared by modules {owner[id(p)]!r} and {name!r} (tied weights); per-layer "
                        "ghost norms do not add up for a shared parameter: untie the weights, or use vmap_sq_norms")
                owner[id(p)] = name
            handler = _Handler(name or "<model>", module, kind, batch_dims.get(id(module), 0))
            self._handlers.append(handler)
            if kind == "fallback":
                if handler.batch_dim:
                    raise ConfigError(
                        f"layer {handler.name!r} ({type(module).__name__}) has no closed form and sits in a "
                        "transformer built with batch_first=False; the torch.func fallback needs the batch on "
                        "axis 0: build the transformer with batch_first=True")
                self._handles.append(module.register_forward_hook(
                    lambda m, args, kwargs, out, h=handler: self._forward_fallback(h, args, kwargs, out),
                    with_kwargs=True))
            elif kind == "mha":
                self._handles.append(module.register_forward_pre_hook(
                    lambda m, args, kwargs, h=handler: self._mha_pre(h, args, kwargs), with_kwargs=True))
                self._handles.append(module.register_forward_hook(
                    lambda m, args, out, h=handler: self._mha_post(h, out), always_call=True))
            else:
                hook = getattr(self, f"_forward_{kind}")
                self._handles.append(module.register_forward_hook(
                    lambda m, inp, out, h=handler, f=hook: self._closed_form_forward(h, f, inp[0], out)))
        self._handles.append(model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._root_post, with_kwargs=True))
        for p in self._root_handler.params:
            self._handles.append(p.register_hook(lambda g, pid=id(p): self._param_grad(pid)))
        if fallback_names:
            warnings.warn(
                "ghost norms: no closed form for " + ", ".join(fallback_names) + "; their per-example norms come "
                "from torch.func (vmap of grad) on the saved inputs, which is slower. Supported closed forms: "
                "Linear, Conv1d, Conv2d, Embedding, LayerNorm, GroupNorm, BatchNorm in eval mode, "
                "MultiheadAttention.",
                stacklevel=2)

    # ---- public API

    @contextmanager
    def capture(self) -> Iterator["GhostNormTap"]:
        """Record the per-example norms of the backward pass run inside this block (one batch)."""
        self._parts, self._fired, self._reused = [], set(), set()
        self._got_grad, self._covered = set(), set()
        self._captured = False
        self._capturing = True
        try:
            yield self
            self._capturing = False
            self._shared_fallback()
        finally:
            self._capturing = False
            self._captured = True
            self._root = None  # one captured backward per forward

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

    def _add(self, handler: _Handler, part: torch.Tensor, form: str, piece: str | None = None) -> None:
        """Add one layer's (or one piece of a layer's, e.g. an attention projection's) per-example part (B,)."""
        name = handler.name if piece is None else f"{handler.name}.{piece}"
        self.forms[name] = form
        if name in self._fired:
            self._reused.add(name)
        self._fired.add(name)
        self._covered.add(id(handler))
        self._parts.append(part)

    # ---- layers called without the batch axis, parameters no handler covers: torch.func over the whole model

    def _root_pre(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model: a new forward starts; B is the leading size of its first tensor input."""
        if self._in_fallback:
            return
        self._root, self._shared, self._batch, self._batched = None, {}, None, None
        if not (self.enabled and torch.is_grad_enabled()):
            return
        axis = self._root_handler.batch_dim  # 1 when the model is a transformer built with batch_first=False
        first = next((t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > axis), None)
        if first is None:
            return
        self._batch = batch = int(first.shape[axis])
        key = tuple((tuple(t.shape[:axis] + t.shape[axis + 1:]) if t.dim() > axis and t.shape[axis] == batch
                     else tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t).__name__
                    for t in tree_leaves((args, kwargs)))
        if key not in self._probed:
            self._probed[key] = self._probe(model, args, kwargs, axis)
        self._batched = self._probed[key]

    def _probe(self, model: nn.Module, args: tuple, kwargs: dict, axis: int) -> dict[str, bool]:
        """Which layers see the batch axis: one extra forward, without grad, of a batch of another size B' (1, or
        2 when B is 1; copies of the first example). A layer input is batched when its batch axis has size B'
        here and B in the real forward; a shared (T, ...) input keeps its size T in both, so it cannot pass
        for a batched one even when T == B, as it would under a shape rule alone. Random draws are undone."""
        batch = self._batch
        probe_batch = 1 if batch != 1 else 2
        leaves, spec = tree_flatten((args, kwargs))
        index = None
        one = []
        for v in leaves:
            if isinstance(v, torch.Tensor) and v.dim() > axis and v.shape[axis] == batch:
                index = torch.zeros(probe_batch, dtype=torch.long, device=v.device)
                v = v.index_select(axis, index)
            one.append(v)
        call_args, call_kwargs = tree_unflatten(one, spec)
        record: dict[str, bool] = {}
        devices = sorted({v.device.index or 0 for v in leaves if isinstance(v, torch.Tensor) and v.is_cuda})
        # Which handled parameters are also used outside their layer's call (tied weights): counted while the trace
        # runs, with every handled layer's forward bracketed so a use inside it is known as such
        owners = {id(p): h for h in self._handlers for p in h.params}
        running = {id(h): 0 for h in self._handlers}
        outside: set[int] = set()
        brackets = []
        for h in self._handlers:
            brackets.append(h.module.register_forward_pre_hook(
                lambda m, a, k=id(h): running.__setitem__(k, running[k] + 1), prepend=True))
            brackets.append(h.module.register_forward_hook(
                lambda m, a, o, k=id(h): running.__setitem__(k, running[k] - 1), always_call=True))
        self._probe_record, self._probe_batch, self._in_fallback = record, probe_batch, True
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), _OutsideUses(owners, running, outside):
                model(*call_args, **call_kwargs)
        finally:
            self._probe_record, self._in_fallback = None, False
            for handle in brackets:
                handle.remove()
        for h in self._handlers:
            tied = sorted(self._param_names[id(p)] for p in h.params if id(p) in outside)
            if tied:
                # the whole layer goes to the shared torch.func fallback, which differentiates every use at once
                record[h.name] = False
                self._tied[h.name] = tied
        return record

    def _probe_seen(self, h: _Handler, x: Any, axis: int | None = None) -> bool:
        """While tracing (:meth:`_probe`): record whether ``x`` has the probe's batch size on the layer's batch
        axis (every call of the layer must); True means "tracing"."""
        if self._probe_record is None:
            return False
        axis = h.batch_dim if axis is None else axis
        batched = isinstance(x, torch.Tensor) and x.dim() > axis and x.shape[axis] == self._probe_batch
        self._probe_record[h.name] = self._probe_record.get(h.name, True) and batched
        return True

    def _root_post(self, model: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        """Forward hook of the model: keep its inputs and, in a captured backward, its outputs' gradients, from
        which :meth:`_shared_fallback` recomputes the per-example gradients of the parameters no handler covered."""
        if not (self.enabled and not self._in_fallback and torch.is_grad_enabled()):
            return
        outs = tree_leaves(out)
        live_pos = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad]
        if not live_pos or not all(o is None or isinstance(o, torch.Tensor) for o in outs):
            return
        root: dict[str, Any] = {
            "args": tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
            "kwargs": {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
            "live_pos": live_pos, "shapes": [tuple(outs[i].shape) for i in live_pos], "grads": None}
        self._root = root

        def keep(grads: Sequence[torch.Tensor | None]) -> None:
            if self._capturing:
                root["grads"] = tuple(None if g is None else g.detach() for g in grads)

        torch.autograd.graph.register_multi_grad_hook([outs[i] for i in live_pos], keep)

    def _param_grad(self, pid: int) -> None:
        if self._capturing:
            self._got_grad.add(pid)

    def _unbatched(self, h: _Handler, x: Any, axis: int | None = None) -> bool:
        """True (and ``h`` recorded as shared) when ``x`` has no batch axis of size B where the layer expects it."""
        axis = h.batch_dim if axis is None else axis
        if self._batch is None or not isinstance(x, torch.Tensor):
            return False
        traced = None if self._batched is None else self._batched.get(h.name)  # None: not called in the trace
        if traced is not False and x.dim() > axis and x.shape[axis] == self._batch:
            return False
        self._shared[h.name] = h
        h.shared_shape = tuple(x.shape)
        return True

    def _shared_fallback(self) -> None:
        """After a captured backward: per-example parts of the trainable parameters that received a gradient but
        that no handler added (layers called on an input without the batch axis, e.g. a position embedding on
        ``arange(T)``; parameters used outside their layer's call; parameters of a closed-form layer other than
        its weight and bias), by ``vmap(grad(functional_call))`` of the whole model with only those parameters
        free. Exact, because the whole-model squared norm is additive over disjoint parameter sets."""
        covered = {id(p) for h in self._handlers if id(h) in self._covered and h.name not in self._shared
                   for p in h.params}
        missing = ({pid for pid in self._got_grad if pid not in covered}
                   | {id(p) for h in self._shared.values() for p in h.params})
        if not missing or (self._root is None and not self._parts):
            return  # nothing missed, or the forward ran with the tap disabled (sq_norms says so)
        names = sorted(self._param_names[pid] for pid in missing if pid in self._param_names)
        layers = [f"{n!r} ({type(h.module).__name__}, input of shape {h.shared_shape})"
                  for n, h in sorted(self._shared.items()) if n not in self._tied]
        tied = [f"{n!r} ({type(h.module).__name__}): {self._tied[n]}" for n, h in sorted(self._shared.items())
                if n in self._tied]
        shared = {id(p) for h in self._shared.values() for p in h.params}
        outside = sorted(self._param_names[pid] for pid in missing - shared if pid in self._param_names)
        what = "; ".join(
            ([f"layer(s) called on an input without the batch axis (B={self._batch}): " + ", ".join(layers)]
             if layers else [])
            + ([f"tied weights: parameter(s) used both by their layer and outside its call (e.g. an output layer "
                f"h @ wte.weight.T sharing an embedding's weight), whose per-example gradient sums both uses: "
                + ", ".join(tied)] if tied else [])
            + ([f"parameter(s) {outside} received gradients outside the layer calls the tap handles (a raw "
                "nn.Parameter of the model, a parameter used without calling its layer, or a layer parameter "
                "other than weight and bias)"] if outside else []))
        root = self._root
        if root is None or root["grads"] is None:
            raise ConfigError(
                f"ghost norms: {what}; the per-example norms of {names} need the model's own forward call "
                "(the tap's model) with the tap enabled before the captured backward")
        batch = self._batch
        if any(len(shape) == 0 or shape[0] != batch for shape in root["shapes"]):
            raise ConfigError(
                f"ghost norms: {what}; recomputing their per-example gradients needs model outputs with the batch "
                f"(B={batch}) on axis 0, got {root['shapes']}")
        key = ",".join(names)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"ghost norms: {what}; the per-example norms of parameter(s) {names} come from torch.func (vmap of "
                "grad) over the whole model, which is slower. " + " ".join(
                    (["To keep the fast path, call such a layer on its input expanded to the batch, e.g. a position "
                      "embedding: self.pos(pos.expand(B, T)) instead of self.pos(pos)."] if layers else [])
                    + (["Use each parameter only through its own layer's call."] if outside else [])
                    + (["Tied weights have no closed form: the fallback is exact, only slower; untied weights keep "
                        "the fast path."] if tied else [])), stacklevel=4)
        self._backward_fallback(self._root_handler, root["args"], root["kwargs"], root["live_pos"], root["grads"],
                                only={pid for pid in missing}, batch=batch)

    def _closed_form_forward(self, h: _Handler, forward: Callable, x: torch.Tensor, out: Any) -> None:
        """Forward hook of a closed-form layer: puts the batch axis first, then calls the layer's rule."""
        if self._probe_seen(h, x) or not self._active_forward(out):
            return
        if self._unbatched(h, x):
            return
        if h.batch_dim:
            if x.dim() <= h.batch_dim + 1:
                raise ConfigError(
                    f"layer {h.name!r}: per-example norms need a batched (T, B, ...) input in a transformer built "
                    f"with batch_first=False; got shape {tuple(x.shape)}")
            x = x.movedim(h.batch_dim, 0)
        forward(h, x, out)

    def _on_grad(self, h: _Handler, out: torch.Tensor, backward: Callable[..., None], *saved: Any,
                 batch_dim: int | None = None) -> None:
        """In a captured backward, call ``backward(*saved, g)`` under no_grad with ``out``'s gradient g, its batch
        axis (``h.batch_dim`` unless given) moved first.

        The saved tensors are dropped as soon as they are used: held until the graph is freed, they would outlive
        autograd's own copies and keep activations alive through the whole backward (more peak memory, and
        fresh allocations instead of reused ones). A second captured backward through the same forward is an
        error; a backward outside ``capture()`` uses nothing."""
        box: list[tuple | None] = [saved]
        axis = h.batch_dim if batch_dim is None else batch_dim

        def hook(g: torch.Tensor) -> None:
            if not self._capturing:
                return
            args, box[0] = box[0], None
            if args is None:
                raise ConfigError(f"layer {h.name!r}: a second captured backward through the same forward pass; "
                                  "run the forward again before each `with tap.capture():` backward")
            with torch.no_grad():
                backward(*args, g.movedim(axis, 0) if axis else g)

        out.register_hook(hook)

    def _batchnorm_check(self, name: str) -> Callable:
        def check(module: nn.Module, inp: Any) -> None:
            if self._probe_record is None and not (self.enabled and torch.is_grad_enabled() and not self._in_fallback):
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
        x = x.detach()
        if x.dim() == 2:
            # ||grad_W||^2 + ||grad_c||^2 = ||b_i||^2 (||a_i||^2 + 1): keep only the (B,) factor, not the input
            if h.weight_grad:
                coef = torch.linalg.vector_norm(x, dim=1).square_()  # (B,)
                if h.bias_grad:
                    coef.add_(1.0)
            else:
                coef = None  # bias only
            self._on_grad(h, out, self._backward_linear2d, h, coef)
        elif x.dim() > 2:
            self._on_grad(h, out, self._backward_linear_seq, h, x)
        else:
            raise ConfigError(f"layer {h.name!r}: per-example norms need a batch axis; got an input of shape "
                              f"{tuple(x.shape)}")

    def _backward_linear2d(self, h: _Handler, coef: torch.Tensor | None, g: torch.Tensor) -> None:
        part = torch.linalg.vector_norm(g, dim=1).square_()  # (B,) ||b_i||^2
        if coef is not None:
            part.mul_(coef)
        self._add(h, part, "outer")

    def _backward_linear_seq(self, h: _Handler, x: torch.Tensor, g: torch.Tensor) -> None:
        part, form = self._seq_linear_sq(x, g, h.weight_grad, h.bias_grad)
        self._add(h, part, form)

    def _seq_linear_sq(self, x: torch.Tensor, g: torch.Tensor, weight_grad: bool,
                       bias_grad: bool) -> tuple[torch.Tensor, str]:
        """Per-example ``||sum_t g_t x_t^T||^2 + ||sum_t g_t||^2`` of a linear map applied along middle axes.

        x: (B, ..., d) input, g: (B, ..., p) output gradient. Returns (B,) and the form used for the weight."""
        batch = x.shape[0]
        a = x.reshape(batch, 1, -1, x.shape[-1])  # (B, 1, T, d)
        b = g.reshape(batch, 1, -1, g.shape[-1])  # (B, 1, T, p)
        part, form = _gram_or_full(a, b, self.chunk_bytes) if weight_grad else (x.new_zeros(batch), "bias")
        if bias_grad:
            part = part + b.sum(2).square().sum((1, 2))
        return part, form

    # ---- Conv1d / Conv2d

    def _forward_conv(self, h: _Handler, x: torch.Tensor, out: torch.Tensor) -> None:
        x = x.detach()
        if x.dim() != len(h.module.kernel_size) + 2:
            raise ConfigError(f"layer {h.name!r}: per-example norms need a batched input (B, C, ...); got shape "
                              f"{tuple(x.shape)}")
        self._on_grad(h, out, self._backward_conv, h, x)

    def _backward_conv(self, h: _Handler, x: torch.Tensor, g: torch.Tensor) -> None:
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
        if h.module.scale_grad_by_freq:
            raise ConfigError(f"layer {h.name!r}: Embedding(scale_grad_by_freq=True) scales gradients by counts "
                              "over the whole batch, so examples have no gradient of their own; turn it off")
        if idx.dim() < 1:
            raise ConfigError(f"layer {h.name!r}: per-example norms need a batch axis on the indices")
        self._on_grad(h, out, self._backward_embedding, h, idx)

    def _backward_embedding(self, h: _Handler, idx: torch.Tensor, g: torch.Tensor) -> None:
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
        x = x.detach()
        self._on_grad(h, out, self._backward_norm, h, x)

    def _backward_norm(self, h: _Handler, x: torch.Tensor, g: torch.Tensor) -> None:
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

    # ---- MultiheadAttention (and through it TransformerEncoderLayer / TransformerDecoderLayer)

    def _mha_pre(self, h: _Handler, args: tuple, kwargs: dict) -> None:
        query = args[0] if args else kwargs.get("query")
        if self._probe_seen(h, query, axis=int(not h.module.batch_first) if getattr(query, "dim", int)() == 3 else 0):
            return
        if self.enabled and not self._in_fallback and torch.is_grad_enabled():
            mode = _AttentionMode(self, h)
            mode.__enter__()
            h.modes.append(mode)

    def _mha_post(self, h: _Handler, out: Any) -> None:
        if not h.modes:
            return
        mode = h.modes.pop()
        mode.__exit__(None, None, None)
        if mode.calls == 0 and out is not None and any(o.requires_grad for o in tree_leaves(out)
                                                       if isinstance(o, torch.Tensor)):
            raise ConfigError(
                f"layer {h.name!r} (MultiheadAttention) did not call F.multi_head_attention_forward, so the tap saw "
                "none of its projections (a fused fast path?); its per-example norms are unknown: run it in "
                "training mode with grad enabled, or use vmap_sq_norms")

    def _mha_forward(self, h: _Handler, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     embed_dim_to_check: int, num_heads: int, in_proj_weight: torch.Tensor | None,
                     in_proj_bias: torch.Tensor | None, bias_k: torch.Tensor | None, bias_v: torch.Tensor | None,
                     add_zero_attn: bool, dropout_p: float, out_proj_weight: torch.Tensor,
                     out_proj_bias: torch.Tensor | None, training: bool = True,
                     key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                     attn_mask: torch.Tensor | None = None, use_separate_proj_weight: bool = False,
                     q_proj_weight: torch.Tensor | None = None, k_proj_weight: torch.Tensor | None = None,
                     v_proj_weight: torch.Tensor | None = None, static_k: torch.Tensor | None = None,
                     static_v: torch.Tensor | None = None, average_attn_weights: bool = True,
                     is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``F.multi_head_attention_forward`` (same signature) for batched (T, B, E) inputs, step for step the
        same arithmetic as torch's, with a hook on every projection: the q/k/v projections (packed in_proj or
        separate weights, plus in_proj_bias), bias_k/bias_v and out_proj each add their per-example part.
        Returns (attn_output (T, B, E), attention weights or None), as torch does."""
        if self._unbatched(h, query, axis=1):
            return F.multi_head_attention_forward(query, key, value, embed_dim_to_check, num_heads, in_proj_weight,
                                                  in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p,
                                                  out_proj_weight, out_proj_bias, training, key_padding_mask,
                                                  need_weights, attn_mask, use_separate_proj_weight, q_proj_weight,
                                                  k_proj_weight, v_proj_weight, static_k, static_v,
                                                  average_attn_weights, is_causal)
        if query.dim() != 3:
            raise ConfigError(f"layer {h.name!r} (MultiheadAttention): per-example norms need a batched input; got "
                              f"a query of shape {tuple(query.shape)}")
        if static_k is not None or static_v is not None:
            raise ConfigError(f"layer {h.name!r} (MultiheadAttention): static_k/static_v are not supported")
        tgt_len, bsz, embed_dim = query.shape
        if embed_dim != embed_dim_to_check or embed_dim % num_heads:
            raise ConfigError(f"layer {h.name!r}: query embedding dimension {embed_dim}, expected "
                              f"{embed_dim_to_check} divisible by {num_heads} heads")
        head_dim = embed_dim // num_heads
        key_padding_mask = _float_mask(key_padding_mask, query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = _float_mask(attn_mask, query.dtype)
            if key_padding_mask is not None:
                is_causal = False
        q, k, v = self._mha_in_projection(h, query, key, value, in_proj_weight, in_proj_bias,
                                          use_separate_proj_weight, q_proj_weight, k_proj_weight, v_proj_weight)
        src_len = key.shape[0]
        if attn_mask is not None:
            expected = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * num_heads, tgt_len, src_len)
            if tuple(attn_mask.shape) != expected:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {tuple(attn_mask.shape)}, "
                                   f"but should be {expected}.")
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
        if bias_k is not None and bias_v is not None:
            k = torch.cat([k, self._mha_bias_kv(h, "bias_k", bias_k, bsz)])
            v = torch.cat([v, self._mha_bias_kv(h, "bias_v", bias_v, bsz)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if add_zero_attn:
            zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise RuntimeError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected "
                                   f"{(bsz, src_len)}")
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        if not training:
            dropout_p = 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            attn_output = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
            q = q.view(bsz, num_heads, tgt_len, head_dim)
            k = k.view(bsz, num_heads, src_len, head_dim)
            v = v.view(bsz, num_heads, src_len, head_dim)
            attn_output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            attn_output = attn_output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
            weights = None
        out = self._mha_linear(h, "out_proj", attn_output, out_proj_weight, out_proj_bias, tgt_len)  # (T*B, E)
        return out.view(tgt_len, bsz, out.size(1)), weights

    def _mha_in_projection(self, h: _Handler, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           in_proj_weight: torch.Tensor | None, in_proj_bias: torch.Tensor | None,
                           separate: bool, q_proj_weight: torch.Tensor | None, k_proj_weight: torch.Tensor | None,
                           v_proj_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections as torch's ``_in_projection_packed`` / ``_in_projection`` compute them: one
        matmul for self-attention, q and packed kv when key is value, three otherwise; each one hooked."""
        embed_dim = query.shape[-1]
        if separate:
            w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
            b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        elif key is value and query is key:
            proj = self._mha_linear(h, "in_proj", query, in_proj_weight, in_proj_bias, query.shape[0])  # (T, B, 3E)
            proj = proj.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        elif key is value:
            w_q, w_kv = in_proj_weight.split([embed_dim, 2 * embed_dim])
            b_q, b_kv = (None, None) if in_proj_bias is None else in_proj_bias.split([embed_dim, 2 * embed_dim])
            q = self._mha_linear(h, "q_proj", query, w_q, b_q, query.shape[0])
            kv = self._mha_linear(h, "kv_proj", key, w_kv, b_kv, key.shape[0])  # (S, B, 2E)
            kv = kv.unflatten(-1, (2, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return q, kv[0], kv[1]
        else:
            w_q, w_k, w_v = in_proj_weight.chunk(3)
            b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        return (self._mha_linear(h, "q_proj", query, w_q, b_q, query.shape[0]),
                self._mha_linear(h, "k_proj", key, w_k, b_k, key.shape[0]),
                self._mha_linear(h, "v_proj", value, w_v, b_v, value.shape[0]))

    def _mha_linear(self, h: _Handler, piece: str, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, seq_len: int) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` on a (T, B, d) or (T*B, d) input, its per-example part added in backward.

        ``weight``/``bias`` may be row blocks of in_proj: the blocks of one parameter are disjoint, so the
        parameter's per-example squared norm is the sum of its blocks'."""
        out = F.linear(x, weight, bias)
        weight_grad, bias_grad = weight.requires_grad, bias is not None and bias.requires_grad
        if out.requires_grad and (weight_grad or bias_grad):
            def backward(a: torch.Tensor, g: torch.Tensor) -> None:  # (T, B, ...) -> (B, T, ...)
                part, form = self._seq_linear_sq(a.reshape(seq_len, -1, a.shape[-1]).transpose(0, 1),
                                                 g.reshape(seq_len, -1, g.shape[-1]).transpose(0, 1),
                                                 weight_grad, bias_grad)
                self._add(h, part, form, piece)

            self._on_grad(h, out, backward, x.detach(), batch_dim=0)
        return out

    def _mha_bias_kv(self, h: _Handler, piece: str, bias: torch.Tensor, bsz: int) -> torch.Tensor:
        """bias_k or bias_v repeated over the batch as torch does, (1, B, E); example i's gradient is row i's."""
        rep = bias.repeat(1, bsz, 1)
        if rep.requires_grad and bias.requires_grad:
            self._on_grad(h, rep, lambda g: self._add(h, g[0].square().sum(1), "bias", piece), batch_dim=0)
        return rep

    # ---- anything else: torch.func on the saved inputs

    def _forward_fallback(self, h: _Handler, args: tuple, kwargs: dict, out: Any) -> None:
        if self._probe_record is not None:
            for o in tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    self._probe_seen(h, o, axis=0)
            return
        if not (self.enabled and not self._in_fallback and torch.is_grad_enabled()):
            return
        outs = tree_leaves(out)  # tuples, lists and dicts, flattened; Nones are leaves too
        if not all(o is None or isinstance(o, torch.Tensor) for o in outs):
            raise ConfigError(f"layer {h.name!r} ({type(h.module).__name__}): the torch.func fallback needs an "
                              "output made of tensors and Nones (in tuples, lists or dicts); got "
                              f"{sorted({type(o).__name__ for o in outs})}")
        live = [o for o in outs if o is not None and o.requires_grad]
        if not live:
            return
        if any(self._unbatched(h, o, axis=0) for o in live):
            return
        saved_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        saved_kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        live_pos = [i for i, o in enumerate(outs) if o is not None and o.requires_grad]
        torch.autograd.graph.register_multi_grad_hook(
            live, lambda grads: self._backward_fallback(h, saved_args, saved_kwargs, live_pos, grads))

    def _backward_fallback(self, h: _Handler, args: tuple, kwargs: dict, live_pos: list[int],
                           grads: Sequence[torch.Tensor | None], only: set[int] | None = None,
                           batch: int | None = None) -> None:
        """Per-example part of ``h.module``'s trainable parameters (those with ids in ``only`` when given, the
        others held fixed) from its saved inputs and its outputs' gradients."""
        if not self._capturing and only is None:
            return
        module = h.module
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        params = {n: p.detach() for n, p in trainable if only is None or id(p) in only}
        fixed = {n: p.detach() for n, p in trainable if only is not None and id(p) not in only}
        if batch is None:
            batch = next(g.shape[0] for g in grads if g is not None)

        def batched(v: Any) -> bool:
            return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch

        def loss_one(prm: dict, args_i: tuple, kwargs_i: dict, grads_i: tuple) -> torch.Tensor:
            call_args = tuple(a.unsqueeze(0) if dim == 0 else a for a, dim in zip(args_i, arg_dims))
            call_kwargs = {k: v.unsqueeze(0) if kwarg_dims[k] == 0 else v for k, v in kwargs_i.items()}
            outs = tree_leaves(torch.func.functional_call(module, {**fixed, **prm}, call_args, call_kwargs))
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
            if "randomness" in str(e) and h is self._root_handler and any(
                    n in self._shared for n in self._tied):
                raise ConfigError(
                    f"the model draws random numbers (dropout?) in its forward, and the per-example norms of its tied "
                    f"weights {sorted(w for n in self._tied if n in self._shared for w in self._tied[n])} need the "
                    "whole-model torch.func fallback, whose recomputation cannot reproduce them; set the model's "
                    "dropout to 0, untie the weights, or measure with --diversity cheap") from e
            if "randomness" in str(e) and h is self._root_handler:
                raise ConfigError(
                    f"the model draws random numbers (dropout?) in its forward, and the per-example norms of "
                    f"{sorted(self._param_names.get(id(p), '?') for p in h.params if id(p) in only)} need the "
                    "whole-model torch.func fallback, whose recomputation cannot reproduce them; call the layers "
                    "on inputs with the batch axis (e.g. self.pos(pos.expand(B, T))), or put the model in eval "
                    "mode") from e
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
