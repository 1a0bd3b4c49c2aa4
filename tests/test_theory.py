"""scalesgd.theory: the Yin et al. table against hand computation, its (1+δ) guarantee, the β/µ estimates, the CLI."""

import math

import numpy as np
import pytest
import torch

from scalesgd import theory
from scalesgd.cli import main
from scalesgd.errors import ConfigError

GIVEN = dict(m2=10.0, batch_bound=50.0, beta=2.0, mu=0.1, d0=1.0, f0=1.0, epsilon=0.01)


def _table(**kw):
    return {r.row: r for r in theory.run_theory(**{**GIVEN, **kw}).rows}


def test_serial_rows_by_hand():
    rows = _table()
    # strongly convex: step mu*eps/M2 = 1e-4; T = M2/(2 mu^2 eps) ln(2 D0/eps) = 10/(2*0.01*0.01) ln 200
    assert rows["strongly-convex"].serial.step == pytest.approx(1e-4)
    assert rows["strongly-convex"].serial.grad_evals == pytest.approx(50000 * math.log(200))
    # convex: step eps/M2 = 1e-3; T = M2 D0 / eps^2 = 1e5
    assert rows["convex"].serial.step == pytest.approx(1e-3)
    assert rows["convex"].serial.grad_evals == pytest.approx(1e5)
    # smooth: step eps/(beta M2) = 5e-4; T = 2 beta M2 F0 / eps^2 = 4e5
    assert rows["smooth"].serial.step == pytest.approx(5e-4)
    assert rows["smooth"].serial.grad_evals == pytest.approx(4e5)
    # PL: step 2 mu eps/(beta M2) = 1e-4; T = beta M2/(4 mu^2 eps) ln(2 F0/eps) = 20/(4e-4) ln 200
    assert rows["smooth-pl"].serial.step == pytest.approx(1e-4)
    assert rows["smooth-pl"].serial.grad_evals == pytest.approx(50000 * math.log(200))


def test_minibatch_row_by_hand():
    rows = _table(batch=26)  # delta_B = 25/50 = 0.5
    for name, r in rows.items():
        assert r.minibatch.step == pytest.approx(r.serial.step / 1.5), name
        assert r.minibatch.lr == pytest.approx(26 * r.serial.step / 1.5), name
        assert r.minibatch.iterations == pytest.approx(1.5 * r.serial.iterations / 26), name
        assert r.minibatch.grad_evals == pytest.approx(1.5 * r.serial.grad_evals), name


@pytest.mark.parametrize("delta", [0.0, 0.25, 1.0, 3.0])
def test_minibatch_within_one_plus_delta_below_the_bound(delta):
    bound = GIVEN["batch_bound"]
    t = theory.run_theory(**{**GIVEN, "delta": delta})
    assert t.batch == math.floor(delta * bound + 1)  # default B: the largest within the bound
    assert t.speedup_end == pytest.approx(delta * bound + 1)
    for b in range(1, t.batch + 1):
        for r in _table(delta=delta, batch=b).values():
            assert r.minibatch.grad_evals <= (1 + delta) * r.serial.grad_evals * (1 + 1e-12)
            assert r.minibatch.iterations <= r.serial.iterations  # never slower per step
    # beyond the bound the guarantee is lost: evals exceed (1 + delta) x serial, and iterations level off
    beyond = _table(delta=delta, batch=t.batch + 1 + int(bound))["convex"]
    assert beyond.minibatch.grad_evals > (1 + delta) * beyond.serial.grad_evals
    far = _table(delta=delta, batch=10 ** 7)["convex"]
    assert far.minibatch.iterations == pytest.approx(far.serial.iterations / bound, rel=1e-4)


def test_contraction_rows_flag_a_step_too_large():
    rows = _table(epsilon=1.0, m2=0.5, mu=1.0, beta=1.0)  # 2 mu step = 2 eps mu^2/M2 = 4 > 1
    assert not rows["strongly-convex"].serial.valid
    assert rows["convex"].serial.valid
    text = theory.run_theory(**{**GIVEN, "epsilon": 1.0, "m2": 0.5, "mu": 1.0, "beta": 1.0}).text()
    assert "does not apply" in text


def test_isotropic_ls_contraction_is_the_minimised_quadratic():
    # E|v'|^2/|v|^2 = 1 - 2 eta + eta^2 (1 + (d+1)/B) for x ~ N(0, I_d); B_S = d + 2
    d = 30
    for b in (1, 4, 32, 256):
        etas = np.linspace(0.001, 2.0, 200001)
        q = 1 - 2 * etas + etas ** 2 * (1 + (d + 1) / b)
        assert q.min() == pytest.approx(theory.isotropic_ls_contraction(b, d + 2), abs=1e-8)
        assert theory.minibatch_lr(1.0 / (d + 2), b, d + 2) == pytest.approx(etas[q.argmin()], abs=1e-4)


