"""A numpy-only model of step time and time to accuracy: fit it from a short profile, then predict.

time to accuracy = time per pass × passes to accuracy

- Step time on one host, where our trainer runs backward, then one all-reduce of the whole gradient
  (compute and communication do not overlap):
  ``T_step(B, P) = T_compute(ceil(B/P)) + T_allreduce(N_grad_bytes, P) + overhead``.
- ``T_compute(b) = t0 + t1·b`` (affine: a fixed per-step cost plus a per-example cost), fitted to median
  fwd+bwd+update times at a few local batch sizes. Its throughput ``b/(t0 + t1·b)`` saturates at
  ``1/t1``, which is the shape CPU and GPU profiles have once the batch fills the device. Where that
  misses a profiled point by more than 5% (CPU kernels that switch algorithm or spill a cache at some
  size), the curve is the piecewise-linear interpolation of the profiled medians instead.
- ``T_allreduce(N, P) = 2(P−1)·α + 2(P−1)/P·N·β``: the bandwidth-optimal ring (reduce-scatter then
  all-gather), α seconds per message, β seconds per byte; zero on one worker. Our ring strategies send
  small messages by recursive doubling when P is a power of two, which costs ``log2(P)·(α + N·β)``: at
  P = 2 up to a measured size (the two cost the same bandwidth there, and the ring's pipelining wins
  above it), at P ≥ 4 up to the size where the two costs cross (:func:`doubling_crossover_bytes`), so
  the cheaper algorithm runs; a :class:`Network` that knows the strategy does this models it too.
- Delayed nodes and local SGD (:mod:`scalesgd.stragglers`): with injected delays a synchronous step waits
  for the slowest worker, so ``T_compute`` becomes E[max over P of compute + delay] (μ·H_P more for i.i.d.
  exponential delays of mean μ); with parameters averaged every H steps (local SGD) the workers meet once
  per period, so compute is E[max over P of a period's sum]/H and the all-reduce costs ``T_allreduce/H``
  per step (the parameters are as large as the gradient). Local SGD's own sample efficiency is measured,
  not modelled: passes to accuracy at period H are the synchronous ones times passes(H)/passes(1) read off a
  measured passes-versus-H curve (:func:`local_sgd_passes_factor`), and :func:`recommend_sync_every` picks
  the H of that curve with the least time to accuracy.
- time per pass = (n/B)·T_step(B, P).
- passes to accuracy: ``passes(B) = passes_min·(1 + B/B_crit)`` (McCandlish et al. 2018, epochs form),
  with ``B_crit = B_S − 1`` from the measured diversity batch bound ``B_S = n·Δ``. The two views agree:
  Yin et al. (arXiv 1706.05699) give gradient evaluations ∝ 1 + (B−1)/B_S, which is
  ``(B_S−1)/B_S · (1 + B/(B_S−1))``, and n·Δ = B_simple + 1 (§3).

Everything here is plain numbers in, plain numbers out; :mod:`scalesgd.predict` does the measuring.
The α–β fit lives here (:func:`fit_alpha_beta`) so that this model needs nothing but numpy.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from scalesgd.errors import ConfigError
from scalesgd.stragglers import StragglerSpec, expected_local_sgd_compute

# ---------------------------------------------------------------------------------------------------------
# Compute curve


COMPUTE_KINDS = ("auto", "affine", "piecewise")


@dataclass(frozen=True)
class ComputeFit:
    """Seconds for one fwd+bwd+update at local batch size ``b``.

    ``affine`` (no knots): ``T(b) = t0_s + t1_s·b``. ``piecewise`` (knots given): linear interpolation
    through the profiled medians ``(knots_b, knots_s)`` (made non-decreasing), extended beyond the last
    knot with the last segment's per-example slope and below the first with the first segment's (never
    below 0). Piecewise is for profiles an affine curve misses by more than a few percent (CPU kernels
    that switch algorithm or spill a cache at some batch size). ``t0_s, t1_s`` always hold the affine fit,
    and ``max_rel_err`` its worst |fit − measured|/measured over the profile (0 when built by hand).
    """

    t0_s: float
    t1_s: float
    max_rel_err: float = 0.0
    knots_b: tuple[float, ...] = ()
    knots_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.t0_s) and math.isfinite(self.t1_s)) or self.t0_s < 0 or self.t1_s < 0:
            raise ConfigError(f"compute fit needs finite t0_s >= 0 and t1_s >= 0, got t0_s={self.t0_s}, "
                              f"t1_s={self.t1_s}; profile at more batch sizes or with more steps")
        if self.knots_b or self.knots_s:
            kb, ks = np.asarray(self.knots_b, dtype=np.float64), np.asarray(self.knots_s, dtype=np.float64)
            if (kb.size < 2 or kb.size != ks.size or np.any(np.diff(kb) <= 0) or np.any(np.diff(ks) < 0)
                    or kb[0] < 1 or not np.all(np.isfinite(ks)) or np.any(ks <= 0)):
                raise ConfigError("a piecewise compute curve needs >= 2 knots at increasing batch sizes >= 1 "
                                  "with positive, non-decreasing times")

    @property
    def kind(self) -> str:
        return "piecewise" if self.knots_b else "affine"

    def __call__(self, local_batch_size):
        """Seconds per step at ``local_batch_size`` (scalar or array)."""
        b = np.asarray(local_batch_size, dtype=np.float64)
        if not self.knots_b:
            return self.t0_s + self.t1_s * b
        kb, ks = np.asarray(self.knots_b), np.asarray(self.knots_s)
        lo_slope = (ks[1] - ks[0]) / (kb[1] - kb[0])
        hi_slope = (ks[-1] - ks[-2]) / (kb[-1] - kb[-2])
        inside = np.interp(b, kb, ks)
        below = np.maximum(ks[0] + lo_slope * (b - kb[0]), 0.0)
        above = ks[-1] + hi_slope * (b - kb[-1])
        return np.where(b < kb[0], below, np.where(b > kb[-1], above, inside))

    @property
    def peak_examples_per_s(self) -> float:
        """Throughput of the affine fit as b → ∞ (``1/t1``)."""
        return math.inf if self.t1_s == 0 else 1.0 / self.t1_s

    def describe(self) -> str:
        affine = f"{self.t0_s * 1e3:.3g} ms + b * {self.t1_s * 1e6:.3g} us"
        if self.kind == "affine":
            return f"affine: T_compute(b) = {affine} (worst error on the profile {self.max_rel_err:.1%})"
        return (f"piecewise-linear through the profiled medians (the affine fit {affine} missed a point by "
                f"{self.max_rel_err:.1%})")


def nonneg_lstsq(features: np.ndarray, targets: np.ndarray, *, relative: bool = True) -> np.ndarray:
    """Minimise Σ((features·θ − t)/t)² over θ ≥ 0 (relative error, so small timings count as much as big;
    ``relative=False``: plain Σ(features·θ − t)²).

    Tiny active-set search: try the full fit, then every subset with one fewer coefficient, keeping the
    best non-negative one. Two or three coefficients make that exhaustive and exact.
    """
    w = 1.0 / targets if relative else np.ones_like(targets)
    a = features * w[:, None]
    y = targets * w
    k = features.shape[1]
    best, best_res = np.zeros(k), float(np.sum(y ** 2))
    for mask in range(1, 2 ** k):
        cols = [j for j in range(k) if mask >> j & 1]
        sol, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        if np.any(sol < 0):
            continue
        theta = np.zeros(k)
        theta[cols] = sol
        res = float(np.sum((a @ theta - y) ** 2))
        if res < best_res - 1e-15:
            best, best_res = theta, res
    return best


def _as_positive_1d(name: str, values: Iterable[float]) -> np.ndarray:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ConfigError(f"{name} must be a non-empty list of positive finite numbers, got {arr.tolist()}")
    return arr


def fit_compute(batch_sizes: Sequence[float], times_s: Sequence[float], *, kind: str = "auto",
                max_affine_rel_err: float = 0.05) -> ComputeFit:
    """Fit the compute curve to median step times at local batch sizes.

    Args:
        batch_sizes: local batch sizes profiled (at least two distinct values).
        times_s: median seconds per fwd+bwd+update at each size.
        kind: ``affine`` (``t0 + t1·b``, t0, t1 ≥ 0), ``piecewise`` (through the medians), or ``auto``:
            affine when it misses no profiled point by more than ``max_affine_rel_err``, else piecewise.
    Returns:
        :class:`ComputeFit`; its ``max_rel_err`` is the affine fit's worst relative residual.
    The affine fit minimises relative error, so a 1 ms step at b = 8 weighs as much as a 50 ms one at b = 512.
    A piecewise curve takes the median per distinct size and a running maximum, so it never decreases in b.
    """
    if kind not in COMPUTE_KINDS:
        raise ConfigError(f"unknown compute curve {kind!r}; choose one of {', '.join(COMPUTE_KINDS)}")
    b = _as_positive_1d("batch_sizes", batch_sizes)
    t = _as_positive_1d("times_s", times_s)
    if b.size != t.size:
        raise ConfigError(f"fit_compute: {b.size} batch sizes but {t.size} timings; pass one timing per size")
    if np.unique(b).size < 2:
        raise ConfigError(f"fit_compute needs at least two distinct batch sizes, got {b.tolist()}")
    t0, t1 = nonneg_lstsq(np.stack([np.ones_like(b), b], axis=1), t)
    rel = float((np.abs(t0 + t1 * b - t) / t).max())
    if kind == "affine" or (kind == "auto" and rel <= max_affine_rel_err):
        return ComputeFit(t0_s=float(t0), t1_s=float(t1), max_rel_err=rel)
    kb = np.unique(b)
    ks = np.maximum.accumulate(np.array([np.median(t[b == v]) for v in kb]))
    return ComputeFit(t0_s=float(t0), t1_s=float(t1), max_rel_err=rel, knots_b=tuple(float(v) for v in kb),
                      knots_s=tuple(float(v) for v in ks))


# ---------------------------------------------------------------------------------------------------------
# Network: α–β ring all-reduce


@dataclass(frozen=True)
class Network:
    """α (seconds per message) and β (seconds per byte) of the ring all-reduce cost model.

    ``source`` says where the numbers came from ("measured here", or the string the user gave).
    ``doubling_max_bytes``: the strategy sends messages up to this size by recursive doubling at P = 2, and
    at larger powers of two up to the α–β crossover of this network (:func:`doubling_threshold_bytes`), as
    the ``ring`` and ``ring-tcp`` strategies do (0: always the ring, e.g. for the built-in all-reduce).
    """

    alpha_s: float
    beta_s_per_byte: float
    source: str = ""
    doubling_max_bytes: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha_s) and math.isfinite(self.beta_s_per_byte)) \
                or self.alpha_s < 0 or self.beta_s_per_byte < 0:
            raise ConfigError(f"network needs finite alpha_s >= 0 and beta_s_per_byte >= 0, got "
                              f"alpha_s={self.alpha_s}, beta_s_per_byte={self.beta_s_per_byte}")

    @property
    def latency_bytes(self) -> float:
        """α/β: the message size whose transfer takes as long as one message's latency."""
        return math.inf if self.beta_s_per_byte == 0 else self.alpha_s / self.beta_s_per_byte

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return math.inf if self.beta_s_per_byte == 0 else 1.0 / self.beta_s_per_byte

    def describe(self) -> str:
        gbit = self.bandwidth_bytes_per_s * 8 / 1e9
        at4 = float(doubling_crossover_bytes(4, self.latency_bytes)) / 1024
        rd = (f", recursive doubling up to {self.doubling_max_bytes} B at P=2 and up to the alpha-beta crossover "
              f"above ({at4:.0f} KB at P=4)" if self.doubling_max_bytes else "")
        return (f"{gbit:.3g} Gbit/s, {self.alpha_s * 1e6:.3g} us{rd}"
                + (f" ({self.source})" if self.source else ""))


