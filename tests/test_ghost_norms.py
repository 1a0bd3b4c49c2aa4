"""Ghost norms (per-example squared gradient norms) against slow references, and the trainer-facing tap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scalesgd.ghost_norms as ghost_norms
from scalesgd.diversity import gradient_diversity
from scalesgd.errors import ConfigError
from scalesgd.ghost_norms import GhostNormTap, loop_sq_norms, per_example_losses, per_example_sq_norms, vmap_sq_norms
from scalesgd.models import cnn, cnn1d, mlp
from scalesgd.step import FlatModel, NoiseTap


CE = nn.CrossEntropyLoss()


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Max relative error over the examples (norms are positive, so this is well defined)."""
    rel = ((actual.double() - expected.double()).abs() / expected.double().abs()).max().item()
    assert rel <= rtol, f"relative error {rel:.3g} > {rtol}"


def check_against_references(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=CE,
                             vmap: bool = True) -> torch.Tensor:
    fast = per_example_sq_norms(model, loss_fn, x, y)
    assert fast.shape == (x.shape[0],)
    assert_rel(fast, loop_sq_norms(model, loss_fn, x, y))
    if vmap:
        assert_rel(fast, vmap_sq_norms(model, loss_fn, x, y))
    return fast


def forms_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=CE) -> dict[str, str]:
    with GhostNormTap(model) as tap:
        losses = per_example_losses(loss_fn, model(x), y)
        with tap.capture():
            torch.autograd.grad(losses.sum(), [p for p in model.parameters() if p.requires_grad])
        return dict(tap.forms)


# ---------------------------------------------------------------------------------------------------------
# fast path == references


@pytest.mark.parametrize("name", ["mlp", "mlp_layernorm", "cnn1d", "cnn1d_groupnorm", "cnn", "cnn_groupnorm"])
def test_project_models_agree_with_loop_and_vmap(name):
    torch.manual_seed(0)
    if name.startswith("mlp"):
        model = mlp(input_shape=(20,), num_outputs=5, width=16, norm="group" if "norm" in name else "none")
        x = torch.randn(8, 20)
    elif name.startswith("cnn1d"):
        model = cnn1d(input_shape=(40,), num_outputs=5, width=8, norm="group" if "norm" in name else "none")
        x = torch.randn(8, 40)
    else:
        model = cnn(input_shape=(3, 12, 12), num_outputs=5, width=8, norm="group" if "norm" in name else "none")
        x = torch.randn(6, 3, 12, 12)
    y = torch.randint(0, 5, (x.shape[0],))
    check_against_references(model, x, y)


# (constructor, kwargs, input shape without batch): strides, paddings (int, tuple, 'same' with even kernels,
# 'valid', reflect/replicate/circular modes), dilations and groups, chosen to reach all three forms.
CONV_CASES = [
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2), (4, 9, 9)),
    (nn.Conv2d, dict(in_channels=6, out_channels=6, kernel_size=(3, 2), dilation=(2, 1), padding="same",
                     padding_mode="reflect", groups=3), (6, 7, 6)),
    (nn.Conv2d, dict(in_channels=4, out_channels=8, kernel_size=2, padding="same", padding_mode="circular"),
     (4, 5, 5)),
    (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, stride=(2, 1), padding=(1, 0), dilation=2,
                     bias=False, padding_mode="replicate"), (3, 10, 9)),
    (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding="valid"), (3, 8, 8)),
    (nn.Conv2d, dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1), (8, 4, 4)),  # Gram
    (nn.Conv2d, dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=4), (8, 2, 2)),  # Gram
    (nn.Conv1d, dict(in_channels=3, out_channels=6, kernel_size=5, stride=2, padding=2, groups=3), (3, 20)),
    (nn.Conv1d, dict(in_channels=4, out_channels=4, kernel_size=4, padding="same", dilation=2), (4, 15)),
    (nn.Conv1d, dict(in_channels=6, out_channels=8, kernel_size=3, stride=3, padding_mode="reflect",
                     padding=1), (6, 7)),  # Gram
]


def conv_model(ctor, kwargs, shape):
    conv = ctor(**kwargs)
    with torch.no_grad():
        flat = conv(torch.zeros(1, *shape)).numel()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("loop_min_macs", [None, 0], ids=["default-rule", "force-conv-loop"])
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_variants_agree_with_references(case, loop_min_macs, monkeypatch):
    if loop_min_macs is not None:  # send every materialised layer down the per-example weight-gradient loop
        monkeypatch.setattr(ghost_norms, "_CONV_LOOP_MIN_MACS", loop_min_macs)
    torch.manual_seed(case)
    ctor, kwargs, shape = CONV_CASES[case]
    model = conv_model(ctor, kwargs, shape)
    x, y = torch.randn(5, *shape), torch.randint(0, 3, (5,))
    check_against_references(model, x, y)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", [0, 1, 5, 7])
