"""Communication strategies: each one against an exact float64 reference, on 1 process and on 2–4 gloo ones.

Multi-process checks are batched: one job per world size runs every strategy on every awkward size and
returns digests and error summaries (launching processes costs seconds; reducing costs milliseconds).
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from scalesgd import ring_schedule as rs
from scalesgd.comm import (QSGDCodec, RingAllReduce, make_comm, qsgd_decode, qsgd_encode, scalar_sum,
                           strategy_info)
from scalesgd.comm_registry import CODECS, COMM_NAMES, TRANSPORTS
from scalesgd.distributed import World, all_reduce_scalars, init_world, shutdown_world, spawn
from scalesgd.errors import ConfigError

EXACT_STRATEGIES = ("allreduce", "ring", "ring-tcp", "ps")
QSGD_OVER = ("qsgd", "qsgd+ring", "qsgd+ring-tcp", "qsgd+ps")  # the codec over every transport
QSGD_CASES = (  # (levels, bucket_size, scale)
    (7, 512, "max"), (127, 64, "l2"), (1, 5, "l2"), (3, 1, "max"))


def _world(size: int, rank: int = 0, **facts) -> World:
    """A World for building strategies in one process (no process group)."""
    return World(rank=rank, size=size, local_rank=rank, device=torch.device("cpu"), backend="gloo", **facts)


def _reference_doubling_max(P: int, small_bytes: int, latency_bytes: float) -> float:
    """Where our rings should stop recursive doubling, from the costs themselves: ``small_bytes`` at P = 2,
    never when P is not a power of two, else the N where log2(P)·(α + N·β) = 2(P−1)α + 2(P−1)/P·N·β with
    α/β = ``latency_bytes``, found by bisection (doubling is cheaper below it)."""
    if P == 2:
        return float(small_bytes)
    if P & (P - 1) or small_bytes == 0:
        return 0.0
    beta = 1e-9
    alpha = latency_bytes * beta
    L = math.log2(P)

    def doubling_cheaper(n: float) -> bool:
        return L * (alpha + n * beta) < 2 * (P - 1) * alpha + 2 * (P - 1) / P * n * beta

    lo, hi = 0.0, 1.0
    while doubling_cheaper(hi):
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if doubling_cheaper(mid) else (lo, mid)
    return lo


def _sizes(p: int) -> list[int]:
    return sorted({0, 1, 2, p - 1, p, p + 1, 2 * p + 1, 1000, 65537, 1000003})


def _inputs(size: int, rank: int, integer: bool, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(size * 131 + rank * 7 + (1 if integer else 0))
    if integer:
        return torch.randint(-1000, 1000, (size,), generator=g).to(dtype)
    return (torch.randn(size, generator=g, dtype=torch.float64) * (rank + 1)).to(dtype)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _qsgd_reference(xs: list[torch.Tensor], levels: int, bucket_size: int, scale: str, seeds: list[int],
                    exact_tail: int) -> torch.Tensor:
    """What the distributed qsgd sum must be, bit for bit: every rank's own quantization, added in rank
    order, plus the verbatim tails added in rank order."""
    n = xs[0].numel()
    nq = n - exact_tail
    out = torch.zeros_like(xs[0])
    for x, seed in zip(xs, seeds):
        q = qsgd_encode(x[:nq], num_levels=levels, bucket_size=bucket_size, scale=scale,
                        generator=torch.Generator().manual_seed(seed))
        qsgd_decode(q, out=out[:nq])
        out[nq:] += x[nq:]
    return out


def _worker(rdv, n_draws: int) -> dict:
    """One job per world size: the exact strategies, qsgd over every transport, the input contract."""
    torch.set_num_threads(1)
    world = init_world(rdv, "gloo", timeout_s=60)
    try:
        return {"exact": _exactness_checks(world), "qsgd": _qsgd_checks(world, n_draws),
                "contract": _contract_checks(world)}
    finally:
        shutdown_world()


def _exactness_checks(world) -> dict:
    """Every strategy on every size, random and integer data; returns digests and worst errors."""
    P, r = world.size, world.rank
    out: dict = {"digest": {}, "rel_err": {}, "int_exact": {}, "bytes": {}, "doubling_max_bytes": {}}
    comms = {name: make_comm(name, world) for name in EXACT_STRATEGIES}
    comms["ring_small_chunks"] = make_comm("ring", world, chunk_bytes=4096, small_bytes=0)
    comms["ring-tcp_small_chunks"] = make_comm("ring-tcp", world, chunk_bytes=4096, small_bytes=0)
    # Sends and receives on process groups of their own (the default only where cores suffice), and not.
    comms["ring_split"] = make_comm("ring", world, split_directions=True)
    comms["ring_split_small_chunks"] = make_comm("ring", world, chunk_bytes=4096, small_bytes=0,
                                                 split_directions=True)
    comms["ring_one_group"] = make_comm("ring", world, split_directions=False)
    out["split_groups_made_at_build"] = comms["ring_split"]._edge_groups is not None
    out["doubling_max_bytes"] = {name: getattr(c, "doubling_max_bytes", 0) for name, c in comms.items()}
    for size in _sizes(P):
        for integer in (False, True):
            xs = [_inputs(size, p, integer) for p in range(P)]
            ref = torch.stack([x.double() for x in xs]).sum(0) if size else torch.zeros(0, dtype=torch.float64)
            # Round-off bound of any order of P − 1 float32 additions.
            tol = (P - 1) * 2.0 ** -24 * torch.stack([x.double().abs() for x in xs]).sum(0) if size else ref
            for name, comm in comms.items():
                buf = xs[r].clone()
                stats = comm.allreduce_(buf, exact_tail=min(3, size))
                key = f"{name}/{size}/{'int' if integer else 'float'}"
                out["digest"][key] = _digest(buf)
                out["bytes"][key] = stats.bytes_sent
                if integer:
                    out["int_exact"][key] = bool(torch.equal(buf.double(), ref))
                else:
                    excess = (buf.double() - ref).abs() - tol
                    out["rel_err"][key] = float(excess.max()) if size else -1.0
    # float64 buffers and back-to-back calls with shrinking sizes reuse the scratch buffers safely
    for name, comm in comms.items():
        for size in (5000, 17):
            xs = [_inputs(size, p, True, torch.float64) for p in range(P)]
            buf = xs[r].clone()
            comm.allreduce_(buf)
            out["int_exact"][f"{name}/{size}/f64"] = bool(torch.equal(buf, sum(xs)))
    # a few float64 scalars through the strategy (scalar_sum) equal the engine's all-reduce of them, bit for bit
    values = [r + 0.5, 2.0 ** -30 * (r + 1), 7.0, -3.25 * r]
    reference = all_reduce_scalars(values, world)
    for name, comm in comms.items():
        out["int_exact"][f"{name}/scalar_sum"] = scalar_sum(comm, world)(values) == reference
    out["edge_groups"] = {name: len(comms[name]._edge_groups) for name in ("ring_split", "ring_one_group")}
    for comm in comms.values():
        comm.close()
    out["closed"] = {"ring_split": comms["ring_split"]._edge_groups is None,
                     "ring-tcp": not comms["ring-tcp"].mesh.socks}
    return out


def _qsgd_checks(world, n_draws: int) -> dict:
    """qsgd: the distributed sum equals the locally recomputed one bit for bit; and ``n_draws`` draws for
    the unbiasedness check."""
    P, r = world.size, world.rank
    out: dict = {"digest": {}, "matches_reference": {}, "within_roundoff": {}, "tail_exact": {}, "bytes": {},
                 "draws": None}
    transports = {name: make_comm(name, world) for name in EXACT_STRATEGIES}
    for name in QSGD_OVER:
        transport = transports[name.partition("+")[2] or "allreduce"]
        for levels, bucket_size, scale in QSGD_CASES:
            for size, tail in ((0, 0), (1, 0), (3, 3), (P + 1, 1), (1001, 2), (4099, 0), (20011, 5)):
                seeds = [1000 * levels + 17 * p + size for p in range(P)]
                comm = make_comm(name, world, generator=torch.Generator().manual_seed(seeds[r]),
                                 levels=levels, bucket_size=bucket_size, scale=scale)
                xs = [_inputs(size, p, False) for p in range(P)]
                for x in xs:  # an integer-valued tail, so "exact" can be checked with ==
                    x[size - tail:] = torch.arange(tail, dtype=x.dtype) * 3 + 1
                buf = xs[r].clone()
                stats = comm.allreduce_(buf, exact_tail=tail)
                key = f"{name}/{levels}/{bucket_size}/{scale}/{size}/{tail}"
                out["digest"][key] = _digest(buf)
                # what the transport alone reports for a buffer of this size: what travels when the decoded
                # values are summed by it
                plain = transport.allreduce_(xs[r].clone(), exact_tail=tail).bytes_sent
                out["bytes"][key] = (stats.bytes_sent, comm.payload_bytes(size, tail, 4) if size else 0, plain)
                ref = _qsgd_reference(xs, levels, bucket_size, scale, seeds, tail)
                out["matches_reference"][key] = bool(torch.equal(buf, ref))
                # any order of P − 1 float32 additions of the quantizations is within this of their exact sum
                parts = [_qsgd_reference([x], levels, bucket_size, scale, [seed], tail).double()
                         for x, seed in zip(xs, seeds)]
                exact = sum(parts) if size else torch.zeros(0, dtype=torch.float64)
                tol = (P - 1) * 2.0 ** -24 * sum(q.abs() for q in parts) if size else exact
                out["within_roundoff"][key] = bool(((buf.double() - exact).abs() <= tol).all())
                out["tail_exact"][key] = bool(torch.equal(buf[size - tail:], sum(x[size - tail:] for x in xs)))
    for comm in transports.values():
        comm.close()
    if n_draws:
        size = 700  # one full bucket of 512 and a partial one
        comm = make_comm("qsgd", world, generator=torch.Generator().manual_seed(5 + r),
                         levels=2, bucket_size=512, scale="l2")
        x = _inputs(size, r, False)
        draws = torch.empty(n_draws, size, dtype=torch.float64)
        for k in range(n_draws):
            buf = x.clone()
            comm.allreduce_(buf)
            draws[k] = buf.double()
        out["draws"] = draws if r == 0 else None
    return out


CONTRACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64)


def _contract_checks(world) -> dict:
    """Every strategy on every dtype, on a contiguous buffer and on a strided view (``base[::2]``): the exact
    ones must give what ``torch.distributed.all_reduce`` gives on a contiguous copy (integer-valued data in
    [−8, 8], so every dtype sums it exactly in any order), codecs the same as on a contiguous buffer with
    the same seed; or refuse with a ConfigError. Returns ``{(name, dtype, layout): outcome}``."""
    import torch.distributed as dist

    P, r = world.size, world.rank
    n = 3001
    out: dict = {}
    comms = {name: make_comm(name, world, generator=torch.Generator().manual_seed(11 + r)) for name in COMM_NAMES}
    twins = {name: make_comm(name, world, generator=torch.Generator().manual_seed(11 + r))
             for name in COMM_NAMES if not strategy_info(name).exact}  # the same draws, for the contiguous copy
    for dtype in CONTRACT_DTYPES:
        x = (((torch.arange(n) * 7 + 13 * r) % 17) - 8).to(dtype)
        expected = x.clone()
        dist.all_reduce(expected)
        for name, comm in comms.items():
            for layout in ("contiguous", "strided"):
                key = f"{name}/{str(dtype).removeprefix('torch.')}/{layout}"
                base = torch.full((2 * n,), 99, dtype=dtype)
                base[::2] = x
                buf = x.clone() if layout == "contiguous" else base[::2]
                try:
                    comm.allreduce_(buf, exact_tail=3)
                except ConfigError as e:
                    out[key] = f"refused: {e}"
                    continue
                except Exception as e:  # noqa: BLE001 - anything else is the failure this test looks for
                    out[key] = f"crash: {type(e).__name__}: {e}"
                    continue
                if layout == "strided" and not bool((base[1::2] == 99).all()):
                    out[key] = "wrote outside the view"
                elif strategy_info(name).exact:
                    out[key] = "ok" if torch.equal(buf, expected) else "wrong sum"
                elif layout == "strided":
                    ref = x.clone()
                    twins[name].allreduce_(ref, exact_tail=3)
                    out[key] = "ok" if torch.equal(buf, ref) else "differs from the contiguous buffer's"
                else:
                    twins[name].allreduce_(x.clone(), exact_tail=3)  # keep the twin's draws in step
                    tail_ok = torch.equal(buf[-3:], expected[-3:])
                    out[key] = "ok" if tail_ok and torch.isfinite(buf.double()).all() else "tail not exact"
    for comm in [*comms.values(), *twins.values()]:
        comm.close()
    return out


def _analytic_coord_variance(v: torch.Tensor, levels: int, bucket_size: int, scale: str) -> torch.Tensor:
    """Var Q(v)ᵢ = (σ/s)²·pᵢ(1 − pᵢ), pᵢ = frac(s|vᵢ|/σ): Q(v)ᵢ takes one of two neighbouring levels."""
    nb = -(-v.numel() // bucket_size)
    padded = torch.zeros(nb * bucket_size, dtype=torch.float64)
    padded[:v.numel()] = v.double()
    b = padded.view(nb, bucket_size)
    sigma = b.abs().amax(1) if scale == "max" else b.norm(dim=1)
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    x = b.abs() / safe[:, None] * levels
    frac = x - x.floor()
    return ((safe / levels) ** 2)[:, None] * frac * (1 - frac)  # (n_buckets, bucket_size)


def _analytic_qsgd_variance(v: torch.Tensor, levels: int, bucket_size: int, scale: str) -> torch.Tensor:
    """E‖Q(v) − v‖² per bucket."""
    return _analytic_coord_variance(v, levels, bucket_size, scale).sum(1)


def _qsgd_bound(v: torch.Tensor, levels: int, bucket_size: int) -> torch.Tensor:
    """min(d/s², √d/s)·‖v‖² per bucket (Alistarh et al. 2017, Lemma 3.1), d the bucket's true length."""
    out = []
    for start in range(0, v.numel(), bucket_size):
        b = v[start:start + bucket_size].double()
        d = b.numel()
        out.append(min(d / levels ** 2, math.sqrt(d) / levels) * float(b @ b))
    return torch.tensor(out, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------------
# Single process
# ------------------------------------------------------------------------------------------------------------


def test_registry_names_and_errors():
    assert {"allreduce", "ring", "ps", "qsgd"} <= set(COMM_NAMES)
    with pytest.raises(ConfigError, match="unknown communication strategy"):
        make_comm("nope", _world(1))
    for bad in ({"levels": 0}, {"levels": 128}, {"bucket_size": 0}, {"scale": "mean"}):
        with pytest.raises(ConfigError):
            make_comm("qsgd", _world(1), **bad)
    with pytest.raises(ConfigError, match="chunk_bytes"):
        make_comm("ring", _world(2), chunk_bytes=0)
    with pytest.raises(ConfigError, match="rank"):
        make_comm("ring", World(rank=2, size=2, local_rank=0, device=torch.device("cpu"), backend="gloo"))
    with pytest.raises(ConfigError, match="exact_tail"):
        make_comm("ring", _world(1)).allreduce_(torch.zeros(3), exact_tail=4)
    with pytest.raises(ConfigError, match="split_directions=True .*default group"):
        RingAllReduce(_world(2), group=object(), split_directions=True)
    with pytest.raises(ConfigError, match="split_directions must be true, false or unset"):
        make_comm("ring", _world(2), split_directions="maybe")
    with pytest.raises(ConfigError, match="'ring' cannot take the options nope=1"):
        make_comm("ring", _world(2), nope=1)
    with pytest.raises(ConfigError, match="'ps' cannot take the options chunk_bytes=4096"):
        make_comm("ps", _world(2), chunk_bytes=4096)
    with pytest.raises(ConfigError, match="'qsgd\\+ring' cannot take the options timeout_s=1"):
        make_comm("qsgd+ring", _world(2), timeout_s=1)
    with pytest.raises(ConfigError, match="ring-tcp moves cpu tensors .* device is cuda"):
        make_comm("qsgd+ring-tcp", World(rank=0, size=1, local_rank=0, device=torch.device("cuda"), backend="nccl"))


def test_comm_auto_resolves_to_an_exact_strategy_that_serves_the_device():
    from scalesgd.comm_registry import resolve_comm
    from scalesgd.config import RunConfig

    assert RunConfig().comm == "auto"
    cases = {("gloo", "cpu", 2): "ring-tcp", ("gloo", "cpu", 8): "ring-tcp", ("gloo", "cpu", 1): "allreduce",
             ("nccl", "cuda", 4): "allreduce", ("gloo", "cuda", 2): "allreduce"}
    for (backend, device, size), want in cases.items():
        got = resolve_comm("auto", backend=backend, device_type=device, world_size=size)
        assert got == want, (backend, device, size)
        assert device in strategy_info(got).devices and strategy_info(got).exact
    for name in COMM_NAMES:  # a named strategy is never replaced
        assert resolve_comm(name, backend="nccl", device_type="cuda", world_size=4) == name
    with pytest.raises(ConfigError, match="unknown communication strategy"):
        make_comm("auto", _world(1))  # resolved by the trainer, never built by that name


def test_every_strategy_describes_itself():
    """Each name is a transport, a codec over the built-in, or a codec over another transport; its class
    declares exact/devices/options, and the declared options are exactly its constructor's keywords."""
    import inspect

    assert COMM_NAMES == (*TRANSPORTS, *CODECS, *(f"{c}+{t}" for c in CODECS for t in TRANSPORTS if t != "allreduce"))
    for name in COMM_NAMES:
        info = strategy_info(name)
        assert info.exact == ("qsgd" not in name), name
        assert info.devices == (("cpu",) if "ring-tcp" in name else ("cpu", "cuda")), name
        comm = make_comm(name, _world(1))
        assert comm.name == name and comm.exact == info.exact and set(comm.options) == set(info.options)
        comm.close()
    for cls in [type(make_comm(t, _world(1))) for t in TRANSPORTS] + [QSGDCodec]:
        params = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                  if p.kind == p.KEYWORD_ONLY and k not in ("group", "generator")}
        assert params == {k: o.default for k, o in cls.options.items()}, cls.__name__
    # options a job holds for every strategy reach only the strategies that take them
    from scalesgd.comm import comm_settings

    job = {"levels": 3, "timeout_s": 9.0}
    assert comm_settings("qsgd", **job) == {"levels": 3} and comm_settings("ring", **job) == {}
    assert comm_settings("ring-tcp", **job) == {"timeout_s": 9.0} and comm_settings("qsgd+ring-tcp", **job) == job


