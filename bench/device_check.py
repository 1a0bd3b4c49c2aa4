"""One accelerator check in one go: scalesgd's training step against DDP on the GPU, the exact-diversity
overhead on the GPU, and the gloo all-reduce at P = 2, 4, 8 on the many-core host; ONE table at the end.

Run through ``bash bench/device_check.sh`` (which bounds it to 8 minutes), or directly:

    python bench/device_check.py              # full sizes; the GPU when there is one
    python bench/device_check.py --dry-run    # the same code paths at tiny sizes on the CPU, P = 2, well under a minute
    python bench/device_check.py --json out.json

Parts (each prints its own lines as it goes; the table at the end gathers them):

1. throughput: examples/s of scalesgd's ``train_step`` against DDP + ``torch.optim.SGD`` on one device (a
   process group of one, so the reference is DDP as a one-GPU user would launch it), for ``models.cnn`` at
   width 64 on 3x32x32 inputs and a small transformer (token and position embeddings, two
   ``nn.TransformerEncoderLayer``, mean pool, linear head; 32 tokens), synthetic random data; the timing
   protocol is bench/throughput.py's :func:`compare_steps` (alternating blocks, warm-up excluded, medians).
2. exact norms: step time with per-example squared norms against the plain step (fwd + bwd into the flat
   gradient buffer): the trainer's in-step :class:`scalesgd.diversity.GhostNormTap`, and
   :func:`scalesgd.per_example_sq_norms` on its own; interleaved rounds as in bench/diversity_overhead.py
   (its :func:`time_variants`), each step synchronised with the device. The norms are checked against the
   one-example-at-a-time loop first.
3. all-reduce: ``scalesgd allreduce-bench`` with gloo (builtin all-reduce and our ring) at P = 2, 4, 8.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts, run as files
from diversity_overhead import Variant, time_variants  # noqa: E402
from throughput import compare_steps  # noqa: E402

from scalesgd import distributed  # noqa: E402
from scalesgd.ghost_norms import GhostNormTap, loop_sq_norms, per_example_sq_norms  # noqa: E402
from scalesgd.errors import ConfigError  # noqa: E402
from scalesgd.models import cnn  # noqa: E402
from scalesgd.step import FlatModel  # noqa: E402

SEQ_LEN = 32
# Sizes: full (the accelerator) and dry (CPU smoke test of the same code paths).
FULL = dict(batch=256, cnn_width=64, d_model=256, nhead=4, vocab=1000, blocks=8, steps_per_block=20, warmup=10,
            norm_blocks=4, norm_reps=10, workers=(2, 4, 8), sizes=("64KB", "1MB", "16MB"), iters=10)
DRY = dict(batch=8, cnn_width=8, d_model=16, nhead=2, vocab=50, blocks=2, steps_per_block=2, warmup=1,
           norm_blocks=1, norm_reps=2, workers=(2,), sizes=("64KB", "256KB"), iters=2)
MODELS = ("cnn", "transformer")


class TinyTransformer(nn.Module):
    """Token + position embeddings, two ``nn.TransformerEncoderLayer`` (no dropout), mean over tokens, linear head.

    Input (B, SEQ_LEN) int64 token ids; output (B, num_outputs) logits.
    """

    def __init__(self, vocab: int, d_model: int, nhead: int, num_outputs: int = 10, seq_len: int = SEQ_LEN):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout=0.0,
                                                               batch_first=True) for _ in range(2))
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # positions expanded to the batch, so the exact-norm rows time ghost norms, not the torch.func fallback
        # a shared (T,) position lookup takes (tests/test_ghost_norms.py checks both against the loop)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        h = self.embed(tokens) + self.pos(positions)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


def build_model(name: str, sizes: dict, seed: int = 0) -> nn.Module:
    """The same initial model on every call (seeded)."""
    torch.manual_seed(seed)
    if name == "cnn":
        return cnn(input_shape=(3, 32, 32), num_outputs=10, width=sizes["cnn_width"])
    return TinyTransformer(sizes["vocab"], sizes["d_model"], sizes["nhead"])


def make_batch(name: str, sizes: dict, n: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "cnn":
        x = torch.randn(n, 3, 32, 32, generator=g)
    else:
        x = torch.randint(0, sizes["vocab"], (n, SEQ_LEN), generator=g)
    return x.to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def describe(name: str, sizes: dict) -> str:
    if name == "cnn":
        return f"cnn width {sizes['cnn_width']}, 3x32x32, B={sizes['batch']}"
    return (f"transformer d={sizes['d_model']} heads={sizes['nhead']} 2 layers, {SEQ_LEN} tokens, "
            f"B={sizes['batch']}")


# ---------------------------------------------------------------------------------------------------------
# 1. throughput against DDP


def throughput_worker(rdv, name: str, sizes: dict, backend: str) -> dict:
    """One process: a process group of one (so the reference really is DDP), then bench/throughput's protocol."""
    world = distributed.init_world(rdv, backend, timeout_s=120)
    try:
        if world.device.type == "cpu":
            torch.set_num_threads(1)  # the dry run: small and predictable
        if not dist.is_initialized():
            dist.init_process_group(world.backend, init_method=f"tcp://{rdv.addr}:{rdv.port}", rank=0, world_size=1)
        x, y = make_batch(name, sizes, sizes["batch"], seed=100, device=world.device)
        out = compare_steps(world, lambda: build_model(name, sizes), x, y, sizes["batch"], [sizes["batch"]],
                            blocks=sizes["blocks"], steps_per_block=sizes["steps_per_block"],
                            warmup_steps=sizes["warmup"], wrap_ddp=True)
        if world.device.type == "cuda":
            out["device"] += f" ({torch.cuda.get_device_name(world.device)})"
        return out
    finally:
        distributed.shutdown_world()


