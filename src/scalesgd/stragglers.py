"""Delayed nodes as an experiment: the ``--straggler`` spec, its reproducible delays and their expected cost.

A synchronous step ends when the slowest of its P workers is done, so its time is the *maximum* of the P
workers' step times (Chen et al., "Revisiting distributed synchronous SGD", arXiv 1604.00981). This module
is pure: it parses a spec, samples a worker's delay for a step from (seed, rank, step) alone — through its
own numpy generator, never torch's global RNG — and computes E[max of P step times] for each distribution,
which :mod:`scalesgd.perf_model` prices.

Specs (times take ``us``, ``ms`` or ``s``; a bare number is seconds):

* ``rank1x1.5`` or ``rank 1 x1.5`` — a fixed slow rank: rank 1's compute takes 1.5× (a sleep of 0.5× its
  measured compute time each step);
* ``exp:mean=5ms`` — every worker, every step, sleeps an exponential delay of mean 5 ms;
* ``lognormal:mean=5ms,sigma=1`` — a log-normal delay of mean 5 ms and log-standard deviation 1;
* ``pause:p=0.01,s=0.5`` — with probability 0.01 per worker and step, a pause of 0.5 s;
* ``none`` (or the empty string) — no injected delay.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np

from scalesgd.errors import ConfigError

KINDS = ("slow", "exp", "lognormal", "pause")
# Mixed into the generator's seed so the delays never share a stream with another use of the same seed.
_STREAM_TAG = 0x5712A6

_FORMS = ("rank1x1.5 (rank 1's compute takes 1.5x), exp:mean=5ms, lognormal:mean=5ms,sigma=1, "
          "pause:p=0.01,s=0.5, or none")


@dataclass(frozen=True)
class StragglerSpec:
    """A parsed ``--straggler`` spec.

    Attributes:
        kind: ``slow`` (a fixed slow rank), ``exp``, ``lognormal`` or ``pause``.
        rank: the slow rank (``slow`` only).
        factor: the slow rank's compute-time multiple, >= 1 (``slow`` only).
        mean_s: the mean delay in seconds (``exp``, ``lognormal``).
        sigma: the log-standard deviation (``lognormal``).
        p: the probability of a pause per worker and step (``pause``).
        pause_s: the length of a pause in seconds (``pause``).
    """

    kind: str
    rank: int = 0
    factor: float = 1.0
    mean_s: float = 0.0
    sigma: float = 0.0
    p: float = 0.0
    pause_s: float = 0.0

    def describe(self) -> str:
        """The spec in its canonical text form (parses back to an equal spec)."""
        if self.kind == "slow":
            return f"rank{self.rank}x{self.factor:g}"
        if self.kind == "exp":
            return f"exp:mean={self.mean_s:g}s"
        if self.kind == "lognormal":
            return f"lognormal:mean={self.mean_s:g}s,sigma={self.sigma:g}"
        return f"pause:p={self.p:g},s={self.pause_s:g}"


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"--straggler {text!r}: {why}; use one of {_FORMS}")


def _seconds(text: str, value: str, name: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(us|ms|s)?\s*", value)
    if not m:
        raise _bad(text, f"{name}={value!r} is not a time (e.g. 5ms, 0.5s, 0.5)")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}[m.group(2)]
    return float(m.group(1)) * scale


def _number(text: str, value: str, name: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise _bad(text, f"{name}={value!r} is not a number") from None
    if not math.isfinite(v):
        raise _bad(text, f"{name} must be finite, got {value!r}")
    return v


def parse_straggler(text: str | None) -> StragglerSpec | None:
    """Parse a ``--straggler`` spec (the forms in the module docstring).

    Args:
        text: the spec; ``None``, ``""``, ``"none"`` or ``"off"`` mean no injected delay.
    Returns:
        The :class:`StragglerSpec`, or None for no delay.
    Raises:
        ConfigError: one line naming what is wrong and the accepted forms.
    """
    if text is None or text.strip().lower() in ("", "none", "off"):
        return None
    s = text.strip()
    m = re.fullmatch(r"rank\s*(\d+)\s*[x*]\s*([0-9]*\.?[0-9]+)", s, flags=re.IGNORECASE)
    if m:
        factor = float(m.group(2))
        if factor < 1:
            raise _bad(text, f"the slow rank's factor must be >= 1 (a multiple of its compute time), got {factor:g}")
        return StragglerSpec(kind="slow", rank=int(m.group(1)), factor=factor)
    kind, sep, rest = s.partition(":")
    kind = kind.strip().lower()
    if kind not in ("exp", "lognormal", "pause") or not sep:
        raise _bad(text, "unknown form")
    params: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise _bad(text, f"{item.strip()!r} is not key=value")
        params[key.strip().lower()] = value.strip()
    wanted = {"exp": {"mean"}, "lognormal": {"mean", "sigma"}, "pause": {"p", "s"}}[kind]
    if set(params) != wanted:
        raise _bad(text, f"{kind} takes exactly {', '.join(sorted(wanted))}, got {', '.join(sorted(params)) or 'none'}")
    if kind == "exp":
        mean = _seconds(text, params["mean"], "mean")
        if mean <= 0:
            raise _bad(text, "mean must be positive")
        return StragglerSpec(kind="exp", mean_s=mean)
    if kind == "lognormal":
        mean = _seconds(text, params["mean"], "mean")
        sigma = _number(text, params["sigma"], "sigma")
        if mean <= 0 or sigma <= 0:
            raise _bad(text, "mean and sigma must be positive")
        return StragglerSpec(kind="lognormal", mean_s=mean, sigma=sigma)
    p = _number(text, params["p"], "p")
    pause = _seconds(text, params["s"], "s")
    if not 0 < p <= 1 or pause <= 0:
        raise _bad(text, "p must lie in (0, 1] and s must be positive")
    return StragglerSpec(kind="pause", p=p, pause_s=pause)


def check_ranks(spec: StragglerSpec | None, world_size: int) -> None:
    """Refuse a slow rank the job does not have (``rank5x2`` on 2 workers would delay no one, silently).

    Args:
        spec: the parsed ``--straggler`` spec (None: no delay).
        world_size: the job's number of ranks P.
    Raises:
        ConfigError: ``spec`` slows rank r >= P.
    """
    if spec is not None and spec.kind == "slow" and spec.rank >= world_size:
        raise ConfigError(f"--straggler {spec.describe()} slows rank {spec.rank}, but the job has ranks "
                          f"0..{world_size - 1}; name one of them, e.g. --straggler rank{world_size - 1}x{spec.factor:g}")


def step_generator(seed: int, rank: int, step: int) -> np.random.Generator:
    """The generator of one worker's delay at one step: a function of (seed, rank, step) alone (numpy's
    SeedSequence of the three and a stream tag), so a rerun, a resume or another machine draws the same."""
    return np.random.default_rng([_STREAM_TAG, int(seed), int(rank), int(step)])


def sample_delay(spec: StragglerSpec | None, *, seed: int, rank: int, step: int, compute_s: float) -> float:
    """The injected delay of ``rank`` at ``step``, seconds.

    Args:
        spec: the parsed spec (None: no delay).
        seed, rank, step: what the draw depends on (nothing else).
        compute_s: this step's measured compute time of this rank (the ``slow`` form scales it).
    Returns:
        ``(factor − 1)·compute_s`` on the slow rank (0 on the others) for ``slow``; an Exp(mean) draw for
        ``exp``; exp(N(μ, σ²)) with μ = ln(mean) − σ²/2 (so its mean is ``mean``) for ``lognormal``;
        ``pause_s`` with probability p, else 0, for ``pause``.
    """
    if spec is None:
        return 0.0
    if spec.kind == "slow":
        return (spec.factor - 1.0) * max(compute_s, 0.0) if rank == spec.rank else 0.0
    g = step_generator(seed, rank, step)
    if spec.kind == "exp":
        return float(g.exponential(spec.mean_s))
    if spec.kind == "lognormal":
        return float(g.lognormal(math.log(spec.mean_s) - spec.sigma ** 2 / 2, spec.sigma))
    return spec.pause_s if g.random() < spec.p else 0.0


def harmonic(n: int) -> float:
    """H_n = Σ_{k=1..n} 1/k."""
    return float(sum(1.0 / k for k in range(1, n + 1)))


def expected_max_delay(spec: StragglerSpec | None, world_size: int) -> float:
    """E[max over P workers of the i.i.d. injected delay] for the random forms, seconds (0 without a spec and
    for ``slow``, whose cost is a multiple of compute: see :func:`expected_step_compute`).

    * exponential of mean μ: E[max] = μ·H_P (the maximum of P i.i.d. exponentials is a sum of independent
      exponentials of means μ/P, μ/(P−1), …, μ; Chen et al. 2016);
    * log-normal: E[max] = ∫ exp(μ + σz)·P·Φ(z)^(P−1)·φ(z) dz, integrated numerically on a fine grid over
      z ∈ [−12, 12 + σ] (the density of the largest of P standard normals, pushed through the quantile map);
    * pause: E[max] = s·(1 − (1 − p)^P) (some worker pauses).
    """
    if spec is None or spec.kind == "slow":
        return 0.0
    p_count = int(world_size)
    if p_count < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if spec.kind == "exp":
        return spec.mean_s * harmonic(p_count)
    if spec.kind == "pause":
        return spec.pause_s * (1.0 - (1.0 - spec.p) ** p_count)
    mu = math.log(spec.mean_s) - spec.sigma ** 2 / 2
    z = np.linspace(-12.0, 12.0 + spec.sigma * 2, 200_001)
    phi = np.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    cdf = _norm_cdf(z)
    integrand = np.exp(mu + spec.sigma * z) * p_count * cdf ** (p_count - 1) * phi
    return float(np.trapezoid(integrand, z))


def _norm_cdf(z: np.ndarray) -> np.ndarray:
    import torch  # torch's erf is vectorised; numpy has none

    return 0.5 * (1 + torch.special.erf(torch.from_numpy(z / math.sqrt(2))).numpy())


def expected_step_compute(spec: StragglerSpec | None, world_size: int, compute_s: float) -> float:
    """E[max over P workers of compute + injected delay]: what a synchronous step waits for, seconds.

    Args:
        spec: the straggler spec (None: no delay).
        world_size: P.
        compute_s: one worker's undelayed compute time per step (the same on every worker).
    Returns:
        ``factor·compute_s`` for a slow rank among the P (else ``compute_s``); ``compute_s + E[max delay]``
        for the i.i.d. forms (:func:`expected_max_delay`).
    """
    if spec is not None and spec.kind == "slow":
        return compute_s * (spec.factor if spec.rank < world_size else 1.0)
    return compute_s + expected_max_delay(spec, world_size)


def expected_local_sgd_compute(spec: StragglerSpec | None, world_size: int, compute_s: float,
                               sync_every: int) -> float:
    """E[compute time per step] under local SGD with an average every H steps, seconds.

    The workers meet only at the average, so a period of H steps costs E[max_p Σ_{h=1..H} (compute +
    delay_{p,h})] = H·compute + E[max over P of S], S the sum of one worker's H delays; per step, that over H.
    The sum concentrates, so its maximum over P grows more slowly than H times the per-step maximum (local
    SGD absorbs random delays). With H = 1 this is :func:`expected_step_compute`; ``slow`` is exact at any H
    (the slow rank sets every period: factor·compute per step).

    For H > 1 the distribution of S is sampled once from a fixed seed (Gamma(H, μ) for ``exp``,
    s·Binomial(H, p) for ``pause``, H summed log-normals), and E[max of P] is the order-statistic sum
    Σᵢ S₍ᵢ₎·((i/n)^P − ((i−1)/n)^P) over the n sorted samples — deterministic, any P at the cost of one sort.
    """
    h = int(sync_every)
    if h < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    if spec is None or spec.kind == "slow" or h == 1:
        return expected_step_compute(spec, world_size, compute_s)
    sums = _sorted_period_delays(spec, h)
    n = sums.size
    u = np.arange(n + 1, dtype=np.float64) / n
    weights = np.diff(u ** int(world_size))
    return compute_s + float(np.dot(sums, weights)) / h


@functools.lru_cache(maxsize=16)
def _sorted_period_delays(spec: StragglerSpec, sync_every: int) -> np.ndarray:
    """(n,) sorted samples of one worker's summed delay over ``sync_every`` steps, from a fixed seed (a pure
    function of its arguments; cached because a prediction grid asks for the same one at every P)."""
    rng = np.random.default_rng([_STREAM_TAG, 20, sync_every])
    if spec.kind == "exp":
        sums = rng.gamma(sync_every, spec.mean_s, 400_000)
    elif spec.kind == "pause":
        sums = spec.pause_s * rng.binomial(sync_every, spec.p, 400_000).astype(np.float64)
    else:
        n = max(20_000, 4_000_000 // sync_every)
        mu = math.log(spec.mean_s) - spec.sigma ** 2 / 2
        sums = rng.lognormal(mu, spec.sigma, (n, sync_every)).sum(axis=1)
    return np.sort(sums)