@pytest.mark.parametrize("P", [2, 3, 4, 8, 16, 64, 1024])
def test_doubling_threshold_is_where_the_two_costs_cross(P):
    """The runtime's switch from recursive doubling to the ring, against the costs solved by bisection."""
    for small, latency in ((256 << 10, 80 << 10), (64 << 10, 192 << 10), (1 << 20, 1000.0), (0, 80 << 10)):
        ref = _reference_doubling_max(P, small, latency)
        ring = RingAllReduce(_world(P), small_bytes=small, latency_bytes=latency)
        assert abs(ring.doubling_max_bytes - ref) <= 1 + 1e-9 * ref, (P, small, latency)
        assert abs(rs.doubling_max_bytes(P, small, latency) - ref) <= 1 + 1e-9 * ref


@pytest.mark.parametrize("P", range(2, 10))
def test_ring_edges_next_to_each_other_travel_on_different_groups(P):
    """What a rank sends (edge r → r+1) and what it receives (edge r−1 → r) never share a process group:
    two colours for an even ring, three for an odd one."""
    ring = make_comm("ring", _world(P), split_directions=True)
    colours = [ring._ring_colour(r) for r in range(P)]
    assert all(colours[r] != colours[r - 1] for r in range(P)), colours
    assert set(colours) == (set(range(2)) if P % 2 == 0 else set(range(3)))
    # auto: split only when every local worker has a core (the extra I/O threads crowd shared cores)
    cores = 4
    assert make_comm("ring", _world(P, local_size=cores, cpu_count=cores)).split_directions
    assert not make_comm("ring", _world(P, local_size=cores + 1, cpu_count=cores)).split_directions