def run_throughput(sizes: dict, backend: str) -> list[dict]:
    rows = []
    for name in MODELS:
        out = distributed.spawn(throughput_worker, 1, (name, sizes, backend), timeout_s=240)[0]
        ours, ddp = statistics.median(out["ours"]), statistics.median(out["ddp"])
        row = {"check": f"throughput {name}", "setting": f"{describe(name, sizes)}, P=1, {out['device']}",
               "value": f"{ours:,.0f} ex/s", "reference": f"DDP {ddp:,.0f} ex/s", "ratio": ours / ddp,
               "note": "scalesgd/DDP, median of blocks"}
        print(f"# {row['check']}: {row['setting']}: scalesgd {ours:,.0f} ex/s, DDP {ddp:,.0f} ex/s", flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# 2. exact per-example norms on the device


def _synced(fn, device: torch.device):
    if device.type != "cuda":
        return fn

    def step():
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return step


def run_norms(sizes: dict, device: torch.device) -> list[dict]:
    rows = []
    for name in MODELS:
        setting = f"{describe(name, sizes)}, {device}"
        model = build_model(name, sizes).to(device)
        x, y = make_batch(name, sizes, sizes["batch"], seed=7, device=device)
        scale = 1.0 / sizes["batch"]
        ce = nn.CrossEntropyLoss()

        m_plain = copy.deepcopy(model)
        flat_plain = FlatModel(m_plain, 1, device).grad

        def plain():
            flat_plain.zero_()
            (F.cross_entropy(m_plain(x), y, reduction="sum") * scale).backward()

        m_tap = copy.deepcopy(model)
        flat_tap = FlatModel(m_tap, 1, device).grad
        try:
            n_check = min(4, sizes["batch"])
            got = per_example_sq_norms(model, ce, x[:n_check], y[:n_check]).double()
            want = loop_sq_norms(model, ce, x[:n_check], y[:n_check]).double()
            agree = float(((got - want).abs() / want).max())
        except ConfigError as e:  # a layer the ghost norms cannot handle: say so in the table
            for check in ("exact norms in-step tap", "per_example_sq_norms"):
                rows.append({"check": f"{check} {name}", "setting": setting, "value": "unsupported",
                             "reference": "-", "ratio": None, "note": str(e).split(";")[0][:110]})
            print(f"# exact norms {name}: unsupported: {e}", flush=True)
            continue
        tap = GhostNormTap(m_tap)

        def tapped():
            flat_tap.zero_()
            loss = F.cross_entropy(m_tap(x), y, reduction="sum") * scale
            with tap.capture():
                loss.backward()
            return tap.sq_norms(scale)

        m_pes = copy.deepcopy(model)
        variants = [Variant("plain", "plain fwd+bwd", _synced(plain, device)),
                    Variant("tap", "in-step GhostNormTap", _synced(tapped, device)),
                    Variant("pes", "per_example_sq_norms", _synced(lambda: per_example_sq_norms(m_pes, ce, x, y),
                                                                   device))]
        times, rounds = time_variants(variants, sizes["norm_blocks"], sizes["norm_reps"])
        med = {k: statistics.median(v) for k, v in times.items()}
        for key, check in (("tap", "exact norms in-step tap"), ("pes", "per_example_sq_norms")):
            paired = statistics.median(t / times["plain"][r] for r, t in zip(rounds[key], times[key]))
            rows.append({"check": f"{check} {name}", "setting": setting, "value": f"{med[key] * 1e3:.3f} ms",
                         "reference": f"plain {med['plain'] * 1e3:.3f} ms", "ratio": paired,
                         "note": f"paired median; norms vs loop max rel diff {agree:.1e}"})
        print(f"# exact norms {name}: plain {med['plain'] * 1e3:.3f} ms, tap {med['tap'] * 1e3:.3f} ms, "
              f"per_example_sq_norms {med['pes'] * 1e3:.3f} ms", flush=True)
        tap.close()
    return rows


# ---------------------------------------------------------------------------------------------------------
# 3. gloo all-reduce


def run_allreduce(sizes: dict, dry_run: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "allreduce.json"
        cmd = [sys.executable, "-m", "scalesgd", "allreduce-bench", "--backend", "gloo",
               "--strategies", "allreduce", "ring", "--workers", *map(str, sizes["workers"]),
               "--sizes", *sizes["sizes"], "--iters", str(sizes["iters"]), "--warmup", "1", "--json", str(out)]
        if dry_run:
            cmd += ["--quick", "--budget-s", "2"]
        print("# " + " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"allreduce-bench failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        data = json.loads(out.read_text())
    rows = []
    biggest = max(r["size_bytes"] for r in data["rows"])
    for p in sizes["workers"]:
        at = {r["strategy"]: r for r in data["rows"] if r["world_size"] == p and r["size_bytes"] == biggest}
        ring, builtin = at["ring"], at["allreduce"]
        rows.append({"check": f"allreduce gloo P={p}", "setting": f"{biggest / 2**20:g} MiB, {os.cpu_count()} cores",
                     "value": f"ring busbw {ring['busbw_GBps']:.3g} GB/s",
                     "reference": f"gloo {builtin['busbw_GBps']:.3g} GB/s",
                     "ratio": ring["busbw_GBps"] / builtin["busbw_GBps"] if builtin["busbw_GBps"] else None,
                     "note": f"ring {ring['time_s'] * 1e3:.3g} ms vs gloo {builtin['time_s'] * 1e3:.3g} ms"})
    return rows


# ---------------------------------------------------------------------------------------------------------


COLUMNS = ("check", "setting", "value", "reference", "ratio", "note")


def format_table(rows: list[dict]) -> str:
    cells = [[r["check"], r["setting"], r["value"], r["reference"],
              "-" if r["ratio"] is None else f"{r['ratio']:.3f}x", r["note"]] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, P = 2: a smoke test")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the table's rows here")
    args = parser.parse_args(argv)
    # the table says which layers lack a closed form; the per-model warning would only repeat it
    warnings.filterwarnings("ignore", message="ghost norms: no closed form")
    sizes = DRY if args.dry_run else FULL
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    if not cuda and not args.dry_run:
        print("# no CUDA device visible: the full-size check runs on the CPU", flush=True)
    t0 = time.perf_counter()
    rows = run_throughput(sizes, backend)
    rows += run_norms(sizes, device)
    rows += run_allreduce(sizes, args.dry_run)
    title = (f"device check{' (dry run)' if args.dry_run else ''}: torch {torch.__version__}, "
             f"{torch.cuda.get_device_name(0) if cuda else 'CPU'}, {os.cpu_count()} cores, "
             f"{time.perf_counter() - t0:.0f} s")
    print("\n" + title + "\n" + format_table(rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