def test_conv_one_example_per_chunk(case, monkeypatch):
    """chunk_bytes=1 forces chunks of one example on every path (unfold, Gram and the weight-gradient loop)."""
    torch.manual_seed(case)
    ctor, kwargs, shape = CONV_CASES[case]
    model = conv_model(ctor, kwargs, shape)
    x, y = torch.randn(4, *shape), torch.randint(0, 3, (4,))
    expected = loop_sq_norms(model, CE, x, y)
    for min_macs in (ghost_norms._CONV_LOOP_MIN_MACS, 0):
        monkeypatch.setattr(ghost_norms, "_CONV_LOOP_MIN_MACS", min_macs)
        with GhostNormTap(model, chunk_bytes=1) as tap:
            losses = per_example_losses(CE, model(x), y)
            with tap.capture():
                losses.sum().backward()
            assert_rel(tap.sq_norms(), expected)


def test_conv_cost_rule_picks_each_form(monkeypatch):
    torch.manual_seed(0)
    forms = {}
    for ctor, kwargs, shape in CONV_CASES:
        model = conv_model(ctor, kwargs, shape)
        forms[repr(model[0])] = forms_of(model, torch.randn(3, *shape), torch.randint(0, 3, (3,)))["0"]
    assert set(forms.values()) == {"gram", "materialised"}, forms
    # T = 2x2 outputs, d*p = 72*16 >> 2 T^2: the Gram form
    assert forms[repr(nn.Conv2d(8, 16, 3, stride=2, padding=1))] == "gram"
    monkeypatch.setattr(ghost_norms, "_CONV_LOOP_MIN_MACS", 0)
    model = conv_model(*CONV_CASES[0])
    assert forms_of(model, torch.randn(3, 4, 9, 9), torch.randint(0, 3, (3,)))["0"] == "conv-loop"
    # the small CNN at its default width takes the per-example loop for its second conv
    big = cnn(input_shape=(3, 32, 32), num_outputs=10, width=32)
    monkeypatch.undo()
    got = forms_of(big, torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    assert got["3"] == "conv-loop" and got["7"] == "outer", got


def test_linear_with_sequence_axes_both_forms():
    torch.manual_seed(0)
    mse = nn.MSELoss()
    # T = 3, d p = 35: Gram; then T = 12 with d p = 6: materialised
    for t, d, p in [(3, 5, 7), (12, 2, 3)]:
        model = nn.Sequential(nn.Linear(d, p), nn.Tanh(), nn.Linear(p, 2))
        x, y = torch.randn(4, t, d), torch.randn(4, t, 2)
        check_against_references(model, x, y, loss_fn=mse)
        forms = forms_of(model, x, y, mse)
        assert forms["0"] == ("gram" if 2 * t * t < d * p else "materialised")
    # two middle axes
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    check_against_references(model, torch.randn(3, 2, 5, 3), torch.randn(3, 2, 5, 1), loss_fn=mse)


class EmbeddingBag(nn.Module):
    def __init__(self, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, idx):
        return self.head(self.norm(self.emb(idx))).mean(1)


def test_embedding_with_repeats_and_padding():
    torch.manual_seed(0)
    idx = torch.randint(0, 11, (7, 9))
    idx[:, 3] = idx[:, 0]  # every example repeats a row: per-example rows must be summed before squaring
    idx[0, :4] = 0  # padding rows get no gradient
    y = torch.randint(0, 3, (7,))
    check_against_references(EmbeddingBag(), idx, y)
    check_against_references(EmbeddingBag(padding_idx=None), idx, y)
    assert forms_of(EmbeddingBag(), idx, y)["emb"] == "embedding"


def test_embedding_scale_grad_by_freq_is_refused():
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(ConfigError, match="scale_grad_by_freq"):
        per_example_sq_norms(model, CE, torch.randint(0, 5, (4, 2)), torch.randint(0, 2, (4,)))


def test_layernorm_and_groupnorm_variants():
    torch.manual_seed(0)
    mse = nn.MSELoss()
    # LayerNorm over the last two axes of a (B, T, C, D) input, one without bias
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm((3, 4)), nn.Tanh(), nn.LayerNorm(4, bias=False),
                          nn.Linear(4, 1))
    check_against_references(model, torch.randn(5, 2, 3, 4), torch.randn(5, 2, 3, 1), loss_fn=mse)
    # GroupNorm on a (B, C) input and on a (B, C, H, W) input with frozen weight, trainable bias
    gn = nn.GroupNorm(2, 6)
    gn.weight.requires_grad_(False)
    model = nn.Sequential(nn.Linear(5, 6), nn.GroupNorm(3, 6), nn.Unflatten(1, (6, 1, 1)),
                          nn.Upsample(scale_factor=2), gn, nn.Flatten(), nn.Linear(24, 3))
    check_against_references(model, torch.randn(6, 5), torch.randint(0, 3, (6,)))


