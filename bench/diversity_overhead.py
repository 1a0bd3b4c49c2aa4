"""What exact per-example gradient norms cost on top of a plain training step, measured side by side.

One process, one run: for each model every variant's step is timed in interleaved blocks of rounds (a round
runs one step of each variant, in an order that rotates, so drift and other load on the machine hit every
variant alike). Printed: the ratio of the medians, and the median over rounds of each step's time over the
plain step's time in the same round ("paired"); the targets are judged on the paired ratio, which drifting
load from other processes skews least. A "step" is what the trainer does: zero the flat gradient buffer
that the parameters' ``.grad`` views point into, forward, ``loss = sum_i loss_i / B``, backward. Variants:

* ``plain``: that step.
* ``exact``: the same step with :class:`scalesgd.ghost_norms.GhostNormTap` capturing the per-example squared
  norms inside the backward (``tap.sq_norms(1/B)``).
* ``cheap``: the same step plus the two-batch estimator's only extra work, ``torch.dot`` of the flat gradient.
* ``vmap``: per-example norms by ``torch.func.vmap(grad)`` (norms only, no batch gradient: flattering to it).
* ``opacus``: Opacus ghost-clipping norms (one forward/backward with its norm hooks), if Opacus imports.
* ``backpack``: BackPACK ``BatchL2Grad`` in the same backward, if BackPACK imports.

Peak memory: the largest total of live torch tensors during one step, from the allocation events that
``torch.profiler(profile_memory=True)`` records (its running "Total Allocated"), plus the bytes every
variant holds across steps (parameters, flat gradient buffer, batch). It counts tensor memory exactly and
ignores Python objects and allocator caching; RSS on CPU would mostly measure glibc's caching.

Models: the MLP and CNN of :mod:`scalesgd.models`, and three transformers (token embedding, two post-norm
encoder layers, mean pool, linear head to 10 classes, sequences of 32 tokens, B = 64). ``transformer``, the
headline row, is BERT-tiny's size (Turc et al. 2019, "Well-Read Students Learn Better": 2 layers, d_model
128, 2 heads, feed-forward 512, WordPiece vocabulary of 30,522 tokens, 512 learned positions), the smallest
of the published BERTs and a model people fine-tune as a text classifier; ~90% of its 4.4M parameters are the
token embedding, as in any small model with a real tokenizer's vocabulary. ``transformer-v4096`` (d_model 128,
4 heads, ff 512, 4,096 tokens, no positions) and ``transformer-tiny`` (d_model 64, ff 128, 1,000 tokens) are
the sizes this row had before, printed beside it so the choice of size hides nothing.

Why the vmap ratio depends on the vocabulary: vmap's per-example gradients take the same multiply-adds as the
batch gradient; what it adds is writing (and reading back) B x N per-example gradient floats, the embedding's
V x d for every example among them, and running attention, which has no batching rule, per example. Exact
norms never materialise per-example gradients (embedding: a sum over each example's distinct tokens; linear
layers on T tokens: Gram matrices, ~T^2 (d_in + d_out) per example), so they stay near the plain step
whatever V is. With a vocabulary of a few thousand tokens the encoder's arithmetic dominates, vmap is only a
few plain steps, and since exact costs at least a plain step, vmap/exact can be no more than vmap/plain: the
5x target is out of reach there; with a tokenizer's vocabulary (tens of thousands) the B x V x d traffic
dominates vmap. vmap is skipped, with the reason printed, when its per-example gradients (B x N floats)
would exceed ``--vmap-max-gib``; the norms are then checked against a per-example autograd loop instead.

Printed last: one line per model with the plain, exact and vmap step times, exact/plain (paired) and
vmap/exact (paired: per round where vmap ran, its time over the exact step's in that round), each with its
target's MET/MISSED.

Run:  python bench/diversity_overhead.py [--quick] [--threads N] [--models a,b] [--vmap-max-gib G] [--json FILE]
Timings on a shared machine are noisy; read the ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scalesgd.diversity import local_grad_sq_norm
from scalesgd.ghost_norms import GhostNormTap, loop_sq_norms, per_example_sq_norms, vmap_sq_norms
from scalesgd.models import cnn, mlp
from scalesgd.writer import write_json_atomic

# (name, target ratio, stretch ratio or None): exact/plain per model, plain-vmap speed, cheap/plain, memory
TARGETS = {
    ("mlp", "exact"): (1.2, 1.1),
    ("cnn", "exact"): (1.5, 1.3),
    ("mlp", "cheap"): (1.03, None),
    ("cnn", "cheap"): (1.03, None),
    ("mlp", "vmap_speedup"): (10.0, None),
    ("transformer", "exact"): (1.5, None),
    ("transformer", "vmap_speedup"): (5.0, None),
    ("mlp", "peak_memory"): (1.1, None),
    ("cnn", "peak_memory"): (1.1, None),
}


# The transformer rows (see the module docstring): BERT-tiny's size (the headline), and the row's earlier sizes.
TRANSFORMER_SIZES = {
    "transformer": {"vocab": 30522, "d_model": 128, "heads": 2, "ff": 512, "positions": 512,
                    "name": "BERT-tiny size"},
    "transformer-v4096": {"vocab": 4096, "d_model": 128, "heads": 4, "ff": 512, "positions": 0,
                          "name": "the previous size"},
    "transformer-tiny": {"vocab": 1000, "d_model": 64, "heads": 4, "ff": 128, "positions": 0,
                         "name": "the first size"},
}


class TinyTransformer(nn.Module):
    """Token classifier: embedding (+ learned positions), two post-norm encoder layers (batch_first), mean over
    tokens, linear head. ``positions`` = 0: no position embedding."""

    def __init__(self, vocab: int, d_model: int, heads: int, num_outputs: int, dim_feedforward: int | None = None,
                 positions: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(positions, d_model) if positions else None
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=dim_feedforward or 2 * d_model,
                                           dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) token ids -> (B, num_outputs)
        h = self.embed(tokens)
        if self.pos is not None:  # positions expanded over the batch: ghost norms see a batch axis (no fallback)
            h = h + self.pos(torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens))
        return self.head(self.encoder(h).mean(1))


def vmap_bytes(model: nn.Module, batch: int) -> int:
    """Bytes of the per-example gradients vmap materialises: B x (trainable parameters) floats."""
    return batch * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


@dataclass
class Variant:
    name: str
    label: str
    step: Callable[[], object]
    reps_scale: float = 1.0  # slow variants get fewer repetitions per block


def _flat_grads(model: nn.Module) -> torch.Tensor:
    """Lay the model out as the trainer does (scalesgd.step.FlatModel); return its flat gradient."""
    from scalesgd.step import FlatModel

    return FlatModel(model, 1, torch.device("cpu")).grad


def build_variants(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   vmap_max_bytes: float = float("inf")) -> tuple[list[Variant], list[str]]:
    batch = x.shape[0]
    scale = 1.0 / batch
    variants: list[Variant] = []
    skipped: list[str] = []

    def trainer_step(m: nn.Module, flat: torch.Tensor) -> torch.Tensor:
        flat.zero_()
        loss = F.cross_entropy(m(x), y, reduction="sum") * scale
        loss.backward()
        return loss

    m_plain = copy.deepcopy(model)
    flat_plain = _flat_grads(m_plain)
    variants.append(Variant("plain", "plain fwd+bwd", lambda: trainer_step(m_plain, flat_plain)))

    m_exact = copy.deepcopy(model)
    flat_exact = _flat_grads(m_exact)
    tap = GhostNormTap(m_exact)

    def exact() -> torch.Tensor:
        flat_exact.zero_()
        loss = F.cross_entropy(m_exact(x), y, reduction="sum") * scale
        with tap.capture():
            loss.backward()
        return tap.sq_norms(scale)

    variants.append(Variant("exact", "exact ghost norms (GhostNormTap)", exact))

    m_cheap = copy.deepcopy(model)
    flat_cheap = _flat_grads(m_cheap)

    def cheap() -> torch.Tensor:
        trainer_step(m_cheap, flat_cheap)
        return local_grad_sq_norm(flat_cheap)

    variants.append(Variant("cheap", "cheap (two-batch: dot of flat grad)", cheap))

    need = vmap_bytes(model, batch)
    if need > vmap_max_bytes:  # would take (at least) that much memory on top of the step: refuse, say why
        skipped.append(f"vmap (its per-example gradients, B x N floats, need {need / 2**30:.2f} GiB > "
                       f"--vmap-max-gib {vmap_max_bytes / 2**30:g}; raise it to run vmap)")
    else:
        m_vmap = copy.deepcopy(model)
        ce = nn.CrossEntropyLoss()
        variants.append(Variant("vmap", "torch.func vmap(grad) norms", lambda: vmap_sq_norms(m_vmap, ce, x, y),
                                reps_scale=0.2))

    try:
        from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
            GradSampleModuleFastGradientClipping)
    except ImportError as e:
        skipped.append(f"opacus ({e})")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m_opacus = GradSampleModuleFastGradientClipping(copy.deepcopy(model), loss_reduction="mean",
                                                            use_ghost_clipping=True)
        flat_opacus = _flat_grads(m_opacus)

        def opacus() -> torch.Tensor:
            flat_opacus.zero_()
            loss = F.cross_entropy(m_opacus(x), y, reduction="sum") * scale
            loss.backward()
            return m_opacus.get_norm_sample()

        variants.append(Variant("opacus", "Opacus ghost norms", opacus, reps_scale=0.5))

    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad
    except ImportError as e:
        skipped.append(f"backpack ({e})")
    else:
        m_backpack = extend(copy.deepcopy(model))
        flat_backpack = _flat_grads(m_backpack)
        loss_backpack = extend(nn.CrossEntropyLoss(reduction="sum"))

        def backpack_step() -> torch.Tensor:
            flat_backpack.zero_()
            with backpack(BatchL2Grad()):
                (loss_backpack(m_backpack(x), y) * scale).backward()
            return sum(p.batch_l2 for p in m_backpack.parameters())

        variants.append(Variant("backpack", "BackPACK BatchL2Grad", backpack_step, reps_scale=0.5))
    return variants, skipped


def check_agreement(variants: list[Variant], model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, str]:
    """Max relative difference between the tap's norms and a reference: the benchmark times the right thing.
    The reference is vmap's norms, or (vmap skipped) a per-example autograd loop over the first 8 examples."""
    by_name = {v.name: v for v in variants}
    if "vmap" in by_name:
        exact, ref, name = by_name["exact"].step().double(), by_name["vmap"].step().double(), "vmap"
    else:
        xs, ys = x[:8], y[:8]
        exact = per_example_sq_norms(model, nn.CrossEntropyLoss(), xs, ys).double()
        ref, name = loop_sq_norms(model, nn.CrossEntropyLoss(), xs, ys).double(), "autograd loop, 8 examples"
    return float(((exact - ref).abs() / ref).max()), name