def allreduce_time(message_bytes, workers, network: Network):
    """All-reduce seconds (0 when P = 1), scalars or arrays: the ring's ``2(P−1)·α + 2(P−1)/P·N·β``, or
    ``log2(P)·(α + N·β)`` where the strategy goes by recursive doubling (N up to
    :func:`doubling_threshold_bytes` for ``network.doubling_max_bytes`` and the network's α/β).

    Source: Patarasuk & Yuan's bandwidth-optimal ring, as in baidu-allreduce and Horovod;
    recursive doubling: log2(P) rounds, each an exchange of the whole message with one partner (Thakur,
    Rabenseifner & Gropp 2005, who switch between the two by message size in the same way).
    """
    p = np.asarray(workers, dtype=np.float64)
    return allreduce_time_as_run(message_bytes, p, network.alpha_s, network.beta_s_per_byte,
                                 doubling_threshold_bytes(p, network.doubling_max_bytes, network.latency_bytes))


def allreduce_algorithm(message_bytes: float, workers: int, network: Network) -> str:
    """Which algorithm :func:`allreduce_time` prices for one message: "none" (P = 1), "recursive doubling"
    or "ring"."""
    if workers <= 1:
        return "none"
    limit = float(doubling_threshold_bytes(workers, network.doubling_max_bytes, network.latency_bytes))
    return "recursive doubling" if 0 < limit and message_bytes <= limit else "ring"  # limit 0: P not a power of 2


