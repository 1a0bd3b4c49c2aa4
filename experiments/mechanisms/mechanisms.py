"""Diversity-inducing mechanisms (Yin et al. 2018, §5): how much each raises B_S, and what it costs in passes.

Command (from the repository root; a few minutes of CPU on two cores, more wall time on a busy machine; writes
report.md and two PNGs beside this file)::

    nice -n 10 .venv/bin/python experiments/mechanisms/mechanisms.py

Workload: scikit-learn digits (1438 training, 359 test images), a 64-32-10 ReLU MLP (N = 2410 parameters), plain
SGD (no momentum, no weight decay) on the mean loss at the large batch B = 512 (B_S is ~80-170 along the plain
run, so B is 3-6× beyond it), learning rate
0.5, 40 passes, seeds 0, 1, 2 (initialisation, data order and every mechanism's randomness). Mechanisms, as the
trainer offers them (the same library code):

* ``dropout`` p ∈ {0.1, 0.25, 0.5} after the hidden layer (``--dropout``; masks per example,
  :class:`scalesgd.models.ExampleDropout`);
* ``langevin`` σ (``--langevin-noise``: N(0, σ²·lr) per coordinate on the weights each step,
  :func:`scalesgd.transforms.langevin`), σ chosen so that its per-example equivalent v = B·N·σ²/lr is
  {4, 16, 64, 256}× M2 (M2 = (1/n)Σᵢ‖gᵢ‖² at the checkpoint below, seed 0);
* ``example-gauss``: independent per-example Gaussian noise N(0, τ²I) on each gᵢ, v = N·τ² = {4, 16, 64, 256}× M2 (the
  formula's own case; the mean of B such draws is drawn directly, the same distribution);
* ``example-qsgd`` s ∈ {4, 2, 1}: each example's gradient QSGD-quantized (``--example-qsgd-levels``,
  :class:`scalesgd.mechanisms.ExampleQSGD`, buckets of 512, max scale), v = E‖Q(gᵢ) − gᵢ‖² exact;
* ``qsgd`` s ∈ {4, 2, 1}: the QSGD codec of ``--comm qsgd`` on each of P = 4 workers' summed gradients (simulated in
  one process: each shard's gradient encoded and decoded by :func:`scalesgd.comm.qsgd_encode` with that rank's
  generator) — noise per worker, not per example.

Measured:

1. **At the same weights** — the plain run's weights after 10 passes (each seed): the exact B_S = M2/‖∇F‖² from
   per-example gradients (cross-checked against :func:`scalesgd.diversity.gradient_diversity`'s ghost norms), and
   B̃_S with each mechanism's noise: for the per-example mechanisms the whole data set's E‖g̃ᵢ‖² over 8 draws
   (dropout masks, Gaussian draws, roundings) divided by ‖E g̃‖² (unbiased, from the cross products of the draws'
   mean gradients); for Langevin and the codec, whose noise is per step, the step-level B̃_S = 1 + B·E‖d − ∇F‖²/‖∇F‖²
   over 192 batches of B drawn with replacement (for per-example noise this is the same B̃_S; the plain row checks
   it against B_S). Predicted: B̃_S = B_S + v/‖∇F‖² with the exact v (Gaussian: N·τ²; per-example QSGD: the
   rounding variance; Langevin: B·N·σ²/lr; codec: B·E‖ΔG_B‖² from its exact variance on the same batches).
2. **Along each mechanism's own run** (passes 1, 3, 10, 30): its B_S without the noise, and B̃_S with it (by the
   same formulas from exact variances; dropout: 4 mask draws).
3. **Convergence cost**: passes until the test accuracy first reaches 93% at B = 512 (evaluated every step).
4. **Dropout at P = 2 equals P = 1**: the same step's gradient computed by one worker and by two shards with their
   rows' global positions (``example_randomness``), and the real trainer (``scalesgd.run.train``, 2 gloo workers
   against 1, ``--check-replicas-every 1``) with ``--dropout 0.25`` for 10 steps.

Expected (the committed run; see report.md): at the plain run's weights (B_S = 129 ± 33) the prediction
B̃_S = B_S + v/‖∇F‖² holds to within 1% for per-example quantization (s = 4, 2, 1: gains 1.18, 1.56, 2.57×), for
per-example Gaussian noise up to v = 64·M2 (gain 65×; at 256·M2 the 8-draw estimate reads 1.10 ± 0.05 of it, the
denominator's estimator noise) and in step-level form for Langevin noise (gains 4.9-254×) and the codec (s = 4, 2,
1 at P = 4: 1.3, 2.2, 4.7×); the plain step-level check reads 0.99 ± 0.02 of B_S. Dropout is not zero-mean noise
(it moves the mean gradient too): at the plain weights p = 0.1, 0.25 raise B_S 1.25×, 1.32× and p = 0.5 lowers it
(0.75×), while along its own run B̃_S is 1.4-10× the run's own B_S. The cost in passes to 93% (plain 21.8 ± 1.2) is
within the seeds' spread for every mechanism up to gains of ~65× (the added step noise v/B up to ~16× ‖∇F‖²);
per-example Gaussian noise at 256·M2 needs ≥ 36 ± 4 passes (one seed of three misses in 40), dropout 0.5 27.9 ± 8.
Dropout at P = 2 gives P = 1's gradients to 1e-8 and the trainer's two-worker run P = 1's losses to 1e-7.

Reusable pieces: :func:`train_run` (one run with a mechanism, its accuracy trace and own-run diversity),
:func:`bound_at` (B_S and B̃_S at given weights), :func:`dropout_p2_equals_p1`; ``main(argv)`` takes ``--quick``
(tiny sizes, used by tests/test_mechanisms_experiment.py).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from scalesgd.comm import qsgd_decode, qsgd_encode, qsgd_error_variance  # noqa: E402
from scalesgd.data import load_dataset  # noqa: E402
from scalesgd.diversity import gradient_diversity  # noqa: E402
from scalesgd.mechanisms import (ExampleQSGD, example_generator_seed, example_qsgd,  # noqa: E402
                                 langevin_example_second_moment, noisy_batch_bound, per_example_gradients)
from scalesgd.models import build_model, example_randomness, loss_function  # noqa: E402
from scalesgd.step import FlatModel  # noqa: E402
from scalesgd.transforms import Hyper, apply_updates_, sgd  # noqa: E402

OUT = Path(__file__).resolve().parent
LOSS = loss_function("classification")  # Σᵢ ℓᵢ
LOSS_NONE = loss_function("classification", "none")
BUCKET = 512
P_CODEC = 4


@dataclass(frozen=True)
class Settings:
    width: int = 32
    batch: int = 512
    lr: float = 0.5
    passes: float = 40.0
    target: float = 0.93
    ckpt_pass: float = 10.0
    record_passes: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    draws: int = 8  # noise draws for the data-set B̃_S at the checkpoint
    step_draws: int = 192  # batches for the step-level B̃_S
    run_draws: int = 4  # dropout mask draws along the runs
    dropout: tuple[float, ...] = (0.1, 0.25, 0.5)
    v_ratios: tuple[float, ...] = (4.0, 16.0, 64.0, 256.0)  # v / M2_ref for langevin and example-gauss
    levels: tuple[int, ...] = (4, 2, 1)  # example-qsgd and qsgd
    trainer_check: bool = True


QUICK = Settings(width=8, batch=64, passes=2.0, ckpt_pass=1.0, record_passes=(1.0,), seeds=(0,), draws=3,
                 step_draws=6, run_draws=2, dropout=(0.25,), v_ratios=(4.0,), levels=(2,), trainer_check=False)


@dataclass
class Data:
    x: torch.Tensor
    y: torch.Tensor
    xt: torch.Tensor
    yt: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def load() -> Data:
    ds = load_dataset("digits")
    return Data(ds.x_train, ds.y_train, ds.x_test, ds.y_test)


# ---------------------------------------------------------------------------------------------------------------
# One mechanism's gradient on a batch


@dataclass(frozen=True)
class Mechanism:
    """A mechanism and its strength; ``param`` is p (dropout), σ (langevin), τ (example-gauss), s (qsgd kinds)."""

    kind: str  # plain, dropout, langevin, example-gauss, example-qsgd, qsgd
    param: float = 0.0
    label: str = "plain"

    @property
    def dropout(self) -> float:
        return self.param if self.kind == "dropout" else 0.0


def mean_gradient(flat: FlatModel, mech: Mechanism, x: torch.Tensor, y: torch.Tensor, *, seed: int, step: int,
                  noise_gen: torch.Generator) -> None:
    """Write the mechanism's mean gradient of the batch (x, y) into ``flat.grad`` (Langevin's noise is the
    transformation's, added in the update)."""
    b = int(x.shape[0])
    flat.buffer.zero_()
    if mech.kind == "example-qsgd":
        _, _, total, _ = ExampleQSGD(int(mech.param)).summed_gradient(flat.model, LOSS, x, y, seed=seed, step=step,
                                                                      first_row=0, global_rows=b)
        torch.mul(total, 1.0 / b, out=flat.grad)
        return
    if mech.kind == "qsgd":
        summed = torch.zeros_like(flat.grad)
        for rank, part in enumerate(torch.tensor_split(torch.arange(b), P_CODEC)):
            flat.buffer.zero_()
            (LOSS(flat.model(x[part]), y[part]) / b).backward()
            gen = _rank_generators(seed)[rank]
            qsgd_decode(qsgd_encode(flat.grad.clone(), num_levels=int(mech.param), bucket_size=BUCKET, scale="max",
                                    generator=gen), out=summed)
        flat.grad.copy_(summed)
        return
    with example_randomness(flat.model, seed=seed, step=step, first_row=0, global_rows=b):
        (LOSS(flat.model(x), y) / b).backward()
    if mech.kind == "example-gauss":
        # the mean of b independent N(0, τ²I) per-example draws is N(0, τ²/b · I)
        noise = torch.randn(flat.grad.shape, generator=noise_gen, dtype=flat.grad.dtype)
        flat.grad.add_(noise, alpha=mech.param / math.sqrt(b))