def time_variants(variants: list[Variant], blocks: int,
                  reps: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Per-step wall times. Each block runs ``reps`` rounds; a round times one step of every variant, in an
    order that rotates from round to round, so load from elsewhere on the machine hits all variants alike.
    A variant with ``reps_scale`` < 1 takes part in only that fraction of the rounds. Returns the times and
    the index of the round each was taken in."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    rounds: dict[str, list[int]] = {v.name: [] for v in variants}
    for v in variants:  # warm-up, excluded
        for _ in range(2):
            v.step()
    round_index = 0
    for _ in range(blocks):
        for r in range(reps):
            shift = round_index % len(variants)
            for v in variants[shift:] + variants[:shift]:
                every = max(1, round(1 / v.reps_scale))
                if r % every:
                    continue
                t0 = time.perf_counter()
                v.step()
                times[v.name].append(time.perf_counter() - t0)
                rounds[v.name].append(round_index)
            round_index += 1
    return times, rounds


def peak_step_bytes(step: Callable[[], object]) -> int:
    """Largest total of live tensor bytes allocated during one call of ``step`` (torch.profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]"]
    return max([0] + totals)


def persistent_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes held across steps by every variant: parameters, the flat gradient buffer, the batch."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return 2 * params + buffers + x.numel() * x.element_size() + y.numel() * y.element_size()


def verdict(value: float, target: float, stretch: float | None, higher_is_better: bool = False) -> str:
    ok = value >= target if higher_is_better else value <= target
    cmp = ">=" if higher_is_better else "<="
    out = f"target {cmp} {target:g}x {'MET' if ok else 'MISSED'}"
    if stretch is not None:
        s_ok = value >= stretch if higher_is_better else value <= stretch
        out += f" (stretch {cmp} {stretch:g}x {'MET' if s_ok else 'MISSED'})"
    return out


def run_model(key: str, description: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, blocks: int,
              reps: int, measure_memory: bool, vmap_max_bytes: float = float("inf")) -> dict:
    variants, skipped = build_variants(model, x, y, vmap_max_bytes)
    agreement, reference = check_agreement(variants, model, x, y)
    times, rounds = time_variants(variants, blocks, reps)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    plain = med["plain"]
    result: dict = {"description": description, "batch_size": x.shape[0], "skipped": skipped,
                    "exact_vs_reference_max_rel_diff": agreement, "reference": reference, "variants": {},
                    "targets": {}}
    print(f"\n{description}  (exact vs {reference} norms: max rel. diff {agreement:.1e})")
    for v in variants:
        ratio = med[v.name] / plain
        # the same ratio taken round by round against the plain step of that round, then the median
        paired = statistics.median(t / times["plain"][r] for r, t in zip(rounds[v.name], times[v.name]))
        result["variants"][v.name] = {"median_ms": med[v.name] * 1e3, "n_steps": len(times[v.name]),
                                      "ratio_to_plain": ratio, "paired_ratio_to_plain": paired}
        line = (f"  {v.label:<38} {med[v.name] * 1e3:9.2f} ms  {ratio:7.2f}x plain  (paired {paired:6.2f}x, "
                f"median of {len(times[v.name])})")
        if (key, v.name) in TARGETS:  # judged on the paired ratio, the one that load drift does not skew
            target, stretch = TARGETS[(key, v.name)]
            line += "   " + verdict(paired, target, stretch)
            result["targets"][v.name] = {"value": paired, "target": target, "stretch": stretch,
                                         "met": paired <= target}
        print(line)
    speedup = paired_speedup = None
    line = "  exact vs vmap: not measured (vmap skipped)"
    if "vmap" in med:
        speedup = med["vmap"] / med["exact"]
        # per round where vmap ran, its time over the exact step's in the same round, then the median
        paired_speedup = statistics.median(t / times["exact"][r] for r, t in zip(rounds["vmap"], times["vmap"]))
        line = f"  exact is {paired_speedup:.1f}x faster than vmap (paired; {speedup:.1f}x by the medians)"
    result["vmap_over_exact"] = speedup
    result["paired_vmap_over_exact"] = paired_speedup
    if (key, "vmap_speedup") in TARGETS:
        target, _ = TARGETS[(key, "vmap_speedup")]
        if paired_speedup is not None:
            line += "   " + verdict(paired_speedup, target, None, higher_is_better=True)
        result["targets"]["vmap_speedup"] = {"value": paired_speedup, "target": target,
                                             "met": paired_speedup is not None and paired_speedup >= target}
    print(line)
    for name in ("opacus", "backpack"):
        if name in med:
            print(f"  exact vs {name}: {med[name] / med['exact']:.2f}x faster")
    for s in skipped:
        print(f"  skipped: {s}")
    if measure_memory:
        base = persistent_bytes(model, x, y)
        peaks = {v.name: peak_step_bytes(v.step) for v in variants}
        result["memory"] = {"persistent_bytes": base, "step_peak_bytes": peaks}
        print(f"  peak memory (persistent {base / 2**20:.2f} MiB + largest live tensors during a step):")
        for v in variants:
            total = base + peaks[v.name]
            ratio = total / (base + peaks["plain"])
            line = (f"    {v.name:<9} {total / 2**20:8.2f} MiB  {ratio:6.2f}x plain  "
                    f"(step-only {peaks[v.name] / 2**20:.2f} MiB, {peaks[v.name] / max(1, peaks['plain']):.2f}x)")
            if v.name == "exact" and (key, "peak_memory") in TARGETS:
                target, _ = TARGETS[(key, "peak_memory")]
                line += "   " + verdict(ratio, target, None)
                result["targets"]["peak_memory"] = {"value": ratio, "target": target, "met": ratio <= target}
            print(line)
    return result


def summary_line(key: str, result: dict) -> str:
    """One line per model: plain, exact and vmap ms, exact/plain (paired) and vmap/exact (paired), verdicts."""
    v, family = result["variants"], key.split("-")[0]

    def judged(name: str, value: float | None, higher: bool) -> str:
        if value is None:
            return f"{'n/a':>6}  {'(vmap skipped)':<16}"
        if (family, name) not in TARGETS:
            return f"{value:5.2f}x  {'(no target)':<16}"
        target = TARGETS[(family, name)][0]
        ok = value >= target if higher else value <= target
        return f"{value:5.2f}x  {'>=' if higher else '<='} {target:g}x {'MET' if ok else 'MISSED':<6}"

    vmap_ms = f"{v['vmap']['median_ms']:9.1f} ms" if "vmap" in v else f"{'skipped':>12}"
    return (f"  {key:<18} plain {v['plain']['median_ms']:8.1f} ms  exact {v['exact']['median_ms']:8.1f} ms  "
            f"vmap {vmap_ms}   exact/plain {judged('exact', v['exact']['paired_ratio_to_plain'], False)}  "
            f"vmap/exact {judged('vmap_speedup', result['paired_vmap_over_exact'], True)}").rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 2 blocks, few repetitions")
    parser.add_argument("--blocks", type=int, default=None, help="interleaved blocks (default 10, quick 2)")
    parser.add_argument("--mlp-batch", type=int, default=128)
    parser.add_argument("--cnn-batch", type=int, default=64)
    parser.add_argument("--cnn-width", type=int, default=64, help="models.cnn width (64 = its default)")
    parser.add_argument("--tf-batch", type=int, default=64)
    parser.add_argument("--tf-seq", type=int, default=32, help="transformer sequence length (tokens)")
    names = ["mlp", "cnn", *TRANSFORMER_SIZES]
    parser.add_argument("--models", default=",".join(names), help=f"comma-separated subset of {','.join(names)}")
    parser.add_argument("--vmap-max-gib", type=float, default=2.0,
                        help="skip vmap (printing why) where its per-example gradients, B x N floats, would take "
                             "more than this many GiB (default 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", default=None, help="write every number to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.vmap_max_gib <= 0:
        parser.error("--vmap-max-gib must be positive")
    if args.tf_seq < 1 or args.tf_seq > min(s["positions"] or args.tf_seq for s in TRANSFORMER_SIZES.values()):
        parser.error("--tf-seq must be between 1 and the position table's 512 tokens")
    torch.set_num_threads(args.threads)
    # Opacus and BackPACK use full backward hooks on a first layer whose input needs no gradient
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap of attention: no batch rule
    blocks = args.blocks or (2 if args.quick else 10)
    load_before = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} threads, {blocks} interleaved blocks; load average "
          f"{load_before:.1f} on {os.cpu_count()} cores; shared machine: timings are noisy, compare the ratios")
    g = torch.Generator().manual_seed(args.seed)
    results: dict = {"torch": torch.__version__, "threads": args.threads, "blocks": blocks, "models": {}}
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    for key in wanted:
        torch.manual_seed(args.seed)
        if key == "mlp":
            model = mlp(input_shape=(784,), num_outputs=10, width=256)
            x = torch.randn(args.mlp_batch, 784, generator=g)
            y = torch.randint(0, 10, (args.mlp_batch,), generator=g)
            desc = f"MLP 784-256-256-10, B={args.mlp_batch}"
            reps = 5 if args.quick else 20
        elif key == "cnn":
            model = cnn(input_shape=(3, 32, 32), num_outputs=10, width=args.cnn_width)
            x = torch.randn(args.cnn_batch, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (args.cnn_batch,), generator=g)
            desc = f"small CNN (models.cnn width {args.cnn_width}) on 3x32x32, B={args.cnn_batch}"
            reps = 1 if args.quick else 3
        elif key in TRANSFORMER_SIZES:
            # the headline row the targets are judged on, and the sizes this row had before (printed too, so
            # the choice of size hides nothing; see TRANSFORMER_SIZES)
            size = TRANSFORMER_SIZES[key]
            model = TinyTransformer(vocab=size["vocab"], d_model=size["d_model"], heads=size["heads"],
                                    num_outputs=10, dim_feedforward=size["ff"], positions=size["positions"])
            x = torch.randint(0, size["vocab"], (args.tf_batch, args.tf_seq), generator=g)
            y = torch.randint(0, 10, (args.tf_batch,), generator=g)
            n_params = sum(p.numel() for p in model.parameters())
            positions = f" + {size['positions']} learned positions" if size["positions"] else ""
            desc = (f"{key}, {size['name']} (embedding of {size['vocab']:,} tokens{positions}, 2 encoder layers "
                    f"d_model {size['d_model']}, {size['heads']} heads, ff {size['ff']}, mean pool, linear to 10; "
                    f"{n_params / 1e6:.2f}M parameters, {model.embed.weight.numel() / n_params:.0%} in the token "
                    f"embedding) on {args.tf_seq} tokens, B={args.tf_batch}")
            reps = 2 if args.quick else 6
        else:
            parser.error(f"unknown model {key!r}; choose from {', '.join(names)}")
        results["models"][key] = run_model(key.split("-")[0], desc, model, x, y, blocks, reps, not args.no_memory,
                                           args.vmap_max_gib * 2**30)
    load_after = os.getloadavg()[0]
    print(f"\nload average {load_before:.1f} at the start, {load_after:.1f} at the end, on {os.cpu_count()} cores")
    cores = os.cpu_count() or 1
    # runnable threads: others' before the run plus this run's own, and everyone's (this run's too) at its end
    if max(load_before + args.threads, load_after) > 1.5 * cores:
        # a thread pool on cores that others hold waits for its slowest thread: the multi-threaded compute
        # steps (plain, exact) can slow down more than vmap's per-example loop, so vmap/exact may read low
        print("other processes shared the cores: if the ratios look off, rerun on an idle machine or with "
              "--threads 1")
    print("\nsummary (paired ratios; targets: exact/plain <= the model's target, vmap/exact >= its target):")
    for key, result in results["models"].items():
        print(summary_line(key, result))
    if args.json:
        write_json_atomic(args.json, results)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