def allreduce_time_as_run(message_bytes, workers, alpha_s: float, beta_s_per_byte: float, doubling_max_bytes=0):
    """:func:`allreduce_time` with the recursive-doubling threshold that actually ran given outright (one
    number, or one per row, as ``allreduce-bench`` records it): how measured rows are priced and fitted."""
    n = np.asarray(message_bytes, dtype=np.float64)
    p = np.asarray(workers, dtype=np.float64)
    if np.any(p < 1):
        raise ConfigError(f"worker count must be >= 1, got {p.tolist()}")
    f = _cost_features(n, p, doubling_max_bytes)
    return f[..., 0] * alpha_s + f[..., 1] * beta_s_per_byte


def _power_of_two(p: np.ndarray) -> np.ndarray:
    log_p = np.log2(np.maximum(p, 1.0))
    return (p > 1) & (log_p == np.round(log_p))


def doubling_crossover_bytes(workers, latency_bytes: float):
    """The message size N* at which recursive doubling and the ring cost the same on P workers (a power of
    two ≥ 4): ``log2(P)·(α + N·β) = 2(P−1)·α + 2(P−1)/P·N·β`` gives
    ``N* = (α/β)·(2(P−1) − log2 P)/(log2 P − 2(P−1)/P)``; doubling is cheaper below it. 0 where there is no
    crossover: P = 2 (the two send the same bytes, doubling saves one α and the ring pipelines its
    additions, so there the switch is a measured size) and P not a power of two — scalars or arrays in,
    float array out.
    """
    p = np.asarray(workers, dtype=np.float64)
    log_p = np.log2(np.maximum(p, 1.0))
    eligible = _power_of_two(p) & (p >= 4)
    with np.errstate(divide="ignore", invalid="ignore"):  # P = 1 and 2 divide by zero; they are masked out
        ratio = (2.0 * (p - 1.0) - log_p) / (log_p - 2.0 * (p - 1.0) / p)
        return np.where(eligible, np.float64(latency_bytes) * ratio, 0.0)


def doubling_threshold_bytes(workers, p2_bytes: float, latency_bytes: float):
    """Largest message our rings send by recursive doubling on P workers: ``p2_bytes`` at P = 2 (measured:
    the ring's pipelined additions win above it), :func:`doubling_crossover_bytes` at larger powers of two,
    0 (never) where P is not a power of two or ``p2_bytes`` is 0 (doubling turned off). Because the switch
    sits where the two costs cross (or, at P = 2, where the ring costs one α more), the modelled time never
    falls as the message grows. The runtime (:class:`scalesgd.comm.RingAllReduce`) uses this same rule."""
    p = np.asarray(workers, dtype=np.float64)
    if p2_bytes <= 0:
        return np.zeros_like(p)
    return np.where(p == 2, np.float64(p2_bytes), doubling_crossover_bytes(p, latency_bytes))


