"""Tied weights used outside their layer (GPT's ``logits = h @ self.wte.weight.T``): the ghost-norm tap must
not report only the embedding's part of the per-example gradient. Checked against a per-example autograd loop,
through :func:`per_example_sq_norms`, :func:`gradient_diversity` and the trainer's exact :class:`NoiseTap`."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scalesgd.diversity import gradient_diversity
from scalesgd.errors import ConfigError
from scalesgd.ghost_norms import GhostNormTap, loop_sq_norms, per_example_losses, per_example_sq_norms
from scalesgd.step import FlatModel, NoiseTap

CE = nn.CrossEntropyLoss()
VOCAB, D, T = 13, 8, 6


class TinyGPT(nn.Module):
    """Token and position embeddings, one encoder layer, LayerNorm, and an output layer that reuses the token
    embedding's weight: ``tie`` "matmul" (``h @ wte.weight.T``, nanoGPT's style written out), "linear"
    (``F.linear(h, wte.weight)``) or "none" (an untied Linear head: the control)."""

    def __init__(self, tie: str, dropout: float = 0.0):
        super().__init__()
        self.tie = tie
        self.wte = nn.Embedding(VOCAB, D)
        self.wpe = nn.Embedding(T, D)
        self.block = nn.TransformerEncoderLayer(D, 2, 16, dropout=dropout, batch_first=True)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False) if tie == "none" else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        h = self.wte(tokens) + self.wpe(torch.arange(t).expand(b, t))
        h = self.ln(self.block(h))[:, -1]  # (B, D): the last position predicts the target
        if self.tie == "matmul":
            return h @ self.wte.weight.T
        if self.tie == "linear":
            return F.linear(h, self.wte.weight)
        return self.head(h)


def _problem(tie: str, dropout: float = 0.0):
    torch.manual_seed(0)
    model = TinyGPT(tie, dropout).double()
    return model, torch.randint(0, VOCAB, (7, T)), torch.randint(0, VOCAB, (7,))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of attention
@pytest.mark.parametrize("tie", ["matmul", "linear"])
def test_tied_output_layer_norms_equal_the_per_example_loop(tie):
    model, x, y = _problem(tie)
    with pytest.warns(UserWarning, match="tied weights") as record:
        fast = per_example_sq_norms(model, CE, x, y)
    message = next(str(r.message) for r in record if "tied weights" in str(r.message))
    assert "'wte' (Embedding): ['wte.weight']" in message
    reference = loop_sq_norms(model, CE, x, y)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=0)  # the embedding's use alone: ~6% too small


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_untied_model_keeps_the_closed_forms():
    model, x, y = _problem("none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        tap = GhostNormTap(model)
        losses = per_example_losses(CE, model(x), y)
        with tap.capture():
            losses.sum().backward()
        fast = tap.sq_norms()
    assert tap.forms["wte"] == "embedding" and "<shared>" not in tap.forms
    torch.testing.assert_close(fast, loop_sq_norms(model, CE, x, y), rtol=1e-10, atol=0)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.filterwarnings("ignore:ghost norms")
def test_gradient_diversity_of_a_tied_model_equals_the_loop():
    model, x, y = _problem("matmul")
    stats = gradient_diversity(model, CE, x, y, batch_size=4)  # two batches: the trace runs per input shape
    params = [p for p in model.parameters()]
    per_example = []
    for i in range(len(y)):
        g = torch.autograd.grad(CE(model(x[i:i + 1]), y[i:i + 1]), params)
        per_example.append(torch.cat([v.reshape(-1) for v in g]))
    g = torch.stack(per_example)  # (n, N)
    expected = float(g.square().sum() / g.sum(0).square().sum())
    assert stats.delta == pytest.approx(expected, rel=1e-9)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.filterwarnings("ignore:ghost norms")
def test_trainers_exact_tap_sums_the_loops_norms_on_a_tied_model():
    model, x, y = _problem("matmul")
    reference = loop_sq_norms(model, CE, x, y)
    flat = FlatModel(model, 1, torch.device("cpu"))
    tap = NoiseTap("exact", model, world_size=1)
    b = len(y)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    with tap.backward_context():
        (loss / b).backward()
    s1 = tap.local_stats(flat.grad, b, b, 1.0 / b)[0]
    assert s1 == pytest.approx(float(reference.sum()), rel=1e-9)
    tap.close()


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_tied_model_with_dropout_is_refused_with_the_fix():
    model, x, y = _problem("matmul", dropout=0.1)
    with pytest.raises(ConfigError, match=r"tied weights \['wte.weight'\].*dropout to 0"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_example_sq_norms(model, CE, x, y)


class ReadsItsDtype(TinyGPT):
    """Untied, but the forward reads a layer's parameter metadata outside its call (a common idiom)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self.head.weight.dtype == self.wte.weight.dtype and self.wte.weight.shape[1] == D
        assert self.wte.weight.size(0) == VOCAB and self.wte.weight.device == tokens.device
        return super().forward(tokens)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_reading_a_parameters_metadata_outside_its_layer_is_not_a_tie():
    torch.manual_seed(0)
    model = ReadsItsDtype("none").double()
    x, y = torch.randint(0, VOCAB, (7, T)), torch.randint(0, VOCAB, (7,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the closed forms stay
        fast = per_example_sq_norms(model, CE, x, y)
    torch.testing.assert_close(fast, loop_sq_norms(model, CE, x, y), rtol=1e-10, atol=0)