def test_frozen_parameters_are_left_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4), nn.ReLU(),
                          nn.Linear(4, 3), nn.Linear(3, 3, bias=False))
    model[0].bias.requires_grad_(False)  # conv: weight only
    model[3].weight.requires_grad_(False)  # linear: bias only
    model[6].weight.requires_grad_(False)  # linear without trainable parameters: no hook at all
    x, y = torch.randn(5, 2, 6), torch.randint(0, 3, (5,))
    check_against_references(model, x, y)
    assert set(forms_of(model, x, y)) == {"0", "3", "5"}


def test_inplace_activation_after_a_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(inplace=True),
                          nn.Linear(8, 3))
    check_against_references(model, torch.randn(5, 6), torch.randint(0, 3, (5,)))


def test_dropout_norms_are_those_of_the_same_forward_pass():
    """Same seed => same dropout masks in the fast path and in the per-example loop over one batched forward."""
    torch.manual_seed(0)
    model = mlp(input_shape=(30,), num_outputs=4, width=32, dropout=0.5)
    x, y = torch.randn(16, 30), torch.randint(0, 4, (16,))
    torch.manual_seed(123)
    fast = per_example_sq_norms(model, CE, x, y)
    torch.manual_seed(123)
    assert_rel(fast, loop_sq_norms(model, CE, x, y))
    # the comparison is sensitive to the masks: other masks give other norms
    torch.manual_seed(124)
    other = loop_sq_norms(model, CE, x, y)
    assert ((fast - other).abs() / other).max() > 1e-2
    # and without dropout (eval) all three agree
    model.eval()
    check_against_references(model, x, y)
    # vmap's independent per-example forwards cannot reproduce a batch's masks: it refuses by default
    model.train()
    with pytest.raises(RuntimeError, match="randomness"):
        vmap_sq_norms(model, CE, x, y)