def _cost_features(n: np.ndarray, p: np.ndarray, doubling_max_bytes=0) -> np.ndarray:
    """(…, 2) numbers that multiply α and β: ``(2(P−1), 2(P−1)/P·N)`` for the ring, ``(log2 P, log2 P·N)``
    where recursive doubling runs (N ≤ ``doubling_max_bytes`` — one number, or one per row — and P a power
    of two above 1)."""
    n, p, limit = np.broadcast_arrays(np.asarray(n, dtype=np.float64), np.asarray(p, dtype=np.float64),
                                      np.asarray(doubling_max_bytes, dtype=np.float64))
    log_p = np.log2(np.maximum(p, 1.0))
    doubling = (n <= limit) & _power_of_two(p)
    ring = np.stack([2.0 * (p - 1.0), 2.0 * (p - 1.0) / p * n], axis=-1)
    rd = np.stack([log_p, log_p * n], axis=-1)
    return np.where(doubling[..., None], rd, ring)


def _alpha_beta_inputs(sizes_bytes, world_sizes, times_s, doubling_max_bytes=0) -> tuple[np.ndarray, ...]:
    """Validated float arrays (N, P, T, doubling threshold) with the P = 1 rows (no communication) dropped;
    P and the threshold may each be one number."""
    n = np.asarray(sizes_bytes, dtype=np.float64).ravel()
    t = np.asarray(times_s, dtype=np.float64).ravel()
    p = np.asarray(world_sizes, dtype=np.float64).ravel()
    if p.size == 1:
        p = np.full(n.shape, p[0])
    if not (n.size == p.size == t.size) or n.size == 0:
        raise ConfigError(f"fit_alpha_beta needs equal-length non-empty lists, got {n.size} sizes, "
                          f"{p.size} world sizes, {t.size} times")
    limit = np.asarray(doubling_max_bytes, dtype=np.float64).ravel()
    if limit.size == 1:
        limit = np.full(n.shape, limit[0])
    if limit.size != n.size:
        raise ConfigError(f"doubling_max_bytes needs one number or one per timing, got {limit.size} for "
                          f"{n.size} timings")
    if not (np.all(np.isfinite(t)) and np.all(t > 0) and np.all(n >= 0) and np.all(p >= 1)):
        raise ConfigError("fit_alpha_beta needs sizes >= 0, world sizes >= 1 and positive finite times")
    keep = p > 1
    n, p, t, limit = n[keep], p[keep], t[keep], limit[keep]
    if np.unique(n).size < 2:
        raise ConfigError("fit_alpha_beta needs timings on >= 2 workers at two or more distinct message "
                          "sizes to separate latency from bandwidth")
    return n, p, t, limit


def fit_alpha_beta(sizes_bytes: Sequence[float], world_sizes: Sequence[int] | int,
                   times_s: Sequence[float], *, relative: bool = True,
                   doubling_max_bytes: int | Sequence[int] = 0) -> tuple[float, float]:
    """Fit α (s) and β (s/byte) of ``T = 2(P−1)α + 2(P−1)/P·N·β`` to measured all-reduce times (rows
    the strategy sent by recursive doubling, N ≤ ``doubling_max_bytes`` — the threshold that ran, one
    number or one per row — by :func:`allreduce_time`'s ``log2(P)·(α + N·β)``).

    Args:
        sizes_bytes, world_sizes, times_s: one entry per measurement (median seconds per all-reduce of a
            message of that many bytes on that many workers; one P for all of them is accepted). Rows with
            P = 1 carry no information and are skipped. Needs at least two distinct message sizes.
        relative: minimise Σ((T̂ − T)/T)² (default: the small messages that pin α count as much as the big
            ones that pin β) instead of Σ(T̂ − T)².
    Returns:
        ``(alpha_s, beta_s_per_byte)``, both ≥ 0 (non-negative least squares).
    """
    n, p, t, limit = _alpha_beta_inputs(sizes_bytes, world_sizes, times_s, doubling_max_bytes)
    alpha, beta = nonneg_lstsq(_cost_features(n, p, limit), t, relative=relative)
    return float(alpha), float(beta)


def best_max_rel_error(sizes_bytes: Sequence[float], world_sizes: Sequence[int] | int,
                       times_s: Sequence[float], *, doubling_max_bytes: int | Sequence[int] = 0) -> float:
    """The smallest max |T̂/T − 1| that any α, β ≥ 0 of the ring model reaches on these timings: the
    minimax (Chebyshev) fit's error. When it exceeds a tolerance, no fit meets that tolerance, least squares
    or any other: the timings are not a line in N.

    Exact: the minimax fit of two coefficients is pinned by three timings on which its error alternates
    (or, on the boundary α = 0 or β = 0, by the two extreme ratios), so every such candidate is solved for
    and the best one over all timings kept.
    """
    n, p, t, limit = _alpha_beta_inputs(sizes_bytes, world_sizes, times_s, doubling_max_bytes)
    a = _cost_features(n, p, limit) / t[:, None]  # (m, 2): T̂/T = a·(α, β)
    cands = []
    for j in range(2):  # one coefficient, the other at its bound 0
        col = a[:, j]
        if col.max() > 0:
            x = np.zeros(2)
            x[j] = 2 / (col.max() + col.min())
            cands.append(x[None])
    if len(t) >= 3:
        idx = np.array(list(itertools.combinations(range(len(t)), 3)))  # (k, 3)
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=3)))  # (8, 3)
        lhs = np.concatenate([np.broadcast_to(a[idx][:, None], (len(idx), 8, 3, 2)),
                              -np.broadcast_to(signs[None, :, :, None], (len(idx), 8, 3, 1))], axis=3)
        lhs = lhs.reshape(-1, 3, 3)  # rows: a_i·x − s_i·e = 1
        ok = np.abs(np.linalg.det(lhs)) > 1e-12
        sol = np.linalg.solve(lhs[ok], np.ones((int(ok.sum()), 3, 1)))[..., 0]  # (k', 3): α, β, e
        keep = np.all(sol[:, :2] >= 0, axis=1) & (sol[:, 2] >= 0)
        cands.append(sol[keep, :2])
    x = np.concatenate(cands)  # (k, 2) candidate (α, β)
    return float(np.abs(x @ a.T - 1).max(axis=1).min())


