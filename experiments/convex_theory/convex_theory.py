"""Yin et al. 2018's theory checked on convex problems: speedup below B_S, the flat gain beyond it, the lower bound.

Command (from the repository root; about 1.5 minutes of CPU on one core, more wall time on a busy machine; writes
report.md and three PNGs beside this file)::

    .venv/bin/python experiments/convex_theory/convex_theory.py

Problems (linear models, the project's own data sets; B_S measured exactly at the initial weights with
:func:`scalesgd.diversity.gradient_diversity` on ``MODELS["logreg"]``):

* ``ls-d8``, ``ls-d64``: noiseless isotropic least squares, ``synthetic-linreg`` with d = 8 and 64, n = 8192. Its
  B_S is d + 2 at every w (make_synthetic_linreg's docstring), so d moves B_S.
* ``logreg-d20``: binary ``synthetic-logreg`` (d = 20, temperature 1), n = 4096, weight decay 1e-3.
* ``digits``: scikit-learn digits (1438 training images, 10 classes), logistic regression, weight decay 1e-3.

Minibatch SGD on the mean loss, B examples drawn with replacement, constant learning rate η, for B = 1, 2, 4, …,
1024; 3 seeds (the sampling; the initial weights are the model's seed-0 init); target: suboptimality
F(w) − F* ≤ ε·(F(w₀) − F*) with ε = 1e-8 (least squares: linear convergence, so many steps even at large B)
or 1e-2 (logistic: above the noise floor of constant-step SGD), F* from the normal equations or
from full-batch L-BFGS.

1. **The theory's step.** Serial SGD's step γ₁ is tuned (the fastest to the target on a √2 grid, seed-averaged);
   batch B then gets Yin et al.'s step γ₁/(1 + δ_B) on the summed gradient, δ_B = (B−1)/B_S, i.e. the mean-gradient
   learning rate η_B = B·γ₁/(1 + (B−1)/B_S) (:func:`scalesgd.theory.minibatch_lr`). The theory predicts iterations
   at most T_B = (1 + δ_B)·T₁/B: speedup T₁/T_B ≥ B/(1 + (B−1)/B_S), linear for B ≪ B_S, levelling off at B_S.
2. **The best step for each B** (a 2^(k/2) grid, k = −4…8, around η_B): gradient evaluations B·T_B to the target.
   The lower bound says they cannot stay flat beyond ~B_S; on isotropic least squares they rise.
3. **Contraction on isotropic least squares:** at η*(B) = B/(B + B_S − 1) the per-step contraction of
   E‖w − w*‖² is 1 − B/(B_S + B − 1) (:func:`scalesgd.theory.isotropic_ls_contraction`); measured as the mean of
   ‖w_{t+1} − w*‖²/‖w_t − w*‖² over 40 steps × 16 chains per seed.

Expected (the committed run; see report.md): below B_S the speedup T₁/T_B is within ~20% of B/(1 + δ_B) and the
gradient evaluations within ~1.1–1.5× serial (least squares: at or below 1 + δ_B at every B); beyond B_S the
speedup bends away from linear (B = 1024: 41×, 154×, 44×, 57× for the four problems), the measured contraction
on least squares is within 1% of 1 − B/(B_S + B − 1) up to B ≈ B_S and within ~15% beyond (finite n); at the best
step for each B the gradient evaluations rise beyond B_S (B = 1024: ~25×, ~7×, ~2.5×, ~12× serial's), least on
the noisy logistic problem, whose B_S grows along the path (33 at w₀, ~3·10⁵ at w*).

Reusable pieces: the problem set-up (:func:`make_problem`), the run-to-target loop over many (lr, seed) chains at
once (:func:`iterations_to_target`) and the contraction measurement (:func:`contraction`) live here; the formulas
they are compared with (:func:`scalesgd.theory.minibatch_lr`, :func:`scalesgd.theory.isotropic_ls_contraction`)
in the library.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from scalesgd.data import load_dataset  # noqa: E402
from scalesgd.diversity import gradient_diversity  # noqa: E402
from scalesgd.models import MODELS  # noqa: E402
from scalesgd.theory import isotropic_ls_contraction, minibatch_lr  # noqa: E402

OUT = Path(__file__).resolve().parent
BATCHES = [2 ** k for k in range(11)]  # 1 … 1024
SEEDS = [0, 1, 2]
SERIAL_GRID = 2.0 ** (np.arange(-8, 9) / 2)  # serial lr candidates, relative to 1/(B_S·β) (√2 apart)
BEST_GRID = 2.0 ** (np.arange(-4, 9) / 2)  # best-step search around the recipe's η_B: ×1/4 … ×16


@dataclass
class Problem:
    """A linear model's data in the form the batched SGD below wants (float64, bias as a constant feature)."""

    name: str
    x: torch.Tensor  # (n, p) with a column of ones
    y: torch.Tensor  # (n, K) targets (regression) or (n,) class indices
    task: str
    w0: torch.Tensor  # (p, K) the seed-0 init of MODELS["logreg"]
    weight_decay: float
    epsilon: float  # relative suboptimality target
    batch_bound: float = math.nan  # B_S at w0 (gradient_diversity)
    batch_bound_opt: float = math.nan  # B_S at w*
    beta: float = math.nan
    w_star: torch.Tensor | None = None
    h: torch.Tensor | None = None  # X̃ᵀX̃/n
    f_star: float = math.nan
    f0: float = math.nan

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        """F(w) for a stack of weights (C, p, K) → (C,): mean per-example loss + ½λ‖w‖²."""
        out = self.x @ w  # (C, n, K)
        if self.task == "regression":
            data = 0.5 * (out - self.y).pow(2).sum(-1).mean(-1)
        else:
            data = (torch.logsumexp(out, -1) - out.gather(-1, self.y.expand(w.shape[0], -1)[..., None])[..., 0]
                    ).mean(-1)
        return data + 0.5 * self.weight_decay * w.pow(2).sum((-2, -1))

    def suboptimality(self, w: torch.Tensor) -> torch.Tensor:
        """F(w) − F* for (C, p, K) → (C,); for least squares (no weight decay) the exact ½(w−w*)ᵀH(w−w*)."""
        if self.task == "regression" and self.weight_decay == 0:
            v = w - self.w_star
            return 0.5 * (v * (self.h @ v)).sum((1, 2))
        return self.loss(w) - self.f_star

    def grad(self, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Mean gradient over the sampled rows idx (C, B) for each chain's w (C, p, K) → (C, p, K)."""
        xb = self.x[idx]  # (C, B, p)
        out = xb @ w  # (C, B, K)
        if self.task == "regression":
            r = out - self.y[idx]
        else:
            r = torch.softmax(out, -1)
            r[torch.arange(idx.shape[0])[:, None], torch.arange(idx.shape[1])[None, :], self.y[idx]] -= 1.0
        return xb.transpose(1, 2) @ r / idx.shape[1] + self.weight_decay * w


def make_problem(name: str) -> Problem:
    """Load the data set with the project's loader, measure B_S with gradient_diversity, find w* and F*."""
    spec = {"ls-d8": ("synthetic-linreg", dict(dim=8, n_train=8192, noise=0.0), 0.0, 1e-8),
            "ls-d64": ("synthetic-linreg", dict(dim=64, n_train=8192, noise=0.0), 0.0, 1e-8),
            "logreg-d20": ("synthetic-logreg", dict(dim=20, n_train=4096, noise=1.0), 1e-3, 1e-2),
            "digits": ("digits", {}, 1e-3, 1e-2)}[name]
    ds = load_dataset(spec[0], **spec[1])
    torch.manual_seed(0)
    model = MODELS["logreg"](input_shape=ds.input_shape, num_outputs=ds.num_outputs)
    if ds.task == "regression":
        per_example = lambda out, y: 0.5 * (out - y).pow(2).sum(1)  # noqa: E731
    else:
        per_example = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    stats0 = gradient_diversity(model, per_example, ds.x_train, ds.y_train)
    x = torch.cat([ds.x_train.reshape(ds.n_train, -1).double(), torch.ones(ds.n_train, 1, dtype=torch.float64)], 1)
    lin = model[-1]
    w0 = torch.cat([lin.weight.detach().T, lin.bias.detach()[None, :]], 0).double()  # (p, K)
    y = ds.y_train.double() if ds.task == "regression" else ds.y_train
    prob = Problem(name, x, y, ds.task, w0, spec[2], spec[3], batch_bound=stats0.batch_bound)
    prob.h = x.T @ x / ds.n_train
    hi = float(np.linalg.eigvalsh(prob.h.numpy())[-1])
    prob.beta = hi if ds.task == "regression" else 0.5 * hi + prob.weight_decay
    if ds.task == "regression":
        w_star = torch.linalg.solve(x.T @ x / ds.n_train, x.T @ y / ds.n_train)
    else:  # full-batch L-BFGS to machine precision (the problem is λ-strongly convex)
        w_star = w0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([w_star], lr=1, max_iter=2000, tolerance_grad=1e-13, tolerance_change=1e-15,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            f = prob.loss(w_star[None])[0]
            f.backward()
            return f

        opt.step(closure)
        w_star = w_star.detach()
    prob.w_star = w_star
    prob.f_star = float(prob.loss(w_star[None])[0])
    prob.f0 = float(prob.loss(w0[None])[0]) - prob.f_star
    with torch.no_grad():  # B_S at the optimum, for the record (the data loss's gradients at w*)
        lin.weight.copy_(w_star[:-1].T.float())
        lin.bias.copy_(w_star[-1].float())
    prob.batch_bound_opt = gradient_diversity(model, per_example, ds.x_train, ds.y_train).batch_bound
    return prob


def iterations_to_target(prob: Problem, lrs: np.ndarray, batch: int, seeds: list[int], max_iters: int,
                         must_finish: int | None = None, slack: float = 3.0, every: int | None = None) -> np.ndarray:
    """Steps until F(w) − F* ≤ ε·(F(w₀) − F*) for every (lr, seed) chain, run together; inf if never.

    Returns an array (len(lrs), len(seeds)). The suboptimality is checked every step for least squares and
    every ``every`` steps for logistic regression (a full pass over the data costs n/B steps). Once some
    lr has reached the target on every seed, the chains still running are given ``slack`` times that lr's
    slowest seed and then recorded as not reached (they cannot be the best); the row ``must_finish`` is
    always run to the target or to ``max_iters``.
    """
    n = prob.x.shape[0]
    chains = len(lrs) * len(seeds)
    w = prob.w0.expand(chains, -1, -1).clone()
    lr = torch.tensor(np.repeat(lrs, len(seeds)), dtype=torch.float64)[:, None, None]
    gens = [torch.Generator().manual_seed(1000 * s + batch) for s in seeds]
    target = prob.epsilon * prob.f0
    hit = np.full(chains, np.inf)
    every = 1 if prob.task == "regression" or every is None else max(1, int(every))
    for t in range(1, max_iters + 1):
        idx = torch.cat([torch.randint(n, (len(lrs), batch), generator=g) for g in gens])  # (C, B), seed-major
        idx = idx.reshape(len(seeds), len(lrs), batch).transpose(0, 1).reshape(chains, batch)
        w = w - lr * prob.grad(w, idx)
        if t % every == 0:
            sub = prob.suboptimality(w).numpy()
            newly = (sub <= target) & np.isinf(hit)
            hit[newly] = t
            running = np.isinf(hit) & np.isfinite(sub) & (sub < 1e6 * prob.f0)
            rows = hit.reshape(len(lrs), len(seeds))
            done = np.isfinite(rows).all(1)
            if not running.any():
                break
            if done.any() and t > slack * rows[done].max(1).min():
                if must_finish is None or not running.reshape(len(lrs), len(seeds))[must_finish].any():
                    break
    return hit.reshape(len(lrs), len(seeds))


def contraction(prob: Problem, batch: int, seeds: list[int], steps: int = 40, chains: int = 16) -> np.ndarray:
    """Mean per-step ratio ‖w_{t+1} − w*‖²/‖w_t − w*‖² at η*(B) = B/(B + B_S − 1), one value per seed."""
    n = prob.x.shape[0]
    eta = batch / (batch + prob.batch_bound - 1)
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(7919 * s + batch)
        # Noiseless least squares: the step maps v = w − w* linearly, v' = v − η·X_bᵀX_b v/B, so follow v itself
        # and rescale it to unit norm after each step (the ratio is scale-free; without rescaling a fast
        # contraction reaches float64's floor within the 40 steps).
        v = prob.w0 - prob.w_star
        v = (v / v.norm()).expand(chains, -1, -1).clone()  # (C, p, K)
        ratios = []
        for _ in range(steps):
            xb = prob.x[torch.randint(n, (chains, batch), generator=g)]  # (C, B, p)
            v = v - eta * xb.transpose(1, 2) @ (xb @ v) / batch
            sq = v.pow(2).sum((1, 2))
            ratios.append(sq)
            v = v / sq.sqrt()[:, None, None]
        out.append(float(torch.stack(ratios).mean()))
    return np.array(out)


def study(prob: Problem) -> dict:
    """Tune serial SGD, run the recipe and the best step for every B, and (least squares) the contraction."""
    bs = prob.batch_bound
    base = 1.0 / (bs * prob.beta)
    serial_lrs = base * SERIAL_GRID
    # max_iters: far more than the best serial step needs, so only too-small steps run out
    cap = 200_000
    serial = iterations_to_target(prob, serial_lrs, 1, SEEDS, cap, every=prob.x.shape[0] // 16)
    mean = serial.mean(1)
    gamma1 = float(serial_lrs[int(np.argmin(mean))])
    t_tuned = serial[int(np.argmin(mean))]
    res = {"gamma1": gamma1, "t_tuned": t_tuned, "rows": []}
    mid = int(np.flatnonzero(BEST_GRID == 1.0)[0])  # grid factor 1: the recipe's own step
    for b in BATCHES:
        eta_b = minibatch_lr(gamma1, b, bs)
        lrs = eta_b * BEST_GRID
        t_pred = float(t_tuned.mean()) * (1 + (b - 1) / bs) / b
        runs = iterations_to_target(prob, lrs, b, SEEDS, int(20 * t_pred) + 200, must_finish=mid,
                                    every=max(1, t_pred / 60))
        recipe = runs[mid]
        best_k = int(np.argmin(runs.mean(1)))
        row = {"B": b, "lr": eta_b, "iters": recipe, "pred_speedup": b / (1 + (b - 1) / bs),
               "best_lr": float(lrs[best_k]), "best_iters": runs[best_k], "best_at_edge": best_k in (0, len(lrs) - 1)}
        if prob.task == "regression":
            row["contraction"] = contraction(prob, b, SEEDS)
            row["pred_contraction"] = isotropic_ls_contraction(b, bs)
        res["rows"].append(row)
    res["t1"] = res["rows"][0]["iters"]  # the recipe at B = 1 is serial SGD at γ₁: the baseline of every ratio
    return res


def _ms(a: np.ndarray, fmt: str = "{:.0f}") -> str:
    a = np.asarray(a, dtype=float)
    if not np.all(np.isfinite(a)):
        return "not reached (" + ", ".join("∞" if not np.isfinite(v) else fmt.format(v) for v in a) + ")"
    return f"{fmt.format(a.mean())} ± {fmt.format(a.std(ddof=1))}"


def write_report(problems: list[Problem], results: dict[str, dict], seconds: float) -> None:
    colors = {"ls-d8": "C0", "ls-d64": "C1", "logreg-d20": "C2", "digits": "C3"}
    # (a) speedup at the theory's step
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for p in problems:
        rows = results[p.name]["rows"]
        t1 = results[p.name]["t1"]
        b = np.array([r["B"] for r in rows])
        sp = np.array([t1 / r["iters"] for r in rows])  # (len(B), seeds): per-seed speedup
        ax.errorbar(b, sp.mean(1), yerr=sp.std(1, ddof=1), fmt="o-", color=colors[p.name], ms=4, capsize=2,
                    label=f"{p.name} (B_S = {p.batch_bound:.1f})")
        ax.plot(b, [r["pred_speedup"] for r in rows], "--", color=colors[p.name], lw=1)
        ax.axvline(p.batch_bound, color=colors[p.name], lw=0.6, ls=":")
    ax.plot([1, 1024], [1, 1024], color="0.6", lw=0.8, label="linear speedup")
    ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="speedup  T(1) / T(B)  (iterations)",
           title="Speedup at Yin et al.'s step; dashed: B / (1 + (B-1)/B_S)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "speedup.png", dpi=90)
    plt.close(fig)
    # (b) gradient evaluations at the best step for each B
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for p in problems:
        rows = results[p.name]["rows"]
        b = np.array([r["B"] for r in rows])
        ev = np.array([r["B"] * r["best_iters"] for r in rows]) / float(np.mean(results[p.name]["t1"]))
        ax.errorbar(b, ev.mean(1), yerr=ev.std(1, ddof=1), fmt="o-", color=colors[p.name], ms=4, capsize=2,
                    label=p.name)
        ax.axvline(p.batch_bound, color=colors[p.name], lw=0.6, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="batch size B",
           ylabel="gradient evaluations to target / serial's",
           title="Best step for each B: gradient evaluations (dotted: B_S)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "evals_best_step.png", dpi=90)
    plt.close(fig)
    # (c) contraction on isotropic least squares
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for p in problems:
        if p.task != "regression":
            continue
        rows = results[p.name]["rows"]
        b = np.array([r["B"] for r in rows])
        c = np.array([r["contraction"] for r in rows])
        ax.errorbar(b, 1 - c.mean(1), yerr=c.std(1, ddof=1), fmt="o", color=colors[p.name], ms=5, capsize=2,
                    label=f"{p.name} measured")
        bb = np.logspace(0, np.log10(1024), 200)
        ax.plot(bb, 1 - isotropic_ls_contraction(bb, p.batch_bound), "-", color=colors[p.name], lw=1,
                label=f"{p.name}: B/(B_S+B-1), B_S = {p.batch_bound:.1f}")
    ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="1 − contraction of E|w − w*|² per step",
           title="Isotropic least squares at η*(B) = B/(B+B_S−1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "contraction.png", dpi=90)
    plt.close(fig)

    lines = ["# Yin et al.'s theory on convex problems: generated report", "",
             f"Generated by `experiments/convex_theory/convex_theory.py` in {seconds:.0f} s (3 seeds each; "
             "mean ± std over seeds). See the script's docstring for the set-up.", "",
             "| problem | n | B_S at w₀ (gradient_diversity) | B_S at w* (least squares: float32 labels' residual) | β | target ε·(F(w₀)−F*) | serial lr γ₁ (tuned) "
             "| serial iterations T₁ |", "|---|---|---|---|---|---|---|---|"]
    for p in problems:
        r = results[p.name]
        opt = "∞ (interpolates)" if not math.isfinite(p.batch_bound_opt) or p.batch_bound_opt > 1e6 else f"{p.batch_bound_opt:.1f}"
        lines.append(f"| {p.name} | {p.x.shape[0]} | {p.batch_bound:.2f} | {opt} | {p.beta:.3g} | "
                     f"{p.epsilon:g}·{p.f0:.3g} | {r['gamma1']:.4g} | {_ms(r['t1'])} |")
    lines += ["", "![speedup](speedup.png)", "![evals](evals_best_step.png)", "![contraction](contraction.png)", ""]
    for p in problems:
        r = results[p.name]
        t1 = r["t1"]
        lines += [f"## {p.name}  (B_S = {p.batch_bound:.2f})", "",
                  "| B | lr η_B = Bγ₁/(1+(B−1)/B_S) | iterations T_B | speedup T₁/T_B | predicted B/(1+δ_B) "
                  "| evals B·T_B / T₁ | predicted 1+δ_B | best lr | best-step evals / T₁ |"
                  + (" contraction measured | predicted 1−B/(B_S+B−1) |" if p.task == "regression" else ""),
                  "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if p.task == "regression" else "")]
        for row in r["rows"]:
            b = row["B"]
            sp = t1 / row["iters"]
            ev = b * row["iters"] / t1.mean()
            bev = b * row["best_iters"] / t1.mean()
            edge = " (grid edge)" if row["best_at_edge"] else ""
            line = (f"| {b} | {row['lr']:.4g} | {_ms(row['iters'])} | {_ms(sp, '{:.2f}')} | "
                    f"{row['pred_speedup']:.2f} | {_ms(ev, '{:.2f}')} | {1 + (b - 1) / p.batch_bound:.2f} | "
                    f"{row['best_lr']:.4g}{edge} | {_ms(bev, '{:.2f}')} |")
            if p.task == "regression":
                line += f" {_ms(row['contraction'], '{:.4f}')} | {row['pred_contraction']:.4f} |"
            lines.append(line)
        lines.append("")
    (OUT / "report.md").write_text("\n".join(lines))


def main() -> int:
    torch.set_num_threads(1)
    start = time.perf_counter()
    names = sys.argv[1:] or ["ls-d8", "ls-d64", "logreg-d20", "digits"]
    problems, results = [], {}
    for name in names:
        t = time.perf_counter()
        p = make_problem(name)
        results[name] = study(p)
        problems.append(p)
        print(f"{name}: B_S {p.batch_bound:.2f}, serial lr {results[name]['gamma1']:.4g}, "
              f"T1 {results[name]['t1'].mean():.0f}, {time.perf_counter() - t:.0f} s", flush=True)
    write_report(problems, results, time.perf_counter() - start)
    print(f"report: {OUT / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