@pytest.mark.parametrize("name", ["ring", "ps"])
def test_one_process_is_identity(name):
    comm = make_comm(name, _world(1))
    x = torch.randn(101)
    buf = x.clone()
    assert comm.allreduce_(buf, exact_tail=2).bytes_sent == 0
    assert torch.equal(buf, x)


def test_qsgd_one_process_quantizes_gradient_part_and_keeps_tail():
    g = torch.Generator().manual_seed(3)
    comm = make_comm("qsgd", _world(1), generator=g, levels=3, bucket_size=8)
    x = torch.randn(30)
    buf = x.clone()
    assert comm.allreduce_(buf, exact_tail=4).bytes_sent == 0
    assert torch.equal(buf[26:], x[26:])
    ref = qsgd_decode(qsgd_encode(x[:26], num_levels=3, bucket_size=8, scale="max",
                                  generator=torch.Generator().manual_seed(3)))
    assert torch.equal(buf[:26], ref)
    # every coordinate is one of the bucket's 2s + 1 levels
    for start in range(0, 26, 8):
        b, q = x[start:start + 8][:26 - start], buf[start:start + 8][:26 - start]
        steps = q / (b.abs().max() / 3)
        assert torch.allclose(steps, steps.round(), atol=1e-5) and steps.abs().max() <= 3 + 1e-5