_BANDWIDTH_UNITS = {  # unit (lower case, no spaces) -> bytes per second
    "bit/s": 1 / 8, "bps": 1 / 8, "b/s": 1 / 8,
    "kbit/s": 1e3 / 8, "kbps": 1e3 / 8, "kb/s": 1e3 / 8,
    "mbit/s": 1e6 / 8, "mbps": 1e6 / 8, "mb/s": 1e6 / 8,
    "gbit/s": 1e9 / 8, "gbps": 1e9 / 8, "gb/s": 1e9 / 8,
    "tbit/s": 1e12 / 8, "tbps": 1e12 / 8, "tb/s": 1e12 / 8,
}
_BYTE_BANDWIDTH_UNITS = {  # case-sensitive: capital B means bytes
    "B/s": 1.0, "kB/s": 1e3, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "TB/s": 1e12,
    "KiB/s": 2.0 ** 10, "MiB/s": 2.0 ** 20, "GiB/s": 2.0 ** 30, "TiB/s": 2.0 ** 40,
}
_LATENCY_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([^\s0-9].*?)\s*$")


def parse_network(spec: str) -> Network:
    """Parse ``"25 Gbit/s, 10 us"`` (bandwidth and latency, either order) into a :class:`Network`.

    Bandwidth units: bit/s, kbit/s, Mbit/s, Gbit/s, Tbit/s (also Gbps, Gb/s) for bits; B/s, kB/s, MB/s,
    GB/s, TB/s, GiB/s for bytes (capital B = bytes). Latency units: s, ms, us, µs, ns.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("--network needs a bandwidth and a latency, e.g. --network '25 Gbit/s, 10 us'")
    parts = [s for s in spec.split(",") if s.strip()]
    if len(parts) != 2:
        raise ConfigError(f"--network {spec!r}: expected 'BANDWIDTH, LATENCY' like '25 Gbit/s, 10 us' "
                          f"(two comma-separated quantities), got {len(parts)}")
    bandwidth = latency = None
    for part in parts:
        m = _QUANTITY.match(part)
        if not m:
            raise ConfigError(f"--network {spec!r}: cannot read {part.strip()!r} as a number with a unit; "
                              "write e.g. '25 Gbit/s, 10 us'")
        value, unit = float(m.group(1)), m.group(2).replace(" ", "")
        if unit in _BYTE_BANDWIDTH_UNITS:
            kind, scaled = "bandwidth", value * _BYTE_BANDWIDTH_UNITS[unit]
        elif unit.lower() in _BANDWIDTH_UNITS:
            kind, scaled = "bandwidth", value * _BANDWIDTH_UNITS[unit.lower()]
        elif unit in _LATENCY_UNITS or unit.lower() in _LATENCY_UNITS:
            kind, scaled = "latency", value * _LATENCY_UNITS.get(unit, _LATENCY_UNITS.get(unit.lower(), 0.0))
        else:
            raise ConfigError(f"--network {spec!r}: unknown unit {unit!r}; bandwidth in bit/s, Gbit/s, GB/s "
                              "(etc.), latency in s, ms, us, ns")
        if kind == "bandwidth":
            if bandwidth is not None:
                raise ConfigError(f"--network {spec!r}: two bandwidths and no latency; write e.g. "
                                  "'25 Gbit/s, 10 us'")
            bandwidth = scaled
        else:
            if latency is not None:
                raise ConfigError(f"--network {spec!r}: two latencies and no bandwidth; write e.g. "
                                  "'25 Gbit/s, 10 us'")
            latency = scaled
    if not bandwidth or bandwidth <= 0 or not math.isfinite(bandwidth):
        raise ConfigError(f"--network {spec!r}: bandwidth must be positive")
    return Network(alpha_s=float(latency), beta_s_per_byte=1.0 / bandwidth, source="given")


# ---------------------------------------------------------------------------------------------------------
# Step time, passes, time to accuracy


def local_batch_size(global_batch_size, workers):
    """Largest per-worker shard, ``ceil(B/P)``: the slowest worker sets the pace of a synchronous step."""
    b = np.asarray(global_batch_size, dtype=np.float64)
    p = np.asarray(workers, dtype=np.float64)
    return np.ceil(b / p)


def delayed_compute(compute_s, workers, *, straggler: StragglerSpec | None = None, sync_every: int = 1):
    """Expected compute seconds per step that a step (or a local-SGD period, per step) waits for: E[max over
    P workers of compute + injected delay], or of a period's sum over H (:mod:`scalesgd.stragglers`); just
    ``compute_s`` without delays. Scalars or broadcastable arrays."""
    if straggler is None:
        return compute_s
    c, p = np.broadcast_arrays(np.asarray(compute_s, dtype=np.float64), np.asarray(workers))
    out = np.array([expected_local_sgd_compute(straggler, int(pi), float(ci), sync_every)
                    for ci, pi in zip(c.ravel(), p.ravel())]).reshape(c.shape)
    return float(out) if out.ndim == 0 else out


def step_time(global_batch_size, workers, *, compute: ComputeFit, network: Network, grad_bytes: float,
              overhead_s: float = 0.0, straggler: StragglerSpec | None = None, sync_every: int = 1):
    """Seconds per step: ``E[T_compute(ceil(B/P)) with delays] + T_allreduce(grad_bytes, P)/H + overhead_s``.

    Compute and communication add (no overlap): the trainer all-reduces the gradient once, after backward
    (under local SGD the parameters once every ``sync_every`` = H steps). ``straggler``: injected delays
    (:func:`delayed_compute`). Scalars or broadcastable arrays.
    """
    if sync_every < 1:
        raise ConfigError(f"sync_every must be >= 1, got {sync_every}")
    comp = delayed_compute(compute(local_batch_size(global_batch_size, workers)), workers, straggler=straggler,
                           sync_every=sync_every)
    return comp + allreduce_time(grad_bytes, workers, network) / sync_every + overhead_s


def time_per_pass(n_train: int, global_batch_size, workers, *, compute: ComputeFit, network: Network,
                  grad_bytes: float, overhead_s: float = 0.0, straggler: StragglerSpec | None = None,
                  sync_every: int = 1):
    """Seconds per pass over ``n_train`` examples: ``(n/B)·T_step(B, P)``."""
    b = np.asarray(global_batch_size, dtype=np.float64)
    return n_train / b * step_time(b, workers, compute=compute, network=network, grad_bytes=grad_bytes,
                                   overhead_s=overhead_s, straggler=straggler, sync_every=sync_every)


def batch_crit_from_bound(batch_bound: float) -> float:
    """``B_crit = B_S − 1`` (= B_simple of McCandlish et al., since n·Δ = B_simple + 1)."""
    if not (math.isfinite(batch_bound) and batch_bound > 1):
        raise ConfigError(f"the diversity batch bound B_S must be a finite number > 1, got {batch_bound}; "
                          "take it from a run's batch_bound_est (--from-run) or pass --batch-bound")
    return float(batch_bound) - 1.0


def passes_to_accuracy(global_batch_size, *, passes_min: float, batch_crit: float):
    """Passes over the data to reach the target: ``passes_min·(1 + B/B_crit)``.

    Below ``B_crit`` a bigger batch costs few extra passes (near-linear speedup in steps); above it the
    passes grow linearly in B (Yin et al. 2018; McCandlish et al. 2018, E = E_min(1 + B/B_noise)).
    """
    if not (passes_min > 0 and batch_crit > 0):
        raise ConfigError(f"passes_min and batch_crit must be positive, got {passes_min}, {batch_crit}")
    return passes_min * (1.0 + np.asarray(global_batch_size, dtype=np.float64) / batch_crit)


def passes_min_from_measurement(passes: float, global_batch_size: float, batch_crit: float) -> float:
    """Invert :func:`passes_to_accuracy` for one run: ``passes_min = passes/(1 + B/B_crit)``."""
    if not (passes > 0 and global_batch_size >= 1):
        raise ConfigError(f"a measured run needs passes > 0 and a batch size >= 1, got passes={passes}, "
                          f"batch size {global_batch_size}")
    return float(passes) / (1.0 + float(global_batch_size) / batch_crit)


def fit_passes_min(batch_sizes: Sequence[float], passes: Sequence[float], batch_crit: float) -> float:
    """Least-squares ``passes_min`` (relative error) from several runs at a known ``B_crit``.

    With x = 1 + B/B_crit, minimising Σ((pm·x − p)/p)² gives pm = Σ(x/p) / Σ(x/p)².
    """
    b = _as_positive_1d("batch_sizes", batch_sizes)
    p = _as_positive_1d("passes", passes)
    if b.size != p.size:
        raise ConfigError(f"fit_passes_min: {b.size} batch sizes but {p.size} pass counts")
    r = (1.0 + b / batch_crit) / p
    return float(r.sum() / (r ** 2).sum())


def parse_passes_curve(text: str) -> dict[int, float]:
    """``"1:4.2,4:4.4,16:5.1"`` → ``{1: 4.2, 4: 4.4, 16: 5.1}``: passes to accuracy measured at averaging periods H.

    Raises:
        ConfigError: not ``H:PASSES`` pairs, H not a positive integer or given twice, passes not positive.
    """
    curve: dict[int, float] = {}
    for item in str(text).split(","):
        h_text, sep, passes_text = item.partition(":")
        try:
            h, passes = int(h_text), float(passes_text)
        except ValueError:
            h, passes = 0, math.nan
        if not sep or h < 1 or not (math.isfinite(passes) and passes > 0) or h in curve:
            raise ConfigError(f"--passes-vs-h {text!r}: {item.strip()!r} is not H:PASSES with H a positive integer "
                              "(each once) and PASSES > 0; write e.g. '1:4.2,4:4.4,16:5.1' (H = 1: synchronous)")
        curve[h] = passes
    return curve


def local_sgd_passes_factor(sync_every: int, curve: dict[int, float]) -> float:
    """passes(H)/passes(1) of local SGD with period H, from a measured passes-versus-H curve.

    Between measured periods the passes are interpolated linearly in log2 H (the periods are usually measured
    at powers of two, and the cost of averaging less often grows with the number of doublings of H).

    Args:
        sync_every: H, the averaging period (1: synchronous SGD).
        curve: {H: passes to accuracy} measured at one (B, P); must contain H = 1 (the synchronous run the
            factor is relative to).
    Returns:
        The factor (1 at H = 1).
    Raises:
        ConfigError: no H = 1 point, or H outside the measured periods (local SGD's sample efficiency beyond
            them is unknown: holding the last value would favour ever larger H for free).
    """
    if 1 not in curve:
        raise ConfigError("the passes-vs-H curve needs the synchronous run, H = 1 (e.g. '1:4.2,4:4.4,16:5.1')")
    hs = sorted(curve)
    if not hs[0] <= sync_every <= hs[-1]:
        raise ConfigError(f"H = {sync_every} lies outside the measured passes-vs-H curve (H = {hs[0]}..{hs[-1]}); "
                          f"measure passes at H = {sync_every} or predict within the curve")
    passes = float(np.interp(math.log2(sync_every), np.log2(hs), [curve[h] for h in hs]))
    return passes / curve[1]


def recommend_sync_every(global_batch_size: int, workers: int, *, curve: dict[int, float], n_train: int,
                         compute: ComputeFit, network: Network, grad_bytes: float, passes: float,
                         overhead_s: float = 0.0, straggler: StragglerSpec | None = None
                         ) -> list[tuple[int, float, float, float]]:
    """Time to accuracy of local SGD at each measured period H of ``curve`` for one (B, P), fastest first.

    time to accuracy(H) = (n/B)·T_step(B, P, H) · passes·factor(H), with T_step's communication divided by H
    and its delays taken per period (:func:`step_time`) and factor(H) = passes(H)/passes(1)
    (:func:`local_sgd_passes_factor`), except at P = 1, whose local SGD is synchronous SGD (factor 1 at every
    H). Ties go to the smaller H.

    Args:
        passes: synchronous SGD's passes to accuracy at this B (:func:`passes_to_accuracy`).
    Returns:
        [(H, time per pass s, passes, time to accuracy s)], sorted by time to accuracy.
    """
    rows = []
    for h in sorted(curve):
        tpp = float(time_per_pass(n_train, global_batch_size, workers, compute=compute, network=network,
                                  grad_bytes=grad_bytes, overhead_s=overhead_s, straggler=straggler, sync_every=h))
        p = passes * (local_sgd_passes_factor(h, curve) if workers > 1 else 1.0)
        rows.append((h, tpp, p, tpp * p))
    return sorted(rows, key=lambda r: (r[3], r[0]))


def time_to_accuracy(n_train: int, global_batch_size, workers, *, compute: ComputeFit, network: Network,
                     grad_bytes: float, passes_min: float, batch_crit: float, overhead_s: float = 0.0):
    """Seconds to the target accuracy: time per pass × passes to accuracy."""
    return (time_per_pass(n_train, global_batch_size, workers, compute=compute, network=network,
                          grad_bytes=grad_bytes, overhead_s=overhead_s)
            * passes_to_accuracy(global_batch_size, passes_min=passes_min, batch_crit=batch_crit))


def efficiency(global_batch_size, workers, *, compute: ComputeFit, network: Network, grad_bytes: float,
               overhead_s: float = 0.0, straggler: StragglerSpec | None = None, sync_every: int = 1):
    """Parallel efficiency at fixed B: ``T_step(B, 1) / (P·T_step(B, P))``, in [0, 1].

    It cannot exceed 1 when per-example compute cost never rises with b (true of the affine curve:
    P·(t0 + t1·ceil(B/P)) ≥ t0 + t1·B; communication only adds). A piecewise profile whose throughput
    drops at large b (a cache spill) can predict a superlinear speedup, and then it exceeds 1. With
    ``straggler`` both sides carry the delays (one worker waits for its own only).
    """
    one = step_time(global_batch_size, 1, compute=compute, network=network, grad_bytes=grad_bytes,
                    overhead_s=overhead_s, straggler=straggler, sync_every=sync_every)
    many = step_time(global_batch_size, workers, compute=compute, network=network, grad_bytes=grad_bytes,
                     overhead_s=overhead_s, straggler=straggler, sync_every=sync_every)
    return one / (np.asarray(workers, dtype=np.float64) * many)


# ---------------------------------------------------------------------------------------------------------
# Grid and recommendation


@dataclass(frozen=True)
class Prediction:
    """One (B, P) configuration's predicted costs."""

    global_batch_size: int
    workers: int
    local_batch_size: int
    compute_s: float  # per step
    comm_s: float  # per step
    step_time_s: float
    time_per_pass_s: float
    passes: float
    time_to_accuracy_s: float
    efficiency: float

    @property
    def worker_seconds(self) -> float:
        """Cost of the configuration: P × time to accuracy."""
        return self.workers * self.time_to_accuracy_s


