"""Large-batch generalisation: test accuracy and the out-of-sample gradient norm against the global batch, and
against the initialisation scale of a 2-layer network (after the experiments of Charles & Papailiopoulos, ICML 2018,
"Stability and generalization of learning algorithms that converge to global optima").

Command (from the repository root; about 5 minutes of CPU on one core, more wall time on a busy machine; writes
report.md and two PNGs beside this file)::

    nice -n 10 .venv/bin/python experiments/generalization/generalization.py

The out-of-sample gradient norm is the mean over held-out examples z of ‖∇_w f(w; z)‖ at the trained weights w
(f the per-example cross-entropy, all parameters, Euclidean norm), from the project's exact per-example ghost norms
(:func:`scalesgd.ghost_norms.per_example_sq_norms`). Charles & Papailiopoulos tie the generalisation of algorithms
that reach a global optimum to their stability, and report this norm beside the test accuracy: a larger norm on
unseen examples goes with a less stable solution and a larger generalisation gap.

Model: the project's ``mlp`` with one hidden layer (``depth=1``) and its own initialisation, many copies trained at
once (one batched matrix product per layer and step for every (learning rate, seed) pair; the copies are exactly
the project's model, see :meth:`Ensemble.module`). Optimiser: SGD with heavy-ball momentum as ``torch.optim.SGD``
applies it (buf ← μ·buf + g, w ← w − η·buf) on the mean loss of a batch of B examples drawn with replacement; B ≥ n
is full-batch GD.

1. **Batch sweep** (digits: B = 8 … 1438 = n, MNIST-1D with 4000 training examples: B = 16 … 4000 = n; both two
   orders of magnitude): a fixed budget of E passes (digits 60, MNIST-1D 300), i.e. round(E·n/B) steps, momentum
   0.9; the learning rate for each B is the one of {¼, ½, 1, 2, 4}·η₀·√(B/B₀) with the lowest final training loss
   (seed mean; the target is 100% training accuracy, so the lr is tuned on the training objective, never on the test
   set). 3 seeds.
2. **Initialisation scale** (digits, width 256): the first layer's initial weights multiplied by c ∈ {1, 5, 10, 20,
   50} (its init std scales by c), SGD with momentum 0.9 and B = 32, trained until the full training loss is
   ≤ 0.001 (checked after every pass) or a cap of 100 passes; per c the learning rate of a grid that reaches the
   target in the fewest passes (the largest c need smaller steps: the logits, and the curvature in the second
   layer, grow with c).

Expected (the committed run; see report.md): on digits the test accuracy falls with B, from 98.1% (B = 8) to 96.3%
(B = n), while the out-of-sample gradient norm grows monotonically, 0.51 → 1.19; on MNIST-1D the MLP memorises
(100% train, 61–63% test at every B ≥ 64) and only the smallest batch stands apart (66.2% test, norm 14.3 against
17.6–21.1); over the init scale c the test accuracy falls from 97.5–97.9% (c ≤ 10) to 96.0% (c = 50) while the
norm grows from 0.58–0.68 to 2.96 — the direction of the source's MNIST table (98.1% → 97.1%, 0.13 → 0.26).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from scalesgd.data import load_dataset  # noqa: E402
from scalesgd.ghost_norms import per_example_sq_norms  # noqa: E402
from scalesgd.models import build_model, loss_function  # noqa: E402

OUT = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)
log_line = functools.partial(print, flush=True)


@dataclass(frozen=True)
class SweepSpec:
    """One data set's batch sweep: the model width, the batches, the epoch budget and the lr grid's centre."""

    dataset: str
    n_train: int | None
    n_test: int | None
    width: int
    batches: tuple[int, ...]
    epochs: float
    base_lr: float  # η₀ at the smallest batch B₀; batch B's grid is lr_factors·η₀·√(B/B₀)
    momentum: float = 0.9
    lr_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class InitSpec:
    """The initialisation-scale experiment: scales, SGD batch, lr grid per scale, the loss target and its cap."""

    dataset: str = "digits"
    n_train: int | None = None
    n_test: int | None = None
    width: int = 256
    scales: tuple[float, ...] = (1.0, 5.0, 10.0, 20.0, 50.0)
    batch: int = 32
    lrs: dict[float, tuple[float, ...]] = field(default_factory=dict)
    target_loss: float = 1e-3
    max_epochs: int = 200
    momentum: float = 0.9


@dataclass(frozen=True)
class Settings:
    sweeps: tuple[SweepSpec, ...]
    init: InitSpec
    seeds: tuple[int, ...] = SEEDS


# --------------------------------------------------------------------------------------------------------
# K one-hidden-layer MLPs trained at once


class Ensemble:
    """K copies of the project's ``mlp(depth=1)`` (Flatten, Linear, ReLU, Linear), stacked for batched training.

    Copy k is ``build_model("mlp", depth=1, seed=seeds[k])`` with its first Linear's weight multiplied by
    ``init_scales[k]`` (so the first layer's init std is scaled by it; biases and the second layer as built).
    Weights are kept transposed for ``torch.baddbmm``: W1 (K, d, h), b1 (K, 1, h), W2 (K, h, o), b2 (K, 1, o).
    """

    def __init__(self, *, input_dim: int, num_outputs: int, width: int, seeds: list[int],
                 init_scales: list[float] | None = None):
        init_scales = init_scales or [1.0] * len(seeds)
        if len(init_scales) != len(seeds):
            raise ValueError(f"{len(seeds)} seeds but {len(init_scales)} init scales")
        self.input_dim, self.num_outputs, self.width = input_dim, num_outputs, width
        w1, b1, w2, b2 = [], [], [], []
        for seed, scale in zip(seeds, init_scales):
            m = self._template(seed)
            w1.append(m[1].weight.detach().T * scale)
            b1.append(m[1].bias.detach()[None, :])
            w2.append(m[3].weight.detach().T)
            b2.append(m[3].bias.detach()[None, :])
        self.params = [torch.stack(t).contiguous() for t in (w1, b1, w2, b2)]
        self.momentum_buf = [torch.zeros_like(p) for p in self.params]

    def _template(self, seed: int) -> nn.Module:
        return build_model("mlp", input_shape=(self.input_dim,), num_outputs=self.num_outputs, seed=seed,
                           width=self.width, depth=1)

    def __len__(self) -> int:
        return self.params[0].shape[0]

    def forward(self, x: torch.Tensor, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (K, B, o) for inputs (K, B, d) (each copy its own rows) or (B, d) (the same rows for all)."""
        w1, b1, w2, b2 = params or self.params
        if x.dim() == 2:
            x = x.expand(len(self), *x.shape)
        return torch.baddbmm(b2, torch.relu(torch.baddbmm(b1, x, w1)), w2)

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor, momentum: float) -> torch.Tensor:
        """One SGD step of every copy on its own batch (x (K, B, d), y (K, B)) with lr (K,); returns losses (K,).

        Each copy's loss is the mean cross-entropy over its B rows; the update is ``torch.optim.SGD``'s
        (buf ← μ·buf + g, w ← w − η·buf; buf = g on the first step, as there). A copy with lr 0 stays put.
        """
        params = [p.detach().requires_grad_() for p in self.params]
        logits = self.forward(x, params)
        losses = nn.functional.cross_entropy(logits.reshape(-1, self.num_outputs), y.reshape(-1),
                                             reduction="none").view(len(self), -1).mean(1)
        grads = torch.autograd.grad(losses.sum(), params)  # copies are independent: d(sum)/d(copy k) = its grad
        with torch.no_grad():
            for p, g, buf in zip(self.params, grads, self.momentum_buf):
                if momentum > 0:
                    buf.mul_(momentum).add_(g)
                    g = buf
                p.sub_(lr.view(-1, *[1] * (p.dim() - 1)) * g)
        return losses.detach()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss (K,) and accuracy (K,) of every copy on the rows (x (n, d), y (n,))."""
        loss_sum = torch.zeros(len(self), dtype=torch.float64)
        correct = torch.zeros(len(self), dtype=torch.float64)
        for s in range(0, len(x), chunk):
            logits = self.forward(x[s:s + chunk])
            yy = y[s:s + chunk].expand(len(self), -1)
            loss_sum += nn.functional.cross_entropy(logits.reshape(-1, self.num_outputs), yy.reshape(-1),
                                                    reduction="none").view(len(self), -1).double().sum(1)
            correct += (logits.argmax(-1) == yy).double().sum(1)
        return loss_sum / len(x), correct / len(x)

    def module(self, k: int) -> nn.Module:
        """Copy k as the project's ``mlp`` module (for the ghost norms)."""
        m = self._template(0)
        with torch.no_grad():
            m[1].weight.copy_(self.params[0][k].T)
            m[1].bias.copy_(self.params[1][k, 0])
            m[3].weight.copy_(self.params[2][k].T)
            m[3].bias.copy_(self.params[3][k, 0])
        return m