@pytest.mark.parametrize("levels,bucket_size,scale", [(1, 512, "l2"), (2, 64, "l2"), (7, 512, "max"),
                                                      (7, 16, "l2"), (127, 512, "max")])
def test_qsgd_codec_unbiased_and_within_variance_bound(levels, bucket_size, scale):
    """E[Q(v)] = v and E‖Q(v) − v‖² per bucket equals Σ(σ/s)²p(1−p) ≤ min(d/s², √d/s)·‖v‖²."""
    g = torch.Generator().manual_seed(levels * 1000 + bucket_size)
    v = torch.randn(3 * bucket_size + bucket_size // 3, dtype=torch.float64, generator=g)
    v[:bucket_size] *= torch.linspace(0, 4, bucket_size, dtype=torch.float64)  # uneven magnitudes
    v = v.float()
    n_draws = 3000
    draws = torch.stack([qsgd_decode(qsgd_encode(v, num_levels=levels, bucket_size=bucket_size, scale=scale,
                                                 generator=g)).double() for _ in range(n_draws)])
    err = draws - v.double()  # (n_draws, d)
    # unbiased: every coordinate's mean error is within 5 (analytic) standard errors; the slack covers
    # float32 round-off for coordinates that sit on a level and never move
    sd = _analytic_coord_variance(v, levels, bucket_size, scale).view(-1)[:v.numel()].sqrt()
    assert (err.mean(0).abs() <= 5 * sd / math.sqrt(n_draws) + 1e-5).all()
    # variance: the empirical per-bucket E‖Q(v) − v‖² matches the analytic value, which obeys the bound
    nb = -(-v.numel() // bucket_size)
    padded = torch.zeros(n_draws, nb * bucket_size, dtype=torch.float64)
    padded[:, :v.numel()] = err
    empirical = (padded.view(n_draws, nb, bucket_size) ** 2).sum(2)  # (n_draws, nb)
    analytic = _analytic_qsgd_variance(v, levels, bucket_size, scale)
    se = empirical.std(0) / math.sqrt(n_draws)
    assert ((empirical.mean(0) - analytic).abs() <= 5 * se + 1e-9).all()
    assert (analytic <= _qsgd_bound(v, levels, bucket_size) * (1 + 1e-9)).all()


def test_qsgd_zero_bucket_and_payload_size():
    g = torch.Generator().manual_seed(0)
    v = torch.zeros(20)
    v[10:] = torch.randn(10)
    q = qsgd_encode(v, num_levels=7, bucket_size=10, scale="l2", generator=g)
    dec = qsgd_decode(q)
    assert torch.equal(dec[:10], torch.zeros(10)) and torch.isfinite(dec).all()
    c4 = QSGDCodec(_world(2), levels=7, bucket_size=512)
    c8 = QSGDCodec(_world(2), levels=127, bucket_size=512)
    # 4-bit codes: 8x smaller than float32 up to the per-bucket scale
    assert c4.payload_bytes(1 << 20, 0, 4) == (1 << 19) + 4 * (1 << 11)
    # 8-bit codes, the last bucket zero-padded to 512 codes, 2048 scales and the 2-element tail
    assert c8.payload_bytes(1 << 20, 2, 4) == (1 << 20) + 4 * (2048 + 2)


# ------------------------------------------------------------------------------------------------------------
# 2, 3 and 4 gloo processes
# ------------------------------------------------------------------------------------------------------------


DRAWS = {2: 1500, 3: 200, 4: 200}  # qsgd draws per job for the unbiasedness check


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda p: f"P{p}")
def job(request):
    """One gloo job per world size, shared by the tests below: (P, results by rank)."""
    P = request.param
    return P, spawn(_worker, P, (DRAWS[P],), timeout_s=200)


@pytest.mark.spawn
@pytest.mark.timeout(240)
def test_exact_strategies_match_reference_and_agree_bitwise(job):
    P, results = job
    results = [r["exact"] for r in results]
    r0 = results[0]
    # our rings double up to where the costs cross (P = 3: never), unless turned off
    def reference(name):
        options = strategy_info(name).options
        return _reference_doubling_max(P, options["small_bytes"].default, options["latency_bytes"].default)

    assert set(r0["doubling_max_bytes"]) == {"allreduce", "ps", "ring_small_chunks", "ring-tcp_small_chunks",
                                             "ring_split_small_chunks", "ring", "ring_split", "ring_one_group",
                                             "ring-tcp"}
    for name, got in r0["doubling_max_bytes"].items():
        ref = 0 if name in ("allreduce", "ps") or "small_chunks" in name else reference(name.partition("_")[0])
        assert abs(got - ref) <= 1, (name, got, ref)
    for key in r0["digest"]:
        assert all(r["digest"][key] == r0["digest"][key] for r in results), f"ranks differ: {key}"
    for key in r0["rel_err"]:
        assert all(r["rel_err"][key] <= 0 for r in results), f"beyond float round-off: {key}"
    for key in r0["int_exact"]:
        assert all(r["int_exact"][key] for r in results), f"integer sum not exact: {key}"
    for key in r0["bytes"]:
        name, size, _ = key.split("/")
        total = sum(r["bytes"][key] for r in results)
        doubling = int(size) * 4 <= r0["doubling_max_bytes"][name]
        if doubling:  # recursive doubling: every rank sends log2(P)·N
            assert total == P * (P.bit_length() - 1) * int(size) * 4, key
        elif name != "allreduce":  # the ring and the star move exactly 2(P−1)·N in total
            assert total == 2 * (P - 1) * int(size) * 4, key
        if name.startswith("ring-tcp"):  # the same additions in the same order as over torch.distributed
            assert r0["digest"][key] == r0["digest"][key.replace("ring-tcp", "ring", 1)], key
        if name in ("ring_split", "ring_one_group"):  # which groups carry the bytes changes no addition
            assert r0["digest"][key] == r0["digest"][key.replace(name, "ring", 1)], key
        if name == "ring_split_small_chunks":
            assert r0["digest"][key] == r0["digest"][key.replace(name, "ring_small_chunks", 1)], key
    assert r0["edge_groups"] == {"ring_split": 2 if P % 2 == 0 else 3, "ring_one_group": 1}
    assert r0["split_groups_made_at_build"]  # a collective while every rank builds, not inside a first call
    assert r0["closed"] == {"ring_split": True, "ring-tcp": True}  # close() frees the groups and the sockets


@pytest.mark.spawn
@pytest.mark.timeout(240)
def test_qsgd_distributed_sum_is_bitwise_the_sum_of_quantizations(job):
    P, results = job
    results = [r["qsgd"] for r in results]
    r0 = results[0]
    for key in r0["digest"]:
        name = key.split("/")[0]
        assert all(r["digest"][key] == r0["digest"][key] for r in results), f"ranks differ: {key}"
        assert all(r["tail_exact"][key] for r in results), f"tail not exact: {key}"
        assert all(r["within_roundoff"][key] for r in results), f"not the sum of the quantizations: {key}"
        for r in results:
            sent, payload, plain = r["bytes"][key]
            if name == "qsgd":  # the packed codes are all-gathered: (P − 1) copies of the message
                assert r["matches_reference"][key], f"not the rank-order sum of the quantizations: {key}"
                assert sent == (P - 1) * payload, key
            else:  # the decoded values travel as floats: what the transport sends for this buffer
                assert sent == plain, key


@pytest.mark.spawn
@pytest.mark.timeout(240)
def test_qsgd_distributed_sum_is_unbiased_within_the_variance_bound(job):
    P, results = job
    n_draws = DRAWS[P]
    size = 700
    true = sum(_inputs(size, p, False).double() for p in range(P))
    draws = results[0]["qsgd"]["draws"]  # (n_draws, size)
    # The mean over draws of the quantized sum converges to the true sum ...
    sd = sum(_analytic_coord_variance(_inputs(size, p, False), 2, 512, "l2").view(-1)[:size]
             for p in range(P)).sqrt()
    assert ((draws.mean(0) - true).abs() <= 5 * sd / math.sqrt(n_draws) + 1e-5).all()
    # ... and its variance is the sum of the ranks' variances, each within the QSGD bound.
    err2 = ((draws - true) ** 2).sum(1)  # (n_draws,)
    bound = sum(float(_qsgd_bound(_inputs(size, p, False), 2, 512).sum()) for p in range(P))
    analytic = sum(float(_analytic_qsgd_variance(_inputs(size, p, False), 2, 512, "l2").sum())
                   for p in range(P))
    assert abs(float(err2.mean()) - analytic) <= 5 * float(err2.std()) / math.sqrt(n_draws)
    assert analytic <= bound


# ------------------------------------------------------------------------------------------------------------
# ring-tcp: a dead or silent peer ends the call with an error, never a hang
# ------------------------------------------------------------------------------------------------------------


def _tcp_failure_worker(rdv) -> str:
    import time

    from scalesgd.errors import DistributedError

    torch.set_num_threads(1)
    world = init_world(rdv, "gloo", timeout_s=60)
    try:
        silent = make_comm("ring-tcp", world, timeout_s=1.0)
        gone = make_comm("ring-tcp", world, timeout_s=30.0)
        if world.rank == 1:
            gone.close()  # hangs up without a word; never calls `silent`
            time.sleep(2.5)
            return "peer"
        out = []
        for comm, size in ((silent, 100), (gone, 100), (gone, 1 << 20)):
            t0 = time.perf_counter()
            try:
                comm.allreduce_(torch.ones(size))
                out.append("no error")
            except DistributedError as e:
                out.append(f"{time.perf_counter() - t0:.1f}s: {e}")
        return "\n".join(out)
    finally:
        shutdown_world()


@pytest.mark.spawn
@pytest.mark.timeout(120)
def test_ring_tcp_names_a_silent_or_vanished_peer():
    report = spawn(_tcp_failure_worker, 2, (), timeout_s=90)[0].splitlines()
    assert "no progress" in report[0] and "rank 1" in report[0] and float(report[0].split("s:")[0]) < 5
    assert all("closed its TCP connection" in line for line in report[1:]), report


@pytest.mark.spawn
@pytest.mark.timeout(240)
def test_every_strategy_takes_every_dtype_and_layout_or_refuses_clearly(job):
    P, results = job
    outcomes = results[0]["contract"]
    assert len(outcomes) == len(COMM_NAMES) * len(CONTRACT_DTYPES) * 2
    for r in results:
        for key, outcome in r["contract"].items():
            name, dtype, _ = key.split("/")
            if not strategy_info(name).exact and dtype.startswith("int"):
                # a codec quantizes floats: an integer buffer is refused in one line that says what to use
                assert outcome.startswith("refused: ") and "floating-point" in outcome and "\n" not in outcome, key
            else:
                assert outcome == "ok", f"{key}: {outcome}"