def predict_grid(batch_sizes: Iterable[int], workers: Iterable[int], *, n_train: int, compute: ComputeFit,
                 network: Network, grad_bytes: float, passes_min: float, batch_crit: float,
                 overhead_s: float = 0.0, straggler: StragglerSpec | None = None,
                 sync_every: int = 1, passes_factor: float = 1.0) -> list[Prediction]:
    """Predict every (B, P) with P ≤ B (a worker needs at least one example), ordered by B then P.

    ``straggler``, ``sync_every``: injected delays and local SGD's period (:func:`step_time`); the row's
    ``compute_s`` is then the expected compute a step waits for and ``comm_s`` the all-reduce over H.
    ``passes_factor``: local SGD's passes over synchronous SGD's at that H (:func:`local_sgd_passes_factor`),
    multiplying the passes of every row with P > 1 (one worker's local SGD is synchronous SGD: there is no other
    replica to drift from).
    """
    if not passes_factor > 0:
        raise ConfigError(f"passes_factor must be positive, got {passes_factor}")
    if n_train < 1 or grad_bytes < 0 or overhead_s < 0:
        raise ConfigError(f"predict_grid needs n_train >= 1, grad_bytes >= 0 and overhead_s >= 0, got "
                          f"{n_train}, {grad_bytes}, {overhead_s}")
    rows = []
    for b in sorted({int(v) for v in batch_sizes}):
        for p in sorted({int(v) for v in workers}):
            if b < 1 or p < 1:
                raise ConfigError(f"batch sizes and worker counts must be >= 1, got B={b}, P={p}")
            if p > b:
                continue
            comp = float(delayed_compute(compute(local_batch_size(b, p)), p, straggler=straggler,
                                         sync_every=sync_every))
            comm = float(allreduce_time(grad_bytes, p, network)) / sync_every
            step = comp + comm + overhead_s
            tpp = n_train / b * step
            passes = float(passes_to_accuracy(b, passes_min=passes_min, batch_crit=batch_crit)) * (
                passes_factor if p > 1 else 1.0)
            eff = float(efficiency(b, p, compute=compute, network=network, grad_bytes=grad_bytes,
                                   overhead_s=overhead_s, straggler=straggler, sync_every=sync_every))
            rows.append(Prediction(global_batch_size=b, workers=p, local_batch_size=int(local_batch_size(b, p)),
                                   compute_s=comp, comm_s=comm, step_time_s=step, time_per_pass_s=tpp,
                                   passes=passes, time_to_accuracy_s=tpp * passes, efficiency=eff))
    if not rows:
        raise ConfigError("no (B, P) configuration with P <= B; pass larger --batch-sizes or fewer workers")
    return rows