class Scale(nn.Module):
    """A layer with its own parameter and no closed form: handled by the torch.func fallback."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return x * self.scale


class Gated(nn.Module):
    """Own parameter plus a child Linear: the whole subtree goes to the fallback."""

    def __init__(self, dim):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(dim))
        self.inner = nn.Linear(dim, dim)

    def forward(self, x):
        return torch.sigmoid(self.gate) * self.inner(x)


def test_unsupported_layers_fall_back_to_torch_func_with_one_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), Scale(6), nn.ReLU(), Gated(6), nn.Linear(6, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with pytest.warns(UserWarning, match="no closed form") as record:
        tap = GhostNormTap(model)
    assert len(record) == 1 and "Scale" in str(record[0].message) and "Gated" in str(record[0].message)
    with tap:
        losses = per_example_losses(CE, model(x), y)
        with tap.capture():
            losses.sum().backward()
        for _ in range(2):  # the warning is per tap, not per step
            assert_rel(tap.sq_norms(), loop_sq_norms(model, CE, x, y))
        assert tap.forms == {"0": "outer", "1": "func", "3": "func", "4": "outer"}
    with pytest.warns(UserWarning, match="no closed form"):
        check_against_references(model, x, y)


def test_batchnorm_training_mode_is_refused_eval_mode_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2),
                          nn.BatchNorm1d(2, affine=False))
    x, y = torch.randn(5, 3, 6, 6), torch.randint(0, 2, (5,))
    with pytest.raises(ConfigError, match="not independent") as err:
        per_example_sq_norms(model, CE, x, y)
    assert "GroupNorm" in str(err.value) and "model.eval()" in str(err.value)
    model(x)  # give the running statistics some values
    model.eval()
    check_against_references(model, x, y)


def test_shared_weights_are_refused():
    shared = nn.Linear(4, 4)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ConfigError, match="tied"):
        GhostNormTap(tied)
    reused = nn.Sequential(shared, nn.Tanh(), shared)
    with pytest.raises(ConfigError, match="more than once"):
        per_example_sq_norms(reused, nn.MSELoss(), torch.randn(3, 4), torch.randn(3, 4))


def test_scalar_loss_function_is_refused_with_a_fix():
    model = nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="reduction='none'"):
        per_example_sq_norms(model, lambda o, y: F.cross_entropy(o, y), torch.randn(4, 3), torch.randint(0, 2, (4,)))


# ---------------------------------------------------------------------------------------------------------
# the trainer-facing tap


def test_tap_with_mean_loss_and_flat_grad_buffer_views():
    """The trainer backpropagates sum_i loss_i / B into .grad views of one flat buffer; the tap must not care."""
    torch.manual_seed(0)
    model = mlp(input_shape=(12,), num_outputs=3, width=10)
    x, y = torch.randn(9, 12), torch.randint(0, 3, (9,))
    expected_grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    flat = FlatModel(model, 1, torch.device("cpu")).grad  # .grad views into one buffer, as in the trainer
    params = list(model.parameters())
    tap = GhostNormTap(model)
    loss_scale = 1.0 / x.shape[0]
    loss = F.cross_entropy(model(x), y, reduction="sum") * loss_scale
    with tap.capture():
        loss.backward()
    assert_rel(tap.sq_norms(loss_scale), loop_sq_norms(model, CE, x, y))
    assert torch.allclose(flat, torch.cat([g.reshape(-1) for g in expected_grads]), atol=1e-7)
    offset = 0
    for p in params:  # still views into the same buffer
        assert p.grad.data_ptr() == flat[offset:].data_ptr()
        offset += p.numel()
    tap.close()
    assert all(not m._forward_hooks for m in model.modules())


def test_tap_disabled_or_outside_capture_does_nothing():
    torch.manual_seed(0)
    model = mlp(input_shape=(4,), num_outputs=2, width=5)
    x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    tap = GhostNormTap(model, enabled=False)
    with pytest.raises(ConfigError, match="capture"):
        tap.sq_norms()
    with tap.capture():
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(ConfigError, match="enabled"):
        tap.sq_norms()
    tap.enabled = True
    loss = F.cross_entropy(model(x), y, reduction="sum")
    loss.backward(retain_graph=True)  # outside capture: nothing recorded
    with tap.capture():
        loss.backward()
    assert_rel(tap.sq_norms(), loop_sq_norms(model, CE, x, y))
    with torch.no_grad():
        model(x)  # evaluation passes under no_grad register nothing and do not fail


def test_reduction_and_loss_rescaling_do_not_change_the_norms():
    torch.manual_seed(0)
    model = mlp(input_shape=(6,), num_outputs=3, width=8)
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    ref = per_example_sq_norms(model, nn.CrossEntropyLoss(reduction="none"), x, y)
    assert_rel(per_example_sq_norms(model, nn.CrossEntropyLoss(reduction="mean"), x, y), ref)
    assert_rel(per_example_sq_norms(model, nn.CrossEntropyLoss(reduction="sum"), x, y), ref)
    assert_rel(per_example_sq_norms(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y), ref)
    scaled = per_example_sq_norms(model, lambda o, t: 3.0 * F.cross_entropy(o, t, reduction="none"), x, y)
    assert_rel(scaled, 9.0 * ref)
    d1 = gradient_diversity(model, CE, x, y)
    d3 = gradient_diversity(model, lambda o, t: 3.0 * F.cross_entropy(o, t, reduction="none"), x, y)
    assert d3.delta == pytest.approx(d1.delta, rel=1e-5)
    assert d3.b_simple == pytest.approx(d1.b_simple, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# attention and PyTorch's transformer layers

MSE = nn.MSELoss()
LOSSES = {"ce-mean": nn.CrossEntropyLoss(reduction="mean"), "ce-sum": nn.CrossEntropyLoss(reduction="sum")}


def seq_first(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """(B, T, ...) -> the layout a module built with ``batch_first`` expects."""
    return x if batch_first else x.transpose(0, 1)


class Attention(nn.Module):
    """One MultiheadAttention (self- or cross-attention) between a linear embedding and a linear head."""

    def __init__(self, batch_first, cross=False, kv_dim=None, mask=None, need_weights=False, **mha_kwargs):
        super().__init__()
        self.batch_first, self.cross, self.mask, self.need_weights = batch_first, cross, mask, need_weights
        self.embed = nn.Linear(5, 8)
        self.memory = nn.Linear(5, kv_dim or 8) if cross else None  # keys and values for cross-attention
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kv_dim, vdim=kv_dim, **mha_kwargs)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (B, T, 5)
        q = seq_first(self.embed(x), self.batch_first)
        kv = seq_first(self.memory(x.flip(1)), self.batch_first) if self.cross else q
        t = x.shape[1]
        kwargs = {}
        if self.mask == "causal":  # a float mask
            kwargs.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(t), is_causal=True)
        if self.mask == "both":  # boolean, the padding mask's type
            kwargs.update(attn_mask=torch.ones(t, t, dtype=torch.bool).triu(1), is_causal=True)
        if self.mask in ("padding", "both"):  # the last two tokens of every other example are padding
            pad = torch.zeros(x.shape[0], t, dtype=torch.bool)
            pad[::2, -2:] = True
            kwargs.update(key_padding_mask=pad)
        if self.mask == "bool-3d":  # a per-(example, head) boolean mask
            kwargs.update(attn_mask=torch.rand(x.shape[0] * 2, t, t, generator=torch.Generator().manual_seed(0))
                          > 0.7 * torch.eye(t).logical_not())
        out, weights = self.mha(q, kv, kv, need_weights=self.need_weights, **kwargs)
        assert (weights is None) != self.need_weights
        return self.head(seq_first(out, self.batch_first).mean(1))


MHA_CASES = {
    "self": {},
    "self-need-weights": dict(need_weights=True),
    "causal": dict(mask="causal"),
    "causal-need-weights": dict(mask="causal", need_weights=True),
    "padding": dict(mask="padding"),
    "causal-and-padding": dict(mask="both"),
    "bool-3d-mask": dict(mask="bool-3d", need_weights=True),
    "cross": dict(cross=True, mask="padding"),  # key is value, query differs: q and packed kv projections
    "kdim-vdim": dict(cross=True, kv_dim=6),  # separate q/k/v weights
    "bias-kv-zero-attn": dict(add_bias_kv=True, add_zero_attn=True, mask="both"),
    "no-bias": dict(bias=False),
}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("case", MHA_CASES)
def test_multihead_attention_agrees_with_loop(case, batch_first, loss):
    torch.manual_seed(0)
    model = Attention(batch_first, **MHA_CASES[case])
    x, y = torch.randn(6, 7, 5), torch.randint(0, 3, (6,))
    fast = check_against_references(model, x, y, loss_fn=LOSSES[loss], vmap=False)
    forms = forms_of(model, x, y)
    pieces = {k for k in forms if k.startswith("mha.")}
    if case == "kdim-vdim":
        assert pieces >= {"mha.q_proj", "mha.k_proj", "mha.v_proj", "mha.out_proj"}
    elif MHA_CASES[case].get("cross"):
        assert pieces == {"mha.q_proj", "mha.kv_proj", "mha.out_proj"}
    elif case.startswith("bias-kv"):
        assert pieces == {"mha.in_proj", "mha.out_proj", "mha.bias_k", "mha.bias_v"}
    else:
        assert pieces == {"mha.in_proj", "mha.out_proj"}
    assert torch.isfinite(fast).all()


def test_multihead_attention_frozen_pieces_are_left_out():
    torch.manual_seed(0)
    model = Attention(True, mask="causal")
    model.mha.in_proj_weight.requires_grad_(False)
    model.mha.out_proj.bias.requires_grad_(False)
    x, y = torch.randn(5, 6, 5), torch.randint(0, 3, (5,))
    check_against_references(model, x, y, vmap=False)
    # only out_proj trainable in the attention: its Linear submodule is never called, the MHA handler covers it
    for p in model.mha.parameters():
        p.requires_grad_(False)
    model.mha.out_proj.weight.requires_grad_(True)
    check_against_references(model, x, y, vmap=False)
    assert set(forms_of(model, x, y)) == {"embed", "mha.out_proj", "head"}


def test_multihead_attention_dropout_norms_are_those_of_the_pass_that_ran():
    """The tap's attention reproduces torch's forward draw for draw: same seed, same outputs, same masks, so the
    per-example loop under the same seed is an exact reference even with dropout."""
    torch.manual_seed(0)
    model = Attention(False, mask="padding", dropout=0.3)
    x, y = torch.randn(6, 7, 5), torch.randint(0, 3, (6,))
    torch.manual_seed(1)
    plain = model(x)
    with GhostNormTap(model):
        torch.manual_seed(1)
        tapped = model(x)
    assert torch.equal(plain, tapped)
    torch.manual_seed(2)
    fast = per_example_sq_norms(model, CE, x, y)
    torch.manual_seed(2)
    assert_rel(fast, loop_sq_norms(model, CE, x, y))
    torch.manual_seed(3)  # other dropout masks: other norms, so the agreement above is not vacuous
    other = loop_sq_norms(model, CE, x, y)
    assert ((fast - other).abs() / other).max() > 1e-2


class Encoder(nn.Module):
    """Embedding, two encoder layers (optionally a final LayerNorm), first token or mean pool, linear head."""

    def __init__(self, batch_first, norm_first, mask=None, pool="first", dropout=0.0, final_norm=True):
        super().__init__()
        self.batch_first, self.mask, self.pool = batch_first, mask, pool
        self.embed = nn.Embedding(20, 16, padding_idx=0)
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=dropout, batch_first=batch_first,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if final_norm else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):  # (B, T) token ids, 0 = padding
        t = tokens.shape[1]
        kwargs = {}
        if self.mask == "causal":
            kwargs.update(mask=nn.Transformer.generate_square_subsequent_mask(t), is_causal=True)
        if self.mask == "both":  # boolean, the padding mask's type
            kwargs.update(mask=torch.ones(t, t, dtype=torch.bool).triu(1), is_causal=True)
        if self.mask in ("padding", "both"):
            kwargs.update(src_key_padding_mask=tokens == 0)
        h = seq_first(self.encoder(seq_first(self.embed(tokens), self.batch_first), **kwargs), self.batch_first)
        return self.head(h[:, 0] if self.pool == "first" else h.mean(1))


def tokens(batch, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 20, (batch, t), generator=g)
    x[::2, -2:] = 0  # padding at the end of every other sequence
    x[:, 1] = x[:, 2]  # a repeated token in every sequence (embedding rows that add up)
    return x


@pytest.mark.parametrize("mask", [None, "causal", "padding", "both"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_transformer_encoder_agrees_with_loop(batch_first, norm_first, mask):
    torch.manual_seed(0)
    model = Encoder(batch_first, norm_first, mask)
    x, y = tokens(6, 9), torch.randint(0, 3, (6,))
    for loss in LOSSES.values():
        check_against_references(model, x, y, loss_fn=loss, vmap=False)
    forms = forms_of(model, x, y)
    for i in range(2):
        assert {f"encoder.layers.{i}.{n}" for n in ("self_attn.in_proj", "self_attn.out_proj", "linear1",
                                                     "linear2", "norm1", "norm2")} <= set(forms)
    assert forms["embed"] == "embedding"


class Seq2Seq(nn.Module):
    """nn.Transformer (one encoder and one decoder layer, causal target mask, padded source)."""

    def __init__(self, batch_first, norm_first):
        super().__init__()
        self.batch_first = batch_first
        self.src_embed = nn.Embedding(20, 16, padding_idx=0)
        self.tgt_embed = nn.Embedding(20, 16)
        self.transformer = nn.Transformer(16, 4, 1, 1, 24, dropout=0.0, batch_first=batch_first,
                                          norm_first=norm_first)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):  # first 6 tokens the source, the rest the target
        src, tgt = tokens[:, :6], tokens[:, 6:]
        out = self.transformer(seq_first(self.src_embed(src), self.batch_first),
                               seq_first(self.tgt_embed(tgt), self.batch_first),
                               tgt_mask=nn.Transformer.generate_square_subsequent_mask(tgt.shape[1]),
                               tgt_is_causal=True, src_key_padding_mask=src == 0, memory_key_padding_mask=src == 0)
        return self.head(seq_first(out, self.batch_first).mean(1))


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # nn.Transformer's own encoder stack
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_transformer_decoder_layers_agree_with_loop(batch_first, norm_first):
    torch.manual_seed(0)
    model = Seq2Seq(batch_first, norm_first)
    x, y = tokens(5, 11), torch.randint(0, 3, (5,))
    for loss in LOSSES.values():
        check_against_references(model, x, y, loss_fn=loss, vmap=False)
    forms = forms_of(model, x, y)
    dec = "transformer.decoder.layers.0"
    assert {f"{dec}.self_attn.in_proj", f"{dec}.multihead_attn.q_proj", f"{dec}.multihead_attn.kv_proj",
            f"{dec}.norm3", "transformer.encoder.norm", "transformer.decoder.norm"} <= set(forms)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of attention
def test_small_transformer_with_dropout_and_vmap():
    """Mean-pooled encoder: dropout draws shared by seed (tap vs loop), and vmap agrees without dropout."""
    torch.manual_seed(0)
    model = Encoder(True, False, mask="padding", pool="mean", dropout=0.2)
    x, y = tokens(6, 8), torch.randint(0, 3, (6,))
    torch.manual_seed(1)
    fast = per_example_sq_norms(model, CE, x, y)
    torch.manual_seed(1)
    assert_rel(fast, loop_sq_norms(model, CE, x, y))
    model.eval()  # no dropout, so vmap's per-example forwards compute the same function; with grad enabled
    check_against_references(model, x, y)  # the layers take their unfused path in eval mode too


def test_gradient_diversity_of_a_small_transformer_matches_materialised_gradients():
    torch.manual_seed(0)
    model = Encoder(True, True, mask="padding", pool="mean").double()
    x, y = tokens(12, 8, seed=1), torch.randint(0, 3, (12,))
    stats = gradient_diversity(model, CE, x, y, batch_size=5)
    params = [p for p in model.parameters() if p.requires_grad]
    per = []
    for i in range(12):  # independent route: each example's gradient by autograd, then Delta from them
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum"), params,
                                    allow_unused=True)
        per.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    g = torch.stack(per)  # (n, D)
    assert stats.n == 12
    assert stats.sum_sq_norms == pytest.approx(float(g.square().sum()), rel=1e-9)
    assert stats.delta == pytest.approx(float(g.square().sum() / g.sum(0).square().sum()), rel=1e-9)


def test_second_captured_backward_through_one_forward_is_refused():
    torch.manual_seed(0)
    model = Attention(True)
    x, y = torch.randn(4, 5, 5), torch.randint(0, 3, (4,))
    with GhostNormTap(model) as tap:
        loss = F.cross_entropy(model(x), y, reduction="sum")
        with tap.capture():
            loss.backward(retain_graph=True)
        assert_rel(tap.sq_norms(), loop_sq_norms(model, CE, x, y))
        with pytest.raises(ConfigError, match="second captured backward"):
            with tap.capture():
                loss.backward()


class AttentionWithOwnForward(nn.MultiheadAttention):
    """A subclass that replaces forward: no closed form applies, the torch.func fallback gets (out, None)."""

    def forward(self, query, key, value, **kwargs):
        out, weights = super().forward(query, key, value, need_weights=False, **kwargs)
        return out * 2.0, weights


class DictOut(nn.Module):
    """Own parameter, output a dict holding a tensor, a None and a tuple: the fallback flattens it."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return {"y": x * self.scale, "aux": None, "pair": (x.sum(-1), None)}


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of attention
def test_fallback_accepts_outputs_with_nones():
    torch.manual_seed(0)
    attn = AttentionWithOwnForward(6, 2, batch_first=True)
    dict_out = DictOut(6)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attn, self.dict_out, self.head = nn.Linear(4, 6), attn, dict_out, nn.Linear(6, 3)

        def forward(self, x):
            h = self.embed(x)
            out = self.dict_out(self.attn(h, h, h)[0])
            return self.head(out["y"].mean(1) + out["pair"][0].mean(1, keepdim=True))

    model = Model()
    x, y = torch.randn(5, 4, 4), torch.randint(0, 3, (5,))
    with pytest.warns(UserWarning, match="AttentionWithOwnForward"):
        check_against_references(model, x, y, vmap=False)
    with pytest.warns(UserWarning):
        assert forms_of(model, x, y) == {"embed": "materialised", "attn": "func", "dict_out": "func", "head": "outer"}