_RANK_GENS: dict[int, list[torch.Generator]] = {}


def _rank_generators(seed: int) -> list[torch.Generator]:
    """Each simulated worker's codec generator, seeded (seed·1000 + rank) as the trainer seeds it."""
    if seed not in _RANK_GENS:
        _RANK_GENS[seed] = [torch.Generator().manual_seed(seed * 1000 + r) for r in range(P_CODEC)]
    return _RANK_GENS[seed]


# ---------------------------------------------------------------------------------------------------------------
# B_S and B̃_S at given weights


def _rows(model: torch.nn.Module, data: Data) -> torch.Tensor:
    """(n, N) per-example gradients, float64, the model in eval mode (no dropout)."""
    was = model.training
    model.eval()
    grads, _, _ = per_example_gradients(model, LOSS, data.x, data.y)
    model.train(was)
    return grads.double()


def _cross_sq(means: list[torch.Tensor]) -> float:
    """‖E m‖² from K independent draws m_k, unbiased: the mean of m_k·m_l over k ≠ l."""
    s = torch.stack(means)
    k = s.shape[0]
    return float((s.sum(0).square().sum() - s.square().sum()) / (k * (k - 1)))


def dropout_bound(model: torch.nn.Module, data: Data, *, draws: int, seed: int) -> float:
    """B̃_S of the model in train mode (its dropout masks part of the gradients): E‖g̃ᵢ‖² over ``draws`` mask draws
    of the whole data set (ghost norms), over ‖E g̃‖² from the draws' mean gradients (same masks: a function of
    (seed, step, row))."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    m2s, means = [], []
    for k in range(draws):
        with example_randomness(model, seed=seed, step=10_000 + k, first_row=0, global_rows=data.n):
            stats = gradient_diversity(model, LOSS_NONE, data.x, data.y, batch_size=data.n)
            grads = torch.autograd.grad(LOSS(model(data.x), data.y) / data.n, params)
        m2s.append(stats.m2)
        means.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return float(np.mean(m2s)) / _cross_sq(means)


def example_noise_bound(rows: torch.Tensor, mech: Mechanism, *, draws: int, seed: int) -> tuple[float, float]:
    """(measured, predicted) B̃_S of per-example noise on ``rows`` (n, N): measured over ``draws`` draws of the
    whole data set; predicted B_S + v̄/‖∇F‖² with the exact v̄."""
    n, numel = rows.shape
    g2 = float(rows.mean(0).square().sum())
    bs = float(rows.square().sum(1).mean()) / g2
    gen = torch.Generator().manual_seed(seed)
    m2s, means, v = [], [], 0.0
    for k in range(draws):
        if mech.kind == "example-gauss":
            noisy = rows + mech.param * torch.randn(rows.shape, generator=gen, dtype=rows.dtype)
            v = numel * mech.param ** 2
        else:
            q, var = example_qsgd(rows.float(), levels=int(mech.param), generator_seed=example_generator_seed(seed, k),
                                  bucket_size=BUCKET)
            noisy, v = q.double(), float(var.mean())
        m2s.append(float(noisy.square().sum(1).mean()))
        means.append(noisy.mean(0))
    return float(np.mean(m2s)) / _cross_sq(means), noisy_batch_bound(bs, g2, v)


def step_level_bound(flat: FlatModel, mech: Mechanism, data: Data, full_grad: torch.Tensor, bs: float, *, batch: int,
                     lr: float, draws: int, seed: int) -> tuple[float, float]:
    """(measured, predicted) step-level B̃_S = 1 + B·E‖d − ∇F‖²/‖∇F‖² over ``draws`` batches drawn with
    replacement (d: the mechanism's step direction, Langevin's noise σ/√lr per coordinate included); predicted:
    B_S + v/‖∇F‖² with v the per-example equivalent of the step noise (Langevin: B·N·σ²/lr; codec: B·E‖ΔG_B‖²
    from its exact variance on these batches; plain: 0)."""
    gen = torch.Generator().manual_seed(seed + 99)
    noise_gen = torch.Generator().manual_seed(seed + 98)
    g2 = float(full_grad.square().sum())
    err, codec_v = 0.0, 0.0
    for k in range(draws):
        idx = torch.randint(0, data.n, (batch,), generator=gen)
        mean_gradient(flat, mech, data.x[idx], data.y[idx], seed=seed, step=20_000 + k, noise_gen=noise_gen)
        d = flat.grad.double().clone()
        if mech.kind == "langevin":
            d += torch.randn(d.shape, generator=noise_gen, dtype=d.dtype) * (mech.param / math.sqrt(lr))
        if mech.kind == "qsgd":
            for part in torch.tensor_split(torch.arange(batch), P_CODEC):
                flat.buffer.zero_()
                (LOSS(flat.model(data.x[idx][part]), data.y[idx][part]) / batch).backward()
                codec_v += qsgd_error_variance(flat.grad, num_levels=int(mech.param), bucket_size=BUCKET, scale="max")
        err += float((d - full_grad).square().sum())
    flat.buffer.zero_()
    measured = 1.0 + batch * err / draws / g2
    if mech.kind == "langevin":
        v = langevin_example_second_moment(mech.param, lr, batch, full_grad.numel())
    else:
        v = batch * codec_v / draws  # 0 for plain
    return measured, noisy_batch_bound(bs, g2, v)


# ---------------------------------------------------------------------------------------------------------------
# A run


@dataclass
class RunResult:
    mech: Mechanism
    seed: int
    passes_to_target: float  # inf: not reached
    final_accuracy: float
    trace: list[tuple[float, float]] = field(default_factory=list)  # (passes, test accuracy)
    own: list[tuple[float, float, float]] = field(default_factory=list)  # (passes, B_S, B̃_S) along the run
    ckpt: list[torch.Tensor] | None = None  # the parameters at the checkpoint pass, in order (plain runs)


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def build(width: int, seed: int, dropout: float = 0.0) -> torch.nn.Module:
    return build_model("mlp", input_shape=(64,), num_outputs=10, seed=seed, width=width, depth=1, dropout=dropout)


def own_bound(model: torch.nn.Module, mech: Mechanism, data: Data, s: Settings, *, seed: int) -> tuple[float, float]:
    """(B_S without the noise, B̃_S with it) at the model's current weights (formulas with exact variances;
    dropout: mask draws; the codec: its exact variance on 4 batches)."""
    rows = _rows(model, data)
    n, numel = rows.shape
    full = rows.mean(0)
    g2 = float(full.square().sum())
    bs = float(rows.square().sum(1).mean()) / g2
    if mech.kind == "plain":
        return bs, bs
    if mech.kind == "dropout":
        return bs, dropout_bound(model, data, draws=s.run_draws, seed=seed + 5)
    if mech.kind == "example-gauss":
        return bs, noisy_batch_bound(bs, g2, numel * mech.param ** 2)
    if mech.kind == "langevin":
        return bs, noisy_batch_bound(bs, g2, langevin_example_second_moment(mech.param, s.lr, s.batch, numel))
    if mech.kind == "example-qsgd":
        _, var = example_qsgd(rows.float(), levels=int(mech.param), generator_seed=0, bucket_size=BUCKET)
        return bs, noisy_batch_bound(bs, g2, float(var.mean()))
    # qsgd codec: v = B·E‖ΔG_B‖², ΔG_B the codec's error on the mean gradient, Σ over the P shards' variances
    gen = torch.Generator().manual_seed(seed + 7)
    codec = 0.0
    for _ in range(4):
        idx = torch.randint(0, n, (s.batch,), generator=gen)
        for part in torch.tensor_split(idx, P_CODEC):
            codec += qsgd_error_variance(rows[part].sum(0) / s.batch, num_levels=int(mech.param), bucket_size=BUCKET,
                                         scale="max")
    return bs, noisy_batch_bound(bs, g2, s.batch * codec / 4)


def train_run(mech: Mechanism, seed: int, data: Data, s: Settings, *, keep_ckpt: bool = False) -> RunResult:
    """SGD at batch ``s.batch`` with the mechanism for ``s.passes`` passes; test accuracy every step, own-run
    B_S / B̃_S at ``s.record_passes``; the weights at ``s.ckpt_pass`` when ``keep_ckpt``."""
    model = build(s.width, seed, mech.dropout)
    model.train()
    flat = FlatModel(model, 1, torch.device("cpu"))
    tx = sgd(langevin_noise=mech.param if mech.kind == "langevin" else 0.0, seed=seed)
    state = tx.init(flat.params)
    order = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 12345)
    stream = torch.empty(0, dtype=torch.long)
    result = RunResult(mech, seed, math.inf, 0.0)
    steps = int(math.ceil(s.passes * data.n / s.batch))
    records = list(s.record_passes)
    for t in range(steps):
        passes = t * s.batch / data.n
        while records and passes >= records[0]:
            result.own.append((records.pop(0), *own_bound(model, mech, data, s, seed=seed)))
        if keep_ckpt and result.ckpt is None and passes >= s.ckpt_pass:
            result.ckpt = [q.detach().clone() for q in model.parameters()]
        while stream.numel() < s.batch:  # epochs of shuffled order, batches running across epoch ends
            stream = torch.cat([stream, torch.randperm(data.n, generator=order)])
        idx, stream = stream[:s.batch], stream[s.batch:]
        mean_gradient(flat, mech, data.x[idx], data.y[idx], seed=seed, step=t, noise_gen=noise_gen)
        with torch.no_grad():
            direction, state = tx.update(flat.grad, state, flat.params, Hyper(lr=s.lr, step=t))
            apply_updates_(flat.params, direction, s.lr)
        acc = _accuracy(model, data.xt, data.yt)
        done = (t + 1) * s.batch / data.n
        result.trace.append((done, acc))
        if acc >= s.target and math.isinf(result.passes_to_target):
            result.passes_to_target = done
    result.final_accuracy = result.trace[-1][1]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Dropout: P = 2 equals P = 1


def dropout_p2_equals_p1(data: Data, *, width: int, batch: int, p: float = 0.25, steps: int = 3) -> float:
    """Largest |difference| between one worker's mean gradient of a batch and the sum of two shards' (rows placed
    by their global position, as the trainer places them), over ``steps`` steps; and the shards draw different
    masks (asserted)."""
    model = build(width, 0, p)
    model.train()
    params = [q for q in model.parameters()]
    worst = 0.0
    for t in range(steps):
        idx = torch.arange(t * batch, (t + 1) * batch) % data.n
        x, y = data.x[idx], data.y[idx]
        with example_randomness(model, seed=3, step=t, first_row=0, global_rows=batch):
            one = torch.autograd.grad(LOSS(model(x), y) / batch, params)
        half = batch // 2
        parts = []
        for first, rows in ((0, slice(0, half)), (half, slice(half, batch))):
            with example_randomness(model, seed=3, step=t, first_row=first, global_rows=batch):
                parts.append(torch.autograd.grad(LOSS(model(x[rows]), y[rows]) / batch, params))
        for a, b0, b1 in zip(one, *parts):
            worst = max(worst, float((a - (b0 + b1)).abs().max()))
    return worst


def trainer_dropout_check(tmp: Path) -> dict[str, float]:
    """The trainer at P = 2 and P = 1 with --dropout 0.25 (10 steps, replicas checked every step): the largest
    relative difference of their step losses and of their final weights."""
    import json

    from scalesgd.config import RunConfig
    from scalesgd.run import train

    out = {}
    for workers in (2, 1):
        cfg = RunConfig(dataset="digits", model="mlp", width=32, depth=1, dropout=0.25, workers=workers,
                        global_batch_size=64, steps=10, lr=0.5, momentum=0.0, weight_decay=0.0, lr_schedule="constant",
                        check_replicas_every=1, diversity="off", progress=False, threads_per_worker=1, timeout_s=120,
                        seed=4, run_dir=str(tmp / f"P{workers}"))
        train(cfg)
        losses = [json.loads(line)["loss"] for line in (tmp / f"P{workers}" / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["kind"] == "step"]
        params = torch.load(tmp / f"P{workers}" / "checkpoint.pt", weights_only=True)["train_state"]["params"]
        out[workers] = (losses, params)
    (l2, p2), (l1, p1) = out[2], out[1]
    return {"loss_rel": max(abs(a - b) / abs(b) for a, b in zip(l2, l1)),
            "param_rel": float((p2 - p1).abs().max() / p1.abs().max()), "steps": len(l1)}


# ---------------------------------------------------------------------------------------------------------------
# The experiment


def mechanisms(s: Settings, m2_ref: float, numel: int) -> list[Mechanism]:
    """Every mechanism at every strength; Langevin's σ and the Gaussian τ from v = ratio·M2_ref."""
    out = [Mechanism("plain")]
    out += [Mechanism("dropout", p, f"dropout p={p:g}") for p in s.dropout]
    for r in s.v_ratios:
        v = r * m2_ref
        out.append(Mechanism("langevin", math.sqrt(v * s.lr / (s.batch * numel)), f"langevin v={r:g}·M2"))
    out += [Mechanism("example-gauss", math.sqrt(r * m2_ref / numel), f"example-gauss v={r:g}·M2") for r in s.v_ratios]
    out += [Mechanism("example-qsgd", float(lv), f"example-qsgd s={lv}") for lv in s.levels]
    out += [Mechanism("qsgd", float(lv), f"qsgd codec s={lv}, P={P_CODEC}") for lv in s.levels]
    return out


