"""The convergence table of Yin et al. 2018 with numbers: serial SGD against minibatch SGD below the diversity bound.

Yin, Pananjady, Lam, Papailiopoulos, Ramchandran & Bartlett, "Gradient diversity: a key ingredient for
scalable distributed learning" (AISTATS 2018, arXiv 1706.05699), REFERENCES §3. For n per-example losses fᵢ,
F = (1/n)Σᵢfᵢ, per-example gradients gᵢ = ∇fᵢ(w), M2 = (1/n)Σᵢ‖gᵢ‖² and B_S = M2/‖∇F‖² = n·Δ_S, sampling B
examples with replacement gives

    E‖Σ_{ℓ≤B} g_{sℓ}‖² = B·M2·(1 + (B−1)/B_S) = B·M2·(1 + δ_B),   δ_B = (B−1)/B_S.

Minibatch SGD in the paper's form, w ← w − γ_B·Σ_{ℓ≤B} g_{sℓ} (step γ_B on the *summed* gradient; the usual
learning rate of the mean gradient is η_B = B·γ_B), therefore sees a "gradient" of mean B·∇F and second moment
B·M2·(1+δ_B). Put into each serial rate below, with γ_B = γ(ε)/(1+δ_B) every recursion becomes the serial one
run B/(1+δ_B) times faster: T_B = (1+δ_B)·T₁/B iterations, i.e. (1+δ_B)·T₁ gradient evaluations, at most
(1+δ)·T₁ whenever B ≤ δ·B_S + 1 — no loss of sample efficiency below the bound; beyond it δ_B grows with B and
the iterations level off at about T₁/B_S: the linear speedup ends near B = δ·B_S + 1.

The serial rates (bounded second moment E‖g‖² ≤ M2 along the path; constant step; T₁ = gradient evaluations;
every one follows from the one-step recursion shown, with the step chosen so the noise term is ε/2):

* µ-strongly convex, target E‖w_T − w*‖² ≤ ε, D0 = ‖w₀ − w*‖² (the paper writes this row "β-strongly convex"):
  e_{t+1} ≤ (1 − 2γµ)e_t + γ²M2 (Nemirovski, Juditsky, Lan & Shapiro 2009, SIAM J. Optim., eq. 2.8's
  recursion; constant-step form as in Bottou, Curtis & Nocedal 2018, SIAM Review, Thm 4.6). Step
  γ = µε/M2, T₁ = M2/(2µ²ε)·ln(2·D0/ε). Needs 2γµ ≤ 1.
* convex, target E F(w̄_T) − F* ≤ ε for the averaged iterate, D0 = ‖w₀ − w*‖²:
  F(w̄_T) − F* ≤ D0/(2γT) + γ·M2/2 (Nemirovski et al. 2009, §2.2; Bubeck 2015, Thm 6.1). Step γ = ε/M2,
  T₁ = M2·D0/ε².
* β-smooth (nonconvex), target min_{t<T} E‖∇F(w_t)‖² ≤ ε, F0 = F(w₀) − F*:
  (1/T)Σ_t E‖∇F(w_t)‖² ≤ F0/(γT) + β·γ·M2/2 (Ghadimi & Lan 2013, SIAM J. Optim., Thm 2.1; Bottou et al.
  2018, Thm 4.10). Step γ = ε/(β·M2), T₁ = 2·β·M2·F0/ε².
* β-smooth µ-PL (‖∇F‖² ≥ 2µ(F − F*)), target E F(w_T) − F* ≤ ε, F0 = F(w₀) − F*:
  r_{t+1} ≤ (1 − 2γµ)r_t + β·γ²·M2/2 (Karimi, Nutini & Schmidt 2016, ECML, Thm 4). Step γ = 2µε/(β·M2),
  T₁ = β·M2/(4µ²ε)·ln(2·F0/ε). Needs 2γµ ≤ 1.

For the two contraction rows the minibatch recursion also needs 2µ·B·γ_B ≤ 1; a row that breaks it says so.

The constants are given, or estimated from a data set and a model with the project's own tools
(:func:`estimate_constants`): M2, ‖∇F‖² and B_S exactly over the training set at the initial weights
(:func:`scalesgd.diversity.gradient_diversity`; the theory wants bounds along the whole path, so these are
estimates, labelled as such); β and µ of a linear model from the eigenvalues of the second-moment matrix of the
inputs with a constant feature for the bias; D0 and F0 of least squares from its exact minimiser, F0 of other
models from the initial loss minus the loss's lower bound 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from scalesgd.errors import ConfigError

ROWS = ("strongly-convex", "convex", "smooth", "smooth-pl")

ROW_TITLES = {
    "strongly-convex": "µ-strongly convex",
    "convex": "convex",
    "smooth": "β-smooth (nonconvex)",
    "smooth-pl": "β-smooth µ-PL",
}

ROW_TARGETS = {
    "strongly-convex": "E|w-w*|^2 <= eps",
    "convex": "E F(w_avg)-F* <= eps",
    "smooth": "min E|grad F|^2 <= eps",
    "smooth-pl": "E F(w)-F* <= eps",
}

ROW_SOURCES = {
    "strongly-convex": "Nemirovski et al. 2009; Bottou, Curtis & Nocedal 2018 Thm 4.6",
    "convex": "Nemirovski et al. 2009 §2.2; Bubeck 2015 Thm 6.1",
    "smooth": "Ghadimi & Lan 2013 Thm 2.1; Bottou et al. 2018 Thm 4.10",
    "smooth-pl": "Karimi, Nutini & Schmidt 2016 Thm 4",
}

# The constants each row needs (besides epsilon).
ROW_NEEDS = {
    "strongly-convex": ("m2", "mu", "d0"),
    "convex": ("m2", "d0"),
    "smooth": ("m2", "beta", "f0"),
    "smooth-pl": ("m2", "beta", "mu", "f0"),
}

OPTION = {"m2": "--m2", "batch_bound": "--batch-bound", "beta": "--beta", "mu": "--mu", "d0": "--d0",
          "f0": "--f0", "epsilon": "--epsilon", "delta": "--delta", "batch": "--batch"}


@dataclass(frozen=True)
class Constant:
    """A constant of the theory and how it was obtained ("given", "estimated: ...", "not computable ...")."""

    value: float | None
    how: str


@dataclass(frozen=True)
class Rate:
    """Step size and cost of one algorithm on one row.

    Attributes:
        step: γ, the step on the summed gradient (for serial SGD, the step on the one example's gradient).
        lr: η = B·γ, the learning rate of the *mean* gradient of the batch (the trainer's ``--lr``).
        iterations: T, steps to reach the row's target.
        grad_evals: B·T, per-example gradient evaluations (sample complexity).
        valid: False when the step breaks the recursion's condition (2µ·B·γ ≤ 1 for the contraction rows).
    """

    step: float
    lr: float
    iterations: float
    grad_evals: float
    valid: bool = True


@dataclass(frozen=True)
class TableRow:
    """One row of the table: serial and minibatch rates, or the constants it misses."""

    row: str
    serial: Rate | None
    minibatch: Rate | None
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class Theory:
    """The constants (with how each was obtained), the batch, and the table."""

    constants: dict[str, Constant]
    batch: int | None
    speedup_end: float | None  # δ·B_S + 1
    rows: tuple[TableRow, ...] = field(default=())

    def text(self) -> str:
        """The table as printed by ``scalesgd theory``."""
        return format_theory(self)


# ---------------------------------------------------------------------------------------------------------
# Formulas


def second_moment_factor(batch: int | float, batch_bound: float) -> float:
    """1 + δ_B = 1 + (B−1)/B_S: E‖Σ_{ℓ≤B} g‖² = B·M2·(1 + δ_B) (Yin et al. 2018; REFERENCES §3)."""
    return 1.0 + (batch - 1.0) / batch_bound


def minibatch_lr(serial_step: float, batch: int | float, batch_bound: float) -> float:
    """Learning rate of the mean gradient that Yin et al.'s recipe gives batch B: η_B = B·γ/(1 + (B−1)/B_S).

    Args:
        serial_step: γ, the serial step (on one example's gradient) that reaches the target.
        batch: B. batch_bound: B_S = M2/‖∇F‖².
    Returns:
        η_B; it is B·γ (linear scaling) for B ≪ B_S and levels off at γ·B_S for B ≫ B_S.
    """
    return batch * serial_step / second_moment_factor(batch, batch_bound)


def isotropic_ls_contraction(batch: int | float, batch_bound: float) -> float:
    """Best per-step contraction of E‖w − w*‖² for noiseless isotropic least squares: 1 − B/(B_S + B − 1).

    For fᵢ(w) = ½(xᵢ·w − yᵢ)², x ~ N(0, I_d), y = x·w*: E‖w' − w*‖² = (1 − 2η + η²(1 + (d+1)/B))‖w − w*‖²
    for the mean-gradient step η; at its best η = B/(B + d + 1) this is 1 − B/(B + d + 1), and B_S = d + 2
    (:func:`scalesgd.data.make_synthetic_linreg`), which is Yin et al.'s lower-bound example (REFERENCES §3):
    linear speedup up to B_S, marginal beyond.
    """
    return 1.0 - batch / (batch_bound + batch - 1.0)


def serial_rate(row: str, *, m2: float, epsilon: float, beta: float | None = None, mu: float | None = None,
                d0: float | None = None, f0: float | None = None) -> Rate:
    """Step and gradient evaluations of serial SGD on ``row`` (formulas in the module docstring).

    Args:
        row: one of :data:`ROWS`.
        m2: bound on E‖gᵢ‖². epsilon: the row's target. beta: smoothness. mu: strong convexity / PL constant.
        d0: ‖w₀ − w*‖² (convex rows). f0: F(w₀) − F* (smooth rows).
    Returns:
        :class:`Rate` with B = 1 (step = lr, iterations = grad_evals).
    """
    if row == "strongly-convex":
        step = mu * epsilon / m2
        t = m2 / (2 * mu * mu * epsilon) * math.log(max(2 * d0 / epsilon, 1.0))
        valid = 2 * step * mu <= 1
    elif row == "convex":
        step = epsilon / m2
        t = m2 * d0 / epsilon ** 2
        valid = True
    elif row == "smooth":
        step = epsilon / (beta * m2)
        t = 2 * beta * m2 * f0 / epsilon ** 2
        valid = True
    elif row == "smooth-pl":
        step = 2 * mu * epsilon / (beta * m2)
        t = beta * m2 / (4 * mu * mu * epsilon) * math.log(max(2 * f0 / epsilon, 1.0))
        valid = 2 * step * mu <= 1
    else:
        raise ConfigError(f"unknown row {row!r}; choose one of {', '.join(ROWS)}")
    return Rate(step=step, lr=step, iterations=t, grad_evals=t, valid=valid)


def minibatch_rate(row: str, serial: Rate, *, batch: int, batch_bound: float, mu: float | None = None) -> Rate:
    """Minibatch SGD with step γ/(1 + δ_B) on the summed gradient: (1 + δ_B)·T₁/B iterations (Yin et al. 2018).

    Args:
        row: the row of ``serial``. serial: :func:`serial_rate`'s result. batch: B ≥ 1.
        batch_bound: B_S. mu: for the contraction rows' condition 2µ·B·γ_B ≤ 1.
    Returns:
        :class:`Rate`; grad_evals = (1 + δ_B)·T₁ ≤ (1 + δ)·T₁ when B ≤ δ·B_S + 1.
    """
    factor = second_moment_factor(batch, batch_bound)
    step = serial.step / factor
    t = factor * serial.iterations / batch
    valid = serial.valid
    if row in ("strongly-convex", "smooth-pl"):
        valid = valid and 2 * mu * batch * step <= 1
    return Rate(step=step, lr=batch * step, iterations=t, grad_evals=batch * t, valid=valid)


def speedup_end(delta: float, batch_bound: float) -> float:
    """δ·B_S + 1: the largest batch whose gradient evaluations stay within (1 + δ)× serial SGD's."""
    return delta * batch_bound + 1.0


# ---------------------------------------------------------------------------------------------------------
# Checking and assembling the constants


_POSITIVE = ("m2", "beta", "mu", "d0", "f0", "epsilon")


def check_constant(name: str, value: float | None) -> None:
    """Raise :class:`ConfigError` (one line, with the fix) for a constant that is nan, infinite or out of range."""
    if value is None:
        return
    option = OPTION.get(name, name)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{option} must be a finite number, got {value!r}; pass {option} 0.5, say")
    if name in _POSITIVE and value <= 0:
        raise ConfigError(f"{option} must be > 0, got {value!r}; pass {option} 0.5, say")
    if name == "delta" and value < 0:
        raise ConfigError(f"--delta must be >= 0 (B <= delta*B_S + 1), got {value!r}; pass --delta 1, say")
    if name == "batch_bound" and value < 1:
        raise ConfigError(f"--batch-bound must be >= 1 (B_S = n*Delta >= 1), got {value!r}; pass --batch-bound 50, say")
    if name == "batch" and (value < 1 or value != int(value)):
        raise ConfigError(f"--batch must be a positive integer, got {value!r}; pass --batch 64, say")


def build_theory(constants: dict[str, Constant], *, batch: int | None = None) -> Theory:
    """The table for the given constants (missing ones leave the rows that need them empty).

    Args:
        constants: keys of :data:`OPTION` (except ``batch``) → :class:`Constant`; absent or value None means
            not known. ``epsilon`` is required; ``delta`` defaults to 1.
        batch: B of the minibatch column; None takes ⌊δ·B_S⌋ + 1, the largest batch within the bound.
    Returns:
        :class:`Theory`. Raises :class:`ConfigError` for a bad constant, µ > β, or no epsilon.
    """
    for name, c in constants.items():
        check_constant(name, c.value)
    check_constant("batch", batch)
    val = {name: c.value for name, c in constants.items()}
    if val.get("epsilon") is None:
        raise ConfigError("the target --epsilon is required; pass --epsilon 0.01, say")
    if val.get("delta") is None:
        constants = {**constants, "delta": Constant(1.0, "default")}
        val["delta"] = 1.0
    beta, mu = val.get("beta"), val.get("mu")
    if beta is not None and mu is not None and mu > beta:
        raise ConfigError(f"mu ({mu:g}) cannot exceed beta ({beta:g}): a function's strong convexity/PL constant "
                          "is at most its smoothness; check --mu and --beta")
    bound = val.get("batch_bound")
    end = speedup_end(val["delta"], bound) if bound is not None else None
    if batch is None and end is not None:
        batch = int(math.floor(end + 1e-9))
    rows = []
    for row in ROWS:
        missing = tuple(k for k in ROW_NEEDS[row] if val.get(k) is None)
        if missing:
            rows.append(TableRow(row, None, None, missing))
            continue
        serial = serial_rate(row, m2=val["m2"], epsilon=val["epsilon"], beta=beta, mu=mu, d0=val.get("d0"),
                             f0=val.get("f0"))
        mini = (minibatch_rate(row, serial, batch=batch, batch_bound=bound, mu=mu)
                if bound is not None and batch is not None else None)
        rows.append(TableRow(row, serial, mini, () if mini is not None else ("batch_bound",)))
    return Theory(constants=dict(constants), batch=batch, speedup_end=end, rows=tuple(rows))


# ---------------------------------------------------------------------------------------------------------
# Estimating the constants from a data set and a model


def _loss(task: str):
    """Per-example loss (B,) of the trainer's convention: cross-entropy, or ½‖out − y‖² for regression."""
    import torch.nn.functional as F

    if task == "classification":
        return lambda out, y: F.cross_entropy(out, y, reduction="none")
    return lambda out, y: 0.5 * (out - y).pow(2).reshape(out.shape[0], -1).sum(1)


def second_moment_eigenvalues(x: np.ndarray) -> tuple[float, float]:
    """Smallest and largest eigenvalue of X̃ᵀX̃/n, X̃ = [X, 1] (a constant feature for the bias); float64.

    Args:
        x: (n, d) inputs (flattened).
    Returns:
        (λ_min, λ_max) of the (d+1)×(d+1) matrix, by ``numpy.linalg.eigvalsh``.
    """
    xt = np.concatenate([np.asarray(x, dtype=np.float64), np.ones((x.shape[0], 1))], axis=1)
    eig = np.linalg.eigvalsh(xt.T @ xt / xt.shape[0])
    return float(eig[0]), float(eig[-1])


def estimate_constants(dataset: str, model: str, *, n_train: int | None = None, data_seed: int | None = None,
                       dim: int | None = None, noise: float | None = None, seed: int = 0,
                       weight_decay: float = 0.0) -> dict[str, Constant]:
    """Estimate M2, B_S, β, µ, D0 and F0 for ``model`` on ``dataset`` at the model's initial weights.

    * M2, ‖∇F‖², B_S: exact over the training set at the initial weights (seeded by ``seed``) with
      :func:`scalesgd.diversity.gradient_diversity`, of the data loss (weight decay's λw not included).
    * β, µ (``logreg`` only, where the loss is a function of X̃w): least squares has Hessian X̃ᵀX̃/n ⊗ I,
      so β = λ_max + λ_wd and µ = λ_min + λ_wd. Softmax cross-entropy has Hessian (diag p − ppᵀ) ⊗ x̃x̃ᵀ
      and diag p − ppᵀ ⪯ ½I (Böhning 1992; ¼ for a single sigmoid output), so β = ½λ_max + λ_wd; its
      only global strong convexity is the weight decay's, µ = λ_wd. Other models: not computable.
    * D0 = ‖w₀ − w*‖² and F0 = F(w₀) − F* (with F including ½λ_wd‖w‖²) exactly for least squares with a
      linear model (w* by ``numpy.linalg.solve`` of the normal equations); otherwise F0 ≤ F(w₀) − 0, the
      loss's lower bound, and D0 not computable.

    Args:
        dataset, n_train, data_seed, dim, noise: as :func:`scalesgd.data.load_dataset`.
        model: a key of :data:`scalesgd.models.MODELS`. seed: the initialisation seed.
        weight_decay: λ_wd ≥ 0 of F + ½λ_wd‖w‖².
    Returns:
        dict of :class:`Constant` with keys m2, grad_sq_norm, batch_bound, beta, mu, d0, f0.
    """
    import torch

    from scalesgd.data import load_dataset
    from scalesgd.diversity import gradient_diversity
    from scalesgd.models import MODELS

    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(sorted(MODELS))}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"--weight-decay must be a finite number >= 0, got {weight_decay!r}")
    options = {k: v for k, v in (("n_train", n_train), ("seed", data_seed), ("dim", dim), ("noise", noise))
               if v is not None}
    ds = load_dataset(dataset, **options)
    torch.manual_seed(seed)
    net = MODELS[model](input_shape=ds.input_shape, num_outputs=ds.num_outputs)
    loss = _loss(ds.task)
    stats = gradient_diversity(net, loss, ds.x_train, ds.y_train)
    at_init = f"estimated: exact over the {ds.n_train} training examples at the initial weights (seed {seed})"
    wd_note = " (data loss; weight decay's term not included)" if weight_decay else ""
    out = {"m2": Constant(stats.m2, at_init + wd_note),
           "grad_sq_norm": Constant(stats.mean_grad_sq_norm, at_init + wd_note),
           "batch_bound": Constant(stats.batch_bound, at_init + wd_note)}
    wd_text = f" + weight decay {weight_decay:g}" if weight_decay else ""
    with torch.no_grad():
        f_init = float(loss(net(ds.x_train), ds.y_train).double().mean())
        w0_sq = float(sum(p.double().square().sum() for p in net.parameters()))
    f_init += 0.5 * weight_decay * w0_sq
    if model == "logreg":
        x = ds.x_train.reshape(ds.n_train, -1).double().numpy()
        lo, hi = second_moment_eigenvalues(x)
        if ds.task == "regression":
            out["beta"] = Constant(hi + weight_decay, f"estimated: largest eigenvalue of X~'X~/n{wd_text}")
            out["mu"] = Constant(lo + weight_decay, f"estimated: smallest eigenvalue of X~'X~/n{wd_text}")
            xt = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
            y = ds.y_train.double().numpy().reshape(ds.n_train, -1)
            w_star = np.linalg.solve(xt.T @ xt / len(xt) + weight_decay * np.eye(xt.shape[1]), xt.T @ y / len(xt))
            lin = net[-1]
            w0 = np.concatenate([lin.weight.detach().double().numpy().T,
                                 lin.bias.detach().double().numpy()[None, :]], axis=0)  # (d+1, K)
            f_star = float(0.5 * np.mean(np.sum((xt @ w_star - y) ** 2, axis=1))
                           + 0.5 * weight_decay * np.sum(w_star ** 2))
            out["d0"] = Constant(float(np.sum((w0 - w_star) ** 2)),
                                 "estimated: |w0 - w*|^2 with w* from the normal equations")
            out["f0"] = Constant(f_init - f_star, "estimated: F(w0) - F(w*) with w* from the normal equations")
        else:
            out["beta"] = Constant(0.5 * hi + weight_decay,
                                   f"estimated: 1/2 x largest eigenvalue of X~'X~/n (softmax bound){wd_text}")
            out["mu"] = (Constant(weight_decay, "estimated: the weight decay (cross-entropy adds no global "
                                  "strong convexity)") if weight_decay
                         else Constant(None, "not computable for this model: give --mu (or --weight-decay)"))
            out["d0"] = Constant(None, "not computable for this model: give --d0")
            out["f0"] = Constant(f_init, "estimated upper bound: initial loss - 0 (cross-entropy >= 0)")
    else:
        out["beta"] = Constant(None, "not computable for this model: give --beta")
        out["mu"] = Constant(None, "not computable for this model: give --mu")
        out["d0"] = Constant(None, "not computable for this model: give --d0")
        out["f0"] = Constant(f_init, "estimated upper bound: initial loss - 0 (the loss is >= 0)")
    return out


def run_theory(*, epsilon: float, delta: float | None = None, batch: int | None = None, m2: float | None = None,
               batch_bound: float | None = None, beta: float | None = None, mu: float | None = None,
               d0: float | None = None, f0: float | None = None, dataset: str | None = None,
               model: str = "logreg", n_train: int | None = None, data_seed: int | None = None,
               dim: int | None = None, noise: float | None = None, seed: int = 0,
               weight_decay: float = 0.0) -> Theory:
    """Constants (given ones win over estimates) → :class:`Theory`; what ``scalesgd theory`` prints.

    Args:
        epsilon, delta, batch: target, slack δ of B ≤ δ·B_S + 1 (None: 1), and the minibatch column's B (None: the bound).
        m2, batch_bound, beta, mu, d0, f0: given constants (None: estimate from ``dataset`` or leave unknown).
        dataset, model, n_train, data_seed, dim, noise, seed, weight_decay: what :func:`estimate_constants` takes;
            with ``dataset`` None nothing is estimated.
    Returns:
        :class:`Theory`. Raises :class:`ConfigError` on a bad constant.
    """
    given = {"m2": m2, "batch_bound": batch_bound, "beta": beta, "mu": mu, "d0": d0, "f0": f0,
             "epsilon": epsilon, "delta": delta}
    for name, value in given.items():
        check_constant(name, value)
    check_constant("batch", batch)
    constants: dict[str, Constant] = {}
    if dataset is not None:
        constants.update(estimate_constants(dataset, model, n_train=n_train, data_seed=data_seed, dim=dim,
                                            noise=noise, seed=seed, weight_decay=weight_decay))
    for name, value in given.items():
        if value is not None:
            constants[name] = Constant(float(value), "given")
        elif name == "delta":
            constants[name] = Constant(1.0, "default")
        elif name not in constants:
            constants[name] = Constant(None, f"not given: pass {OPTION[name]}"
                                       + (" or --dataset" if name in ("m2", "batch_bound") else ""))
    return build_theory(constants, batch=batch)


# ---------------------------------------------------------------------------------------------------------
# Text


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def format_theory(theory: Theory) -> str:
    """The constants with their provenance, then one table line per row."""
    c = theory.constants
    lines = ["constants:"]
    for name in ("m2", "grad_sq_norm", "batch_bound", "beta", "mu", "d0", "f0", "epsilon", "delta"):
        if name in c:
            lines.append(f"  {name:<12} {_num(c[name].value):>10}  {c[name].how}")
    if theory.speedup_end is not None:
        lines.append(f"linear speedup ends near B = delta*B_S + 1 = {theory.speedup_end:.4g}; "
                     f"minibatch column at B = {theory.batch}"
                     + ("" if theory.batch <= theory.speedup_end + 1e-9 else
                        f" (beyond the bound: gradient evaluations exceed (1+delta)x serial)"))
    else:
        lines.append("minibatch column: needs B_S (pass --batch-bound, or --dataset to estimate it)")
    head = (f"{'problem':<22} {'target':<23} {'serial step':>11} {'serial evals':>12} | {'B':>5} "
            f"{'step (sum)':>10} {'lr (mean)':>10} {'iterations':>10} {'evals':>10} {'evals/serial':>12}")
    lines += [head, "-" * len(head)]
    for r in theory.rows:
        left = f"{ROW_TITLES[r.row]:<22} {ROW_TARGETS[r.row]:<23} "
        if r.serial is None:
            need = ", ".join(OPTION.get(m, m) for m in r.missing)
            lines.append(left + f"needs {need}")
            continue
        s = r.serial
        text = left + f"{_num(s.step):>11} {_num(s.grad_evals):>12} | "
        if r.minibatch is None:
            text += "needs --batch-bound"
        else:
            m = r.minibatch
            text += (f"{theory.batch:>5} {_num(m.step):>10} {_num(m.lr):>10} {_num(m.iterations):>10} "
                     f"{_num(m.grad_evals):>10} {m.grad_evals / s.grad_evals:>12.3f}")
        if not (s.valid and (r.minibatch is None or r.minibatch.valid)):
            text += "  [step breaks 2*mu*B*step <= 1: the rate does not apply]"
        lines.append(text)
    lines.append("steps: 'step (sum)' multiplies the summed gradient of the batch, 'lr (mean)' = B x step the mean "
                 "gradient; minibatch step = serial step / (1 + (B-1)/B_S) (Yin et al. 2018)")
    lines.append("serial rates: " + "; ".join(f"{ROW_TITLES[r]}: {ROW_SOURCES[r]}" for r in ROWS))
    return "\n".join(lines)


__all__ = ["ROWS", "Constant", "Rate", "TableRow", "Theory", "second_moment_factor", "minibatch_lr",
           "isotropic_ls_contraction", "serial_rate", "minibatch_rate", "speedup_end", "check_constant",
           "build_theory", "second_moment_eigenvalues", "estimate_constants", "run_theory", "format_theory"]