def test_beta_mu_estimates_on_synthetic_least_squares():
    consts = theory.estimate_constants("synthetic-linreg", "logreg", dim=6, n_train=500, noise=0.3,
                                       weight_decay=0.01)
    from scalesgd.data import load_dataset

    x = load_dataset("synthetic-linreg", dim=6, n_train=500, noise=0.3).x_train.double().numpy()
    xt = np.hstack([x, np.ones((500, 1))])
    eig = np.linalg.eigvalsh(xt.T @ xt / 500)
    assert consts["beta"].value == pytest.approx(eig[-1] + 0.01, rel=1e-9)
    assert consts["mu"].value == pytest.approx(eig[0] + 0.01, rel=1e-9)
    assert consts["beta"].how.startswith("estimated: largest eigenvalue")
    # B_S of noisy isotropic least squares: about d + 2 + noise^2 d/|v|^2 (make_synthetic_linreg's docstring)
    assert 6 < consts["batch_bound"].value < 20
    # F0 is the exact suboptimality: F(w0) - F(w*) >= 0, and D0 matches an independent lstsq (ridge) solve
    y = load_dataset("synthetic-linreg", dim=6, n_train=500, noise=0.3).y_train.double().numpy()
    a = np.vstack([xt / math.sqrt(500), math.sqrt(0.01) * np.eye(7)])
    w_star = np.linalg.lstsq(a, np.concatenate([y[:, 0] / math.sqrt(500), np.zeros(7)]), rcond=None)[0]
    torch.manual_seed(0)
    from scalesgd.models import MODELS

    lin = MODELS["logreg"](input_shape=(6,), num_outputs=1)[-1]
    w0 = np.concatenate([lin.weight.detach().double().numpy()[0], lin.bias.detach().double().numpy()])
    assert consts["d0"].value == pytest.approx(float(np.sum((w0 - w_star) ** 2)), rel=1e-6)
    def f(w):  # mean ½(x̃·w − y)² + ½λ|w|², straight from the definition
        return 0.5 * np.mean((xt @ w - y[:, 0]) ** 2) + 0.5 * 0.01 * np.sum(w ** 2)

    assert consts["f0"].value == pytest.approx(f(w0) - f(w_star), rel=1e-5)
    assert consts["f0"].value > 0


def test_estimates_say_what_they_cannot_compute():
    consts = theory.estimate_constants("digits", "mlp", n_train=200)
    assert consts["beta"].value is None and "give --beta" in consts["beta"].how
    assert consts["batch_bound"].value >= 1
    logreg = theory.estimate_constants("digits", "logreg", n_train=200)
    from scalesgd.data import load_dataset

    x = load_dataset("digits", n_train=200).x_train.reshape(200, -1).double().numpy()
    hi = np.linalg.eigvalsh(np.hstack([x, np.ones((200, 1))]).T @ np.hstack([x, np.ones((200, 1))]) / 200)[-1]
    assert logreg["beta"].value == pytest.approx(0.5 * hi, rel=1e-9)
    assert logreg["mu"].value is None and "give --mu" in logreg["mu"].how


def test_bad_constants_are_refused():
    for kw in ({"m2": -1.0}, {"beta": float("nan")}, {"epsilon": 0.0}, {"delta": -0.5}, {"batch_bound": 0.5},
               {"mu": 5.0}):  # mu > beta
        with pytest.raises(ConfigError):
            theory.run_theory(**{**GIVEN, **kw})


def test_cli_prints_the_table(capsys):
    rc = main(["theory", "--epsilon", "0.01", "--m2", "10", "--batch-bound", "50", "--beta", "2", "--mu", "0.1",
               "--d0", "1", "--f0", "1", "--delta", "0.5", "--batch", "26"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "µ-strongly convex" in out and "β-smooth µ-PL" in out
    assert "delta*B_S + 1 = 26" in out
    line = next(x for x in out.splitlines() if x.startswith("convex"))
    assert "1e+05" in line and "1.500" in line  # serial evals and evals/serial = 1 + 25/50


def test_cli_without_constants_says_what_is_needed(capsys):
    assert main(["theory", "--epsilon", "0.01", "--m2", "3"]) == 0
    out = capsys.readouterr().out
    assert "needs --mu, --d0" in out and "pass --batch-bound" in out


@pytest.mark.parametrize("argv", [["--m2", "-1"], ["--beta", "nan"], ["--epsilon", "-0.1"], ["--mu", "inf"]])
def test_cli_refuses_a_bad_constant_with_one_line(capsys, argv):
    base = ["theory", "--epsilon", "0.01"]
    if "--epsilon" in argv:
        base = ["theory"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scalesgd: error:")