def at_checkpoint(mech: Mechanism, ckpt: list[torch.Tensor], data: Data, s: Settings, *, seed: int
                  ) -> dict[str, float]:
    """B_S and the mechanism's B̃_S (measured, predicted) at the plain run's checkpoint weights."""
    model = build(s.width, seed, mech.dropout)
    with torch.no_grad():  # by parameter order: a dropout layer shifts the state-dict keys, not the parameters
        for q, value in zip(model.parameters(), ckpt, strict=True):
            q.copy_(value)
    rows = _rows(model, data)
    full = rows.mean(0)
    g2 = float(full.square().sum())
    bs = float(rows.square().sum(1).mean()) / g2
    out = {"bs": bs, "m2": float(rows.square().sum(1).mean()), "g2": g2}
    if mech.kind == "dropout":
        out["measured"], out["predicted"] = dropout_bound(model, data, draws=s.draws, seed=seed), math.nan
    elif mech.kind in ("example-gauss", "example-qsgd"):
        out["measured"], out["predicted"] = example_noise_bound(rows, mech, draws=s.draws, seed=seed)
    else:
        flat = FlatModel(model, 1, torch.device("cpu"))
        out["measured"], out["predicted"] = step_level_bound(flat, mech, data, full, bs, batch=s.batch, lr=s.lr,
                                                             draws=s.step_draws, seed=seed)
    if mech.kind == "plain":  # the library's ghost-norm path on the same weights: an independent check of B_S
        out["bs_ghost"] = gradient_diversity(model.eval(), LOSS_NONE, data.x, data.y).batch_bound
    return out