@dataclass(frozen=True)
class Recommendation:
    """The fastest configuration, and the cheapest one (fewest worker-seconds) within ``tolerance`` of it."""

    fastest: Prediction
    cheapest: Prediction
    tolerance: float


def recommend(table: Sequence[Prediction], tolerance: float = 0.10) -> Recommendation:
    """Pick the fastest row, then the row with the fewest worker-seconds whose time ≤ (1+tol)·fastest.

    Ties go to fewer workers, then the smaller batch.
    """
    if not table:
        raise ConfigError("recommend needs at least one prediction")
    if tolerance < 0:
        raise ConfigError(f"tolerance must be >= 0, got {tolerance}")
    fastest = min(table, key=lambda r: (r.time_to_accuracy_s, r.workers, r.global_batch_size))
    limit = fastest.time_to_accuracy_s * (1.0 + tolerance)
    near = [r for r in table if r.time_to_accuracy_s <= limit]
    cheapest = min(near, key=lambda r: (r.worker_seconds, r.workers, r.global_batch_size))
    return Recommendation(fastest=fastest, cheapest=cheapest, tolerance=tolerance)


def format_seconds(seconds: float) -> str:
    """``0.42 ms``, ``3.1 s``, ``12.0 min``, ``5.2 h``: short and unit-bearing."""
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def format_table(table: Sequence[Prediction]) -> str:
    """A fixed-width text table of predictions, one row per configuration."""
    head = (f"{'B':>7} {'P':>5} {'b':>6} {'compute/step':>13} {'comm/step':>10} {'time/pass':>10} "
            f"{'passes':>8} {'time to acc':>12} {'effic.':>7}")
    lines = [head, "-" * len(head)]
    for r in table:
        lines.append(f"{r.global_batch_size:>7} {r.workers:>5} {r.local_batch_size:>6} "
                     f"{format_seconds(r.compute_s):>13} {format_seconds(r.comm_s):>10} "
                     f"{format_seconds(r.time_per_pass_s):>10} {r.passes:>8.3g} "
                     f"{format_seconds(r.time_to_accuracy_s):>12} {r.efficiency:>7.2f}")
    return "\n".join(lines)


def format_recommendation(rec: Recommendation) -> str:
    f, c = rec.fastest, rec.cheapest
    return (f"fastest: B={f.global_batch_size} on P={f.workers} workers: "
            f"{format_seconds(f.time_to_accuracy_s)} to accuracy ({f.passes:.3g} passes, "
            f"{format_seconds(f.worker_seconds)} worker-time)\n"
            f"cheapest within {rec.tolerance:.0%} of fastest: B={c.global_batch_size} on P={c.workers} workers: "
            f"{format_seconds(c.time_to_accuracy_s)} to accuracy ({c.passes:.3g} passes, "
            f"{format_seconds(c.worker_seconds)} worker-time)")