def sample_batches(n: int, k: int, batch: int, generator: torch.Generator) -> torch.Tensor | None:
    """Row indices (k, batch) drawn with replacement, or None for full-batch GD (batch ≥ n)."""
    if batch >= n:
        return None
    return torch.randint(n, (k, batch), generator=generator)


def train(ens: Ensemble, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor, *, batch: int, steps: int,
          momentum: float, generator: torch.Generator, target_loss: float | None = None,
          check_every: int = 0) -> torch.Tensor:
    """Train every copy for ``steps`` steps (or until its full training loss ≤ ``target_loss``, checked every
    ``check_every`` steps, when it is frozen). Returns the step at which each copy stopped (K,); a copy whose loss
    became non-finite is frozen with its lr set to 0 and counted as diverged by the caller."""
    lr = lr.clone()
    stopped = torch.full((len(ens),), steps, dtype=torch.long)
    n = len(x)
    for t in range(steps):
        idx = sample_batches(n, len(ens), batch, generator)
        if idx is None:
            xb, yb = x.expand(len(ens), *x.shape), y.expand(len(ens), -1)
        else:
            xb, yb = x[idx], y[idx]
        losses = ens.step(xb, yb, lr, momentum)
        bad = ~torch.isfinite(losses) & (lr > 0)
        if bad.any():
            lr[bad] = 0.0
            stopped[bad] = t
            for p in ens.params:
                p[bad] = 0.0
        if target_loss is not None and check_every and (t + 1) % check_every == 0:
            full_loss, _ = ens.evaluate(x, y)
            done = (full_loss <= target_loss) & (lr > 0)
            stopped[done] = t + 1
            lr[done] = 0.0
            if not (lr > 0).any():
                break
    return stopped