def test_fallback_inside_a_seq_first_transformer_is_refused():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    layer.self_attn = AttentionWithOwnForward(8, 2)
    with pytest.raises(ConfigError, match="batch_first=True"):
        GhostNormTap(nn.Sequential(layer))


# ---------------------------------------------------------------------------------------------------------
# layers called without the batch axis, parameters no handler covers: the shared torch.func fallback


class PosTransformer(nn.Module):
    """Token embedding plus a position term, one TransformerEncoderLayer, mean pool, linear head.

    ``pos``: "shared" — ``self.pos(arange(T))`` (nanoGPT); "expanded" — the same called on ``arange(T).expand(B, T)``
    (the fast path); "param" — a raw ``nn.Parameter`` (1, T, d) table added; "linear" — a Linear applied to a shared
    (T, d) tensor; "outside" — the head's parameters used by ``F.linear`` without calling the head."""

    def __init__(self, pos: str, vocab: int = 11, d: int = 8, seq_len: int = 6):
        super().__init__()
        self.kind = pos
        self.embed = nn.Embedding(vocab, d)
        if pos == "param":
            self.pos_emb = nn.Parameter(torch.randn(1, seq_len, d) * 0.5)
        else:
            self.pos = nn.Embedding(seq_len, d)
        if pos == "linear":
            self.pos_proj = nn.Linear(d, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device)
        if self.kind == "param":
            h = self.embed(tokens) + self.pos_emb[:, :t]
        elif self.kind in ("expanded", "outside"):
            h = self.embed(tokens) + self.pos(positions.expand(b, t))
        elif self.kind == "linear":
            h = self.embed(tokens) + self.pos_proj(self.pos(positions))  # Linear on a shared (T, d) tensor
        else:
            h = self.embed(tokens) + self.pos(positions)
        h = self.layer(h).mean(1)
        if self.kind == "outside":
            return F.linear(h, self.head.weight, self.head.bias)
        return self.head(h)