def _ms(values, cap: float | None = None) -> str:
    """mean ± std; infinite values (target not reached) count as ``cap`` and the cell says ≥ and how many."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0 or np.all(np.isnan(v)):
        return "—"
    prefix, note = "", ""
    if np.any(np.isinf(v)):
        if cap is None or np.all(np.isinf(v)):
            return f"not reached ({int(np.isinf(v).sum())}/{v.size})"
        prefix, note = "≥ ", f" ({int(np.isinf(v).sum())}/{v.size} not reached)"
        v = np.where(np.isinf(v), cap, v)
    body = f"{v.mean():.1f} ± {v.std():.1f}" if abs(v.mean()) >= 10 else f"{v.mean():.2f} ± {v.std():.2f}"
    return prefix + body + note


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the test's)")
    ap.add_argument("--out", type=Path, default=OUT, help="where report.md and the PNGs go")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else Settings()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = load()
    numel = sum(p.numel() for p in build(s.width, 0).parameters())

    plain = {seed: train_run(Mechanism("plain"), seed, data, s, keep_ckpt=True) for seed in s.seeds}
    ref = at_checkpoint(Mechanism("plain"), plain[s.seeds[0]].ckpt, data, s, seed=s.seeds[0])
    mechs = mechanisms(s, ref["m2"], numel)
    runs: dict[str, list[RunResult]] = {"plain": list(plain.values())}
    ckpt: dict[str, list[dict[str, float]]] = {}
    for mech in mechs:
        if mech.kind != "plain":
            runs[mech.label] = [train_run(mech, seed, data, s) for seed in s.seeds]
        ckpt[mech.label] = [at_checkpoint(mech, plain[seed].ckpt, data, s, seed=seed) for seed in s.seeds]
        print(f"{mech.label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    p2 = dropout_p2_equals_p1(data, width=s.width, batch=s.batch)
    trainer = None
    if s.trainer_check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            trainer = trainer_dropout_check(Path(tmp))
    elapsed = time.perf_counter() - t0
    results = {"settings": s, "mechs": mechs, "runs": runs, "ckpt": ckpt, "p2": p2, "trainer": trainer,
               "elapsed": elapsed, "numel": numel, "m2_ref": ref["m2"]}
    write_report(results, args.out)
    return results


def write_report(r: dict, out: Path) -> None:
    s: Settings = r["settings"]
    mechs: list[Mechanism] = r["mechs"]
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Diversity-inducing mechanisms: generated report", "",
             f"Generated by `experiments/mechanisms/mechanisms.py` in {r['elapsed']:.0f} s. Digits, 64-{s.width}-10 MLP "
             f"(N = {r['numel']}), plain SGD at B = {s.batch}, lr {s.lr:g}, {s.passes:g} passes; seeds "
             f"{list(s.seeds)}, mean ± std. M2_ref = {r['m2_ref']:.4g} (M2 of the seed-{s.seeds[0]} plain run at pass "
             f"{s.ckpt_pass:g}) sets the Langevin and Gaussian strengths.", "",
             f"## At the same weights (the plain run's, pass {s.ckpt_pass:g}) and the convergence cost", "",
             "B_S: exact, no noise. B̃_S measured: per-example mechanisms over noise draws of the whole data set; "
             "Langevin and the codec (and plain, as a check) at the step level, 1 + B·E‖d − ∇F‖²/‖∇F‖². Predicted: "
             "B_S + v/‖∇F‖² with the exact v. Passes: to "
             f"{s.target:.0%} test accuracy at B = {s.batch}.", "",
             "| mechanism | B_S | B̃_S measured | B̃_S predicted | measured / predicted | gain B̃_S/B_S | passes to target "
             "| final test acc |", "|---|---|---|---|---|---|---|---|"]
    for mech in mechs:
        c = r["ckpt"][mech.label]
        meas = [x["measured"] for x in c]
        pred = [x["predicted"] for x in c]
        ratio = [m / p for m, p in zip(meas, pred)]
        gain = [x["measured"] / x["bs"] for x in c]
        runs = r["runs"][mech.label]
        lines.append(f"| {mech.label} | {_ms([x['bs'] for x in c])} | {_ms(meas)} | {_ms(pred)} | {_ms(ratio)} | "
                     f"{_ms(gain)} | {_ms([u.passes_to_target for u in runs], cap=s.passes)} | "
                     f"{_ms([u.final_accuracy for u in runs])} |")
    ghost = [x["bs_ghost"] for x in r["ckpt"]["plain"]]
    lines += ["", f"B_S of the plain checkpoint by ghost norms (`gradient_diversity`): {_ms(ghost)}, against "
              f"{_ms([x['bs'] for x in r['ckpt']['plain']])} from torch.func per-example gradients.", "",
              "## Along each mechanism's own run", "",
              "B_S of the run's own weights without the noise / B̃_S with it (formulas with the exact v; dropout: "
              "mask draws), seed mean.", "",
              "| mechanism | " + " | ".join(f"pass {p:g}" for p in s.record_passes) + " |",
              "|---|" + "---|" * len(s.record_passes)]
    for mech in mechs:
        runs = r["runs"][mech.label]
        cells = []
        for j in range(len(s.record_passes)):
            pts = [u.own[j] for u in runs if len(u.own) > j]
            cells.append(f"{np.mean([p[1] for p in pts]):.1f} / {np.mean([p[2] for p in pts]):.1f}" if pts else "—")
        lines.append(f"| {mech.label} | " + " | ".join(cells) + " |")
    lines += ["", "## Dropout at P = 2 equals P = 1", "",
              f"One step's mean gradient by one worker against two shards with their rows' global positions "
              f"(p = 0.25, B = {s.batch}, 3 steps): largest |difference| {r['p2']:.2e}."]
    if r["trainer"] is not None:
        t = r["trainer"]
        lines.append(f"The trainer, 2 gloo workers against 1 (`--dropout 0.25`, {t['steps']} steps, replicas checked "
                     f"every step): step losses agree to {t['loss_rel']:.1e} (relative), final weights to "
                     f"{t['param_rel']:.1e} (relative to the largest).")
    lines += ["", "![gain and cost](gain_cost.png)", "![measured vs predicted](predicted.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    _plots(r, out)


def _plots(r: dict, out: Path) -> None:
    mechs: list[Mechanism] = r["mechs"]
    kinds = ["dropout", "langevin", "example-gauss", "example-qsgd", "qsgd"]
    colors = dict(zip(kinds, ["C0", "C1", "C2", "C3", "C4"]))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    base = r["ckpt"]["plain"]
    pr = [u.passes_to_target for u in r["runs"]["plain"]]
    ax.scatter([1.0], [np.mean(pr)], color="k", label="plain", zorder=3)
    for kind in kinds:
        xs, ys, es = [], [], []
        for mech in (m for m in mechs if m.kind == kind):
            c = r["ckpt"][mech.label]
            p = np.array([u.passes_to_target for u in r["runs"][mech.label]], dtype=float)
            xs.append(np.mean([x["measured"] / x["bs"] for x in c]))
            cap = r["settings"].passes
            ys.append(np.mean(np.where(np.isinf(p), cap, p)))
            es.append(np.std(np.where(np.isinf(p), cap, p)))
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", color=colors[kind], label=kind, capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("diversity gain B̃_S / B_S at the plain run's weights")
    ax.set_ylabel(f"passes to target at B = {r['settings'].batch} (capped at the budget)")
    ax.legend(fontsize=8)
    ax.set_title("Diversity gain against convergence cost")
    fig.tight_layout()
    fig.savefig(out / "gain_cost.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4.5))
    lo, hi = math.inf, 0.0
    for kind in ["plain"] + kinds:
        pts = [(x["predicted"], x["measured"]) for m in mechs if m.kind == kind for x in r["ckpt"][m.label]
               if math.isfinite(x["predicted"])]
        if pts:
            a = np.array(pts)
            ax.scatter(a[:, 0], a[:, 1], color=colors.get(kind, "k"), label=kind, s=18)
            lo, hi = min(lo, a.min()), max(hi, a.max())
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted B̃_S = B_S + v/‖∇F‖²")
    ax.set_ylabel("measured B̃_S")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "predicted.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