def grad_norm_stats(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the rows of ‖∇_w f(w; z)‖ (per-example cross-entropy, all parameters), by ghost norms."""
    sq = per_example_sq_norms(module, loss_function("classification", reduction="none"), x, y)
    return float(sq.clamp_min(0).sqrt().mean())


# --------------------------------------------------------------------------------------------------------
# The two experiments


def _load(dataset: str, n_train: int | None, n_test: int | None):
    ds = load_dataset(dataset, n_train=n_train, n_test=n_test)
    flat = lambda t: t.reshape(len(t), -1).float()  # noqa: E731
    return flat(ds.x_train), ds.y_train, flat(ds.x_test), ds.y_test, ds.num_outputs


def batch_sweep(spec: SweepSpec, seeds: tuple[int, ...], log=log_line) -> dict:
    """Every batch of ``spec`` with its lr grid × seeds; metrics of the lr with the lowest training loss."""
    x, y, xt, yt, k_out = _load(spec.dataset, spec.n_train, spec.n_test)
    n = len(x)
    rows = []
    for batch in spec.batches:
        b = min(batch, n)
        centre = spec.base_lr * math.sqrt(b / min(spec.batches))
        grid = [centre * f for f in spec.lr_factors]
        lrs = [lr for lr in grid for _ in seeds]
        ens = Ensemble(input_dim=x.shape[1], num_outputs=k_out, width=spec.width,
                       seeds=[s for _ in grid for s in seeds])
        steps = max(1, round(spec.epochs * n / b))
        gen = torch.Generator().manual_seed(1000 + b)
        t0 = time.perf_counter()
        stopped = train(ens, x, y, torch.tensor(lrs), batch=b, steps=steps, momentum=spec.momentum, generator=gen)
        train_loss, train_acc = ens.evaluate(x, y)
        test_loss, test_acc = ens.evaluate(xt, yt)
        per_lr = []
        for i, lr in enumerate(grid):
            ks = range(i * len(seeds), (i + 1) * len(seeds))
            ok = all(int(stopped[k]) == steps and math.isfinite(float(train_loss[k])) for k in ks)
            per_lr.append(dict(lr=lr, ok=ok, train_loss=[float(train_loss[k]) for k in ks]))
        usable = [i for i, r in enumerate(per_lr) if r["ok"]]
        if not usable:
            raise RuntimeError(f"{spec.dataset} B={b}: every lr of {grid} diverged; lower base_lr")
        best = min(usable, key=lambda i: np.mean(per_lr[i]["train_loss"]))
        ks = list(range(best * len(seeds), (best + 1) * len(seeds)))
        row = dict(batch=b, steps=steps, lr=grid[best], grid=grid, per_lr=per_lr,
                   train_acc=[float(train_acc[k]) for k in ks], train_loss=[float(train_loss[k]) for k in ks],
                   test_acc=[float(test_acc[k]) for k in ks], test_loss=[float(test_loss[k]) for k in ks],
                   test_grad=[grad_norm_stats(ens.module(k), xt, yt) for k in ks],
                   train_grad=[grad_norm_stats(ens.module(k), x, y) for k in ks],
                   seconds=time.perf_counter() - t0)
        rows.append(row)
        log(f"{spec.dataset} B={b}: lr {row['lr']:.3g}, train {np.mean(row['train_acc']):.4f}, test "
            f"{np.mean(row['test_acc']):.4f}, out-of-sample ‖∇f‖ {np.mean(row['test_grad']):.3f} "
            f"({row['seconds']:.0f} s)")
    return dict(spec=spec, n_train=n, n_test=len(xt), rows=rows)


def init_scale_sweep(spec: InitSpec, seeds: tuple[int, ...], log=log_line) -> dict:
    """Every init scale × its lr grid × seeds trained to the loss target; metrics of the fastest lr per scale."""
    x, y, xt, yt, k_out = _load(spec.dataset, spec.n_train, spec.n_test)
    n = len(x)
    combos = [(c, lr) for c in spec.scales for lr in spec.lrs[c]]
    ens = Ensemble(input_dim=x.shape[1], num_outputs=k_out, width=spec.width,
                   seeds=[s for _ in combos for s in seeds], init_scales=[c for c, _ in combos for _ in seeds])
    steps_per_epoch = max(1, round(n / spec.batch))
    t0 = time.perf_counter()
    stopped = train(ens, x, y, torch.tensor([lr for _, lr in combos for _ in seeds]), batch=spec.batch,
                    steps=spec.max_epochs * steps_per_epoch, momentum=spec.momentum,
                    generator=torch.Generator().manual_seed(7),
                    target_loss=spec.target_loss, check_every=steps_per_epoch)
    train_loss, train_acc = ens.evaluate(x, y)
    test_loss, test_acc = ens.evaluate(xt, yt)
    rows = []
    for c in spec.scales:
        cands = []
        for j, (cc, lr) in enumerate(combos):
            if cc != c:
                continue
            ks = list(range(j * len(seeds), (j + 1) * len(seeds)))
            reached = [float(train_loss[k]) <= spec.target_loss for k in ks]
            epochs = [int(stopped[k]) / steps_per_epoch for k in ks]
            cands.append(dict(lr=lr, ks=ks, all_reached=all(reached), epochs=epochs,
                              finite=all(math.isfinite(float(train_loss[k])) for k in ks)))
        # fastest lr among those reaching the target with every seed; else the lowest loss at the cap
        pick = [r for r in cands if r["all_reached"]]
        best = (min(pick, key=lambda r: np.mean(r["epochs"])) if pick else
                min([r for r in cands if r["finite"]], key=lambda r: np.mean([float(train_loss[k]) for k in r["ks"]])))
        ks = best["ks"]
        rows.append(dict(scale=c, lr=best["lr"], reached=best["all_reached"], epochs=best["epochs"],
                         grid=[r["lr"] for r in cands],
                         grid_epochs=[np.mean(r["epochs"]) if r["all_reached"] else math.nan for r in cands],
                         train_acc=[float(train_acc[k]) for k in ks], train_loss=[float(train_loss[k]) for k in ks],
                         test_acc=[float(test_acc[k]) for k in ks],
                         test_grad=[grad_norm_stats(ens.module(k), xt, yt) for k in ks],
                         train_grad=[grad_norm_stats(ens.module(k), x, y) for k in ks]))
        r = rows[-1]
        log(f"init scale {c:g}: lr {r['lr']:.3g}, {np.mean(r['epochs']):.0f} passes, "
            f"train {np.mean(r['train_acc']):.4f}, "
            f"test {np.mean(r['test_acc']):.4f}, out-of-sample ‖∇f‖ {np.mean(r['test_grad']):.3f}")
    return dict(spec=spec, n_train=n, n_test=len(xt), rows=rows, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------------
# Report


def _ms(values: list[float], fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    a = np.asarray(values, dtype=float) * scale
    sd = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{fmt.format(a.mean())} ± {fmt.format(sd)}"


def write_report(sweeps: list[dict], init: dict, out: Path, seconds: float, cpu_seconds: float,
                 seeds: tuple[int, ...]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for i, res in enumerate(sweeps):
        bs = [r["batch"] for r in res["rows"]]
        for ax, key, scale in ((axes[0], "test_acc", 100), (axes[1], "test_grad", 1), (axes[2], "train_acc", 100)):
            m = [np.mean(r[key]) * scale for r in res["rows"]]
            s = [np.std(r[key], ddof=1) * scale if len(r[key]) > 1 else 0 for r in res["rows"]]
            ax.errorbar(bs, m, yerr=s, fmt="o-", color=f"C{i}", capsize=2, ms=4, label=res["spec"].dataset)
    axes[0].set(xscale="log", xlabel="global batch B", ylabel="test accuracy (%)", title="Test accuracy")
    axes[1].set(xscale="log", xlabel="global batch B", ylabel="mean ‖∇f(w; z)‖ over test z",
                title="Out-of-sample gradient norm")
    axes[2].set(xscale="log", xlabel="global batch B", ylabel="training accuracy (%)", title="Training accuracy")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"Fixed epoch budget, lr tuned per B on the training loss; mean ± std over {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(out / "batch_sweep.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    cs = [r["scale"] for r in init["rows"]]
    for key, lab, c in (("train_acc", "train", "C0"), ("test_acc", "test", "C3")):
        axes[0].errorbar(cs, [100 * np.mean(r[key]) for r in init["rows"]],
                         yerr=[100 * np.std(r[key], ddof=1) if len(r[key]) > 1 else 0 for r in init["rows"]],
                         fmt="o-", color=c, capsize=2, ms=4, label=lab)
    axes[0].set(xscale="log", xlabel="first-layer init scale c", ylabel="accuracy (%)",
                title="Accuracy at training loss ≤ %g" % init["spec"].target_loss)
    axes[0].legend()
    axes[1].errorbar(cs, [np.mean(r["test_grad"]) for r in init["rows"]],
                     yerr=[np.std(r["test_grad"], ddof=1) if len(r["test_grad"]) > 1 else 0 for r in init["rows"]],
                     fmt="o-", color="C3", capsize=2, ms=4)
    axes[1].set(xscale="log", xlabel="first-layer init scale c", ylabel="mean ‖∇f(w; z)‖ over test z",
                title="Out-of-sample gradient norm")
    fig.tight_layout()
    fig.savefig(out / "init_scale.png", dpi=90)
    plt.close(fig)

    lines = ["# Large-batch generalisation and the initialisation scale: generated report", "",
             f"Generated by `experiments/generalization/generalization.py` in {seconds:.0f} s of wall time "
             f"({cpu_seconds:.0f} s of CPU, one thread); seeds {list(seeds)}, "
             "mean ± std. ‖∇f‖ is the mean over examples z of ‖∇_w f(w; z)‖ (per-example cross-entropy, all "
             "parameters) at the trained weights, by the project's ghost norms.", ""]
    for res in sweeps:
        sp = res["spec"]
        lines += [f"## Batch sweep: {sp.dataset}", "",
                  f"`mlp` with one hidden layer of {sp.width}, {res['n_train']} training / {res['n_test']} test "
                  f"examples, {sp.epochs:g} passes at every B, SGD momentum {sp.momentum}, lr from "
                  f"{{{', '.join(f'{f:g}' for f in sp.lr_factors)}}}·{sp.base_lr:g}·√(B/{min(sp.batches)}) with "
                  "the lowest final training loss (seed mean).", "",
                  "| B | steps | lr | train acc (%) | train loss | test acc (%) | test loss | out-of-sample ‖∇f‖ "
                  "| in-sample ‖∇f‖ | lr grid: train loss (seed mean) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            grid = ", ".join(f"{p['lr']:.3g}: {np.mean(p['train_loss']):.2g}" if p["ok"] else f"{p['lr']:.3g}: diverged"
                             for p in r["per_lr"])
            lines.append(f"| {r['batch']} | {r['steps']} | {r['lr']:.3g} | {_ms(r['train_acc'], '{:.2f}', 100)} | "
                         f"{_ms(r['train_loss'], '{:.2g}')} | {_ms(r['test_acc'], '{:.2f}', 100)} | "
                         f"{_ms(r['test_loss'], '{:.3f}')} | {_ms(r['test_grad'])} | {_ms(r['train_grad'], '{:.2g}')} "
                         f"| {grid} |")
        lines.append("")
    sp = init["spec"]
    lines += ["## Initialisation scale", "",
              f"{sp.dataset}, `mlp` with one hidden layer of {sp.width}; the first layer's initial weights × c; SGD "
              f"momentum {sp.momentum}, B = {sp.batch}, until the full training loss ≤ {sp.target_loss:g} (checked "
              f"after every pass; cap "
              f"{sp.max_epochs} passes); per c the lr of its grid reaching the target in the fewest passes.", "",
              "| c | lr | passes | reached | train acc (%) | train loss | test acc (%) | out-of-sample ‖∇f‖ "
              "| in-sample ‖∇f‖ | lr grid: passes (seed mean) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in init["rows"]:
        grid = ", ".join(f"{lr:.3g}: {e:.0f}" if math.isfinite(e) else f"{lr:.3g}: not reached"
                         for lr, e in zip(r["grid"], r["grid_epochs"]))
        lines.append(f"| {r['scale']:g} | {r['lr']:.3g} | {_ms(r['epochs'], '{:.0f}')} | "
                     f"{'yes' if r['reached'] else 'no (cap)'} | {_ms(r['train_acc'], '{:.2f}', 100)} | "
                     f"{_ms(r['train_loss'], '{:.2g}')} | {_ms(r['test_acc'], '{:.2f}', 100)} | "
                     f"{_ms(r['test_grad'])} | "
                     f"{_ms(r['train_grad'], '{:.2g}')} | {grid} |")
    lines += ["", "![batch sweep](batch_sweep.png)", "", "![init scale](init_scale.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


DEFAULT = Settings(
    sweeps=(SweepSpec("digits", None, None, width=128, batches=(8, 32, 128, 512, 1438), epochs=60, base_lr=0.04),
            SweepSpec("mnist1d", 4000, 1000, width=128, batches=(16, 64, 256, 1024, 4000), epochs=300, base_lr=0.04)),
    init=InitSpec(lrs={1.0: (0.1, 0.2, 0.4), 5.0: (0.1, 0.2, 0.4), 10.0: (0.1, 0.2, 0.4), 20.0: (0.05, 0.1, 0.2),
                       50.0: (0.01, 0.02, 0.05)}, max_epochs=100),
)


def main(settings: Settings = DEFAULT, out: Path = OUT) -> int:
    start, cpu_start = time.perf_counter(), time.process_time()
    threads = torch.get_num_threads()
    # One thread: the matrices are small, so a second thread buys little on an idle machine and costs many times
    # over on a shared one (its threads wait for each other).
    torch.set_num_threads(1)
    try:
        sweeps = [batch_sweep(spec, settings.seeds) for spec in settings.sweeps]
        init = init_scale_sweep(settings.init, settings.seeds)
    finally:
        torch.set_num_threads(threads)
    write_report(sweeps, init, out, time.perf_counter() - start, time.process_time() - cpu_start, settings.seeds)
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