SHARED_CASES = {"shared": ["pos.weight"], "param": ["pos_emb"], "linear": ["pos.weight", "pos_proj.bias", "pos_proj.weight"],
                "outside": ["head.bias", "head.weight"]}


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of attention
@pytest.mark.parametrize("pos", sorted(SHARED_CASES))
def test_shared_inputs_and_uncovered_parameters_agree_with_loop(pos):
    torch.manual_seed(0)
    model = PosTransformer(pos).double()
    x, y = torch.randint(0, 11, (5, 6)), torch.randint(0, 3, (5,))
    with pytest.warns(UserWarning, match="whole model") as record:
        fast = per_example_sq_norms(model, CE, x, y)
    message = str(next(r.message for r in record if "whole model" in str(r.message)))
    assert str(SHARED_CASES[pos]) in message
    if pos in ("shared", "linear"):
        assert "without the batch axis (B=5)" in message and "pos.expand(B, T)" in message
    assert_rel(fast, loop_sq_norms(model, CE, x, y))
    with pytest.warns(UserWarning):
        forms = forms_of(model, x, y)
    assert forms["<shared>"] == "func" and forms["layer.self_attn.in_proj"] in ("gram", "materialised")
    if pos == "outside":
        assert forms["pos"] == "embedding" and "head" not in forms  # the head was never called
    else:
        assert "pos" not in forms and "pos_proj" not in forms  # their parts come from the shared fallback only


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_shared_position_embedding_with_a_sequence_as_long_as_the_batch():
    """Seq length 6 and batch 6: the shared call's leading axis has the batch's size, yet it is not the batch."""
    torch.manual_seed(0)
    model = PosTransformer("shared").double()
    x, y = torch.randint(0, 11, (6, 6)), torch.randint(0, 3, (6,))
    with pytest.warns(UserWarning, match="'pos' \\(Embedding, input of shape \\(6,\\)\\)"):
        assert_rel(per_example_sq_norms(model, CE, x, y), loop_sq_norms(model, CE, x, y))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("pos", ["shared", "param"])
