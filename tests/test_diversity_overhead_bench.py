"""bench/diversity_overhead.py: its headline transformer's exact norms against a per-example autograd loop,
the vmap memory guard, and the summary line's verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from scalesgd.ghost_norms import GhostNormTap, loop_sq_norms, per_example_losses, per_example_sq_norms, vmap_sq_norms

BENCH = Path(__file__).resolve().parents[1] / "bench" / "diversity_overhead.py"
CE = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def bench(load_script):
    with load_script(BENCH, "diversity_overhead_bench") as module:
        yield module



def headline(bench, batch: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The bench's headline row at its real sizes (BERT-tiny: 30,522 tokens, d_model 128, ...), few examples."""
    size = bench.TRANSFORMER_SIZES["transformer"]
    torch.manual_seed(seed)
    model = bench.TinyTransformer(vocab=size["vocab"], d_model=size["d_model"], heads=size["heads"],
                                  num_outputs=10, dim_feedforward=size["ff"], positions=size["positions"])
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, size["vocab"], (batch, 32), generator=g)
    x[:, 5] = x[:, 3]  # a repeated token in every sequence: embedding rows that add up within an example
    x[1] = x[0]  # two examples with the same tokens (and different labels below): same rows, other gradients
    y = torch.arange(batch) % 10
    return model, x, y


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of attention: no batching rule
def test_headline_transformer_norms_agree_with_autograd_loop_and_vmap(bench):
    size = bench.TRANSFORMER_SIZES["transformer"]
    assert (size["vocab"], size["d_model"], size["heads"], size["ff"]) == (30522, 128, 2, 512)
    model, x, y = headline(bench, batch=4)
    fast = per_example_sq_norms(model, CE, x, y)
    for ref in (loop_sq_norms(model, CE, x, y), vmap_sq_norms(model, CE, x, y)):
        rel = ((fast.double() - ref.double()).abs() / ref.double()).max().item()
        assert rel <= 1e-5, f"relative error {rel:.3g}"
    assert fast.unique().numel() == 4  # examples 0 and 1 share tokens, not labels: the norms tell them apart
    with GhostNormTap(model) as tap:  # every layer on its closed form at these sizes, none on the fallback
        losses = per_example_losses(CE, model(x), y)
        with tap.capture():
            torch.autograd.grad(losses.sum(), list(model.parameters()))
        forms = dict(tap.forms)
    assert forms["embed"] == forms["pos"] == "embedding"
    assert "func" not in forms.values() and "<shared>" not in forms
    for i in range(2):
        for name in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"):
            assert forms[f"encoder.layers.{i}.{name}"] == "gram"  # 2 T^2 < d_in d_out at T = 32


def test_vmap_is_skipped_with_the_reason_when_it_would_not_fit(bench):
    model, x, y = headline(bench, batch=4)
    need = bench.vmap_bytes(model, 4)
    assert need == 4 * 4 * sum(p.numel() for p in model.parameters())
    variants, skipped = bench.build_variants(model, x, y, vmap_max_bytes=need - 1)
    assert "vmap" not in {v.name for v in variants}
    assert any(s.startswith("vmap (") and "--vmap-max-gib" in s for s in skipped)
    agreement, reference = bench.check_agreement(variants, model, x, y)
    assert reference.startswith("autograd loop") and agreement <= 1e-5
    variants, skipped = bench.build_variants(model, x, y, vmap_max_bytes=need)
    assert "vmap" in {v.name for v in variants} and not any(s.startswith("vmap") for s in skipped)


def test_summary_line_judges_both_targets(bench):
    def result(exact_paired, speedup):
        variants = {"plain": {"median_ms": 40.0}, "exact": {"median_ms": 50.0, "paired_ratio_to_plain": exact_paired}}
        if speedup is not None:
            variants["vmap"] = {"median_ms": 600.0}
        return {"variants": variants, "paired_vmap_over_exact": speedup}

    line = bench.summary_line("transformer", result(1.25, 12.0))
    assert "<= 1.5x MET" in line and ">= 5x MET" in line and "600.0 ms" in line
    line = bench.summary_line("transformer-tiny", result(1.6, 2.0))
    assert "<= 1.5x MISSED" in line and ">= 5x MISSED" in line
    line = bench.summary_line("transformer", result(1.2, None))
    assert "skipped" in line and "n/a" in line and ">= 5x" not in line