def test_trainer_tap_agrees_with_per_example_sq_norms(pos):
    """GhostNormTap as the trainer's NoiseTap uses it: forward, mean loss scaled by 1/B into .grad, sq_norms(scale)."""
    torch.manual_seed(0)
    model = PosTransformer(pos).double()
    x, y = torch.randint(0, 11, (7, 6)), torch.randint(0, 3, (7,))
    with pytest.warns(UserWarning, match="whole model"):
        expected = per_example_sq_norms(model, CE, x, y)
    with pytest.warns(UserWarning, match="whole model") as record:
        tap = GhostNormTap(model)
        for _ in range(2):  # the warning is per tap, not per step
            loss_scale = 1.0 / x.shape[0]
            model.zero_grad()
            with tap.capture():
                (F.cross_entropy(model(x), y, reduction="sum") * loss_scale).backward()
            assert_rel(tap.sq_norms(loss_scale), expected)
    assert sum("whole model" in str(r.message) for r in record) == 1
    assert_rel(expected, loop_sq_norms(model, CE, x, y))
    tap.close()
    with pytest.warns(UserWarning, match="whole model"):
        noise_tap = NoiseTap("exact", model, world_size=1)  # the trainer's own wrapper of the tap
        flat = FlatModel(model, 1, torch.device("cpu"))
        flat.buffer.zero_()
        with noise_tap.backward_context():
            (F.cross_entropy(flat.model(x), y, reduction="sum") * loss_scale).backward()
    (s1,) = noise_tap.local_stats(flat.grad, x.shape[0], x.shape[0], loss_scale)
    assert s1 == pytest.approx(float(expected.sum()), rel=1e-9)
    noise_tap.close()


def test_every_layer_batched_takes_no_fallback(recwarn):
    torch.manual_seed(0)
    model = PosTransformer("expanded").double()
    x, y = torch.randint(0, 11, (6, 6)), torch.randint(0, 3, (6,))
    assert_rel(per_example_sq_norms(model, CE, x, y), loop_sq_norms(model, CE, x, y))
    forms = forms_of(model, x, y)
    assert forms["pos"] == "embedding" and "<shared>" not in forms
    assert not [w for w in recwarn if "ghost norms" in str(w.message)]


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_shared_fallback_with_dropout_is_refused_with_the_fix():
    torch.manual_seed(0)
    model = PosTransformer("shared")
    model.layer.dropout.p = 0.5
    x, y = torch.randint(0, 11, (4, 6)), torch.randint(0, 3, (4,))
    with pytest.warns(UserWarning, match="whole model"), pytest.raises(ConfigError, match=r"pos.expand\(B, T\)"):
        per_example_sq_norms(model, CE, x, y)
