"""``scalesgd allreduce-bench``: time the communication strategies, nccl-tests style, against the link.

For every world size P one local job of P processes is started; inside it every strategy of
:mod:`scalesgd.comm` reduces buffers of each size. One row per (strategy, P, size) reports the median over
iterations of the slowest rank's time T (for small messages one iteration is the mean of a few
back-to-back calls), algbw = N/T and busbw = algbw·2(P−1)/P (the nccl-tests convention: busbw is what
each link carried, comparable with the link's own rate). In the same run the loopback TCP stream rate (a
plain socket sender/receiver pair of processes, the ceiling busbw can approach) and the TCP round-trip
time (a small ping-pong, the floor for a small message) are measured, and the ring cost model
T = 2(P−1)α + 2(P−1)/P·N·β is fitted per strategy; each row shows how well the fit
predicts it. Rows that our rings sent by recursive doubling (small messages when P is a power of two;
each row records the threshold that ran at its P) are modelled by that algorithm's cost with the same
α, β: log2(P)·(α + N·β).

The fit and the best-possible fit error are the performance model's (:mod:`scalesgd.perf_model`), so the
α and β printed here are the ones ``scalesgd predict`` would use.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from scalesgd.errors import ConfigError, DistributedError
from scalesgd.perf_model import allreduce_time_as_run as ring_time_s  # (N, P, α, β, threshold that ran)
from scalesgd.perf_model import best_max_rel_error, fit_alpha_beta

from scalesgd.comm_registry import CODECS, COMM_NAMES, TRANSPORTS

DEFAULT_STRATEGIES = (*TRANSPORTS, *CODECS)  # every transport, and every codec over the built-in all-reduce
# 4 KiB … 64 MiB, doubling (nccl-tests' usual sweep, cut to what a CPU box moves in a few minutes).
DEFAULT_SIZES = tuple(4096 << k for k in range(15))
QUICK_SIZES = (4096, 65536, 1 << 20, 8 << 20)
FIT_RANGE = (64 << 10, 64 << 20)  # sizes the memory-copy probe and the plot's fitted model cover

SLOW = 1.5  # a timing this many times its size's median counts as a stall
ROW_COLUMNS = ("strategy", "world_size", "size_bytes", "numel", "iters", "time_s", "time_min_s", "time_max_s",
               "time_mean_s", "slow_frac", "wrong", "exact", "algbw_GBps", "busbw_GBps", "bytes_sent",
               "doubling_max_bytes", "doubling_p2_bytes", "cost_model")


# ----------------------------------------------------------------------------------------------------------
# The α–β model
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# The link: loopback TCP stream rate and round trip, between two plain processes
# ----------------------------------------------------------------------------------------------------------


def _tcp_peer(port_queue: Any, n_pings: int, stream_bytes: int, repeats: int) -> None:
    """The other end: echo ``n_pings`` small messages, then swallow ``repeats`` streams and ack each."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port_queue.put(srv.getsockname()[1])
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            msg = bytearray(8)
            for _ in range(n_pings):
                view, got = memoryview(msg), 0
                while got < 8:
                    got += conn.recv_into(view[got:])
                conn.sendall(msg)
            buf = memoryview(bytearray(4 << 20))
            for _ in range(repeats):
                left = stream_bytes
                while left > 0:
                    left -= conn.recv_into(buf[:min(len(buf), left)])
                conn.sendall(b"k")


def measure_tcp_loopback(*, stream_bytes: int = 256 << 20, repeats: int = 3, n_pings: int = 2000,
                         timeout_s: float = 120.0) -> dict[str, float]:
    """Loopback TCP between two processes: stream rate (bytes/s, median of ``repeats`` streams, timed from
    the first byte sent to the receiver's acknowledgement) and round-trip time (median of ``n_pings``
    8-byte ping-pongs with Nagle off)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    peer = ctx.Process(target=_tcp_peer, args=(q, n_pings, stream_bytes, repeats), daemon=True)
    peer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while q.empty():
            if not peer.is_alive() or time.monotonic() > deadline:
                raise ConfigError("the TCP loopback probe process did not start; is 127.0.0.1 usable?")
            time.sleep(0.01)
        port = q.get()
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            msg, back = b"p" * 8, bytearray(8)
            rtts = []
            for _ in range(n_pings):
                t0 = time.perf_counter()
                s.sendall(msg)
                view, got = memoryview(back), 0
                while got < 8:
                    got += s.recv_into(view[got:])
                rtts.append(time.perf_counter() - t0)
            chunk = memoryview(bytearray(4 << 20))
            rates = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                left = stream_bytes
                while left > 0:
                    k = min(len(chunk), left)
                    s.sendall(chunk[:k])
                    left -= k
                s.recv(1)
                rates.append(stream_bytes / (time.perf_counter() - t0))
        return {"stream_bytes_per_s": float(statistics.median(rates)),
                "rtt_s": float(statistics.median(rtts[n_pings // 10:])),  # first pings warm the path up
                "stream_bytes": float(stream_bytes), "n_pings": float(n_pings)}
    finally:
        peer.join(timeout=10)
        if peer.is_alive():
            peer.kill()
            peer.join()


def measure_memcpy(sizes_bytes: Sequence[int], *, repeats: int = 15) -> dict[str, Any]:
    """This process's own memory copy (torch ``copy_`` of float32 buffers, one thread) at each size:
    ``{"sizes_bytes", "times_s", "bytes_per_s", "best_line_rel_error"}``.

    On one host a "link" is memory copies (a loopback TCP byte is copied into the kernel and out again), and
    a copy costs more per byte once the buffer spills a cache level. ``best_line_rel_error`` is how well any
    T = a + b·N fits these copy times (the minimax fit, as for the α–β model): when that is far above 20 %,
    the per-byte cost of the host itself changes over the sweep, and a one-β model of a transport bound by
    copies cannot fit the whole range either. Small sizes are timed as the mean of back-to-back copies.
    """
    import torch

    sizes = sorted({int(s) for s in sizes_bytes})
    if len(sizes) < 2 or sizes[0] < 4:
        raise ConfigError(f"the memory copy probe needs two or more sizes of at least 4 bytes, got {sizes}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.randn(sizes[-1] // 4)
        dst = torch.empty_like(src)
        times = []
        for size in sizes:
            a, b = src[:size // 4], dst[:size // 4]
            reps = max(1, min(64, (8 << 20) // size))
            b.copy_(a)
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(reps):
                    b.copy_(a)
                samples.append((time.perf_counter() - t0) / reps)
            times.append(float(statistics.median(samples)))
    finally:
        torch.set_num_threads(threads)
    return {"sizes_bytes": sizes, "times_s": times, "bytes_per_s": [s / t for s, t in zip(sizes, times)],
            "best_line_rel_error": best_max_rel_error(sizes, 2, times)}


# ----------------------------------------------------------------------------------------------------------
# The timed job
# ----------------------------------------------------------------------------------------------------------


def _bench_worker(rdv, strategies: Sequence[str], sizes_bytes: Sequence[int], iters: int, warmup: int,
                  backend: str, threads: int, seed: int, comm_options: dict[str, dict[str, Any]],
                  budget_s: float, pg_timeout_s: float, settle_s: float) -> dict[str, Any]:
    """One rank: for every size, ``warmup`` untimed rounds, then up to ``iters`` timed rounds; a round calls
    every strategy once (in an order rotated from round to round), so strategies are compared side by
    side under the same background load.

    Before each timing the rank busy-waits ``settle_s`` (a burst of gloo traffic can keep a small host busy
    for a few milliseconds after its last call returns; README, "Communication and scaling"), so that no
    strategy pays for the one timed before it. The pause spins, as a compute phase between two all-reduces
    would: after a sleep, idle virtual CPUs may halt and slow the next call.
    Then the buffer is refilled (its contents would otherwise grow P× per call; the few
    back-to-back calls of a small-message timing, :func:`calls_per_timing`, let it grow at most
    2^100-fold) and a tiny all-reduce lines the ranks up; that all-reduce also carries rank 0's decision to
    stop early once a size has used ``budget_s`` (at least 3 rounds are always made), so all ranks agree on the count.
    """
    import torch
    import torch.distributed as dist

    from scalesgd.comm import make_comm
    from scalesgd.distributed import init_world, shutdown_world

    torch.set_num_threads(threads)
    world = init_world(rdv, backend, timeout_s=pg_timeout_s)
    device = world.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    max_numel = max(sizes_bytes) // 4
    gen = torch.Generator().manual_seed(seed * 1000 + world.rank)
    source = torch.randn(max_numel, generator=gen).to(device)
    buffer = torch.empty_like(source)
    flag = torch.zeros(1, device=device)
    comms = {name: make_comm(name, world, generator=torch.Generator().manual_seed(seed * 1000 + 7 + world.rank),
                             **comm_options.get(name, {}))
             for name in strategies}
    checked = check_input(max_numel, world.rank, device)
    expected = expected_sum(max_numel, world.size, device)
    # Our rings send small messages by recursive doubling (P a power of two): the model must know up to where.
    out: dict[str, Any] = {"times": {}, "bytes_sent": {}, "wrong": {},
                           "doubling_max_bytes": {name: int(getattr(c, "doubling_max_bytes", 0))
                                                  for name, c in comms.items()},
                           "doubling_p2_bytes": {name: int(getattr(c, "small_bytes", 0)) for name, c in comms.items()}}
    if world.size > 1:
        out["p2p"] = _p2p_floor(world.rank, device)

    def lined_up_call(comm, x, y, stop: bool) -> tuple[float, int] | None:
        t_settle = time.perf_counter()
        while time.perf_counter() - t_settle < settle_s:
            pass
        y.copy_(x)
        flag.fill_(1.0 if stop else 0.0)
        if world.size > 1:
            dist.all_reduce(flag)
        if flag.item() > 0:
            return None
        reps = calls_per_timing(y.numel() * y.element_size(), world.size)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            stats = comm.allreduce_(y)
        sync()
        return (time.perf_counter() - t0) / reps, stats.bytes_sent

    try:
        for size in sizes_bytes:
            n = size // 4
            x, y = source[:n], buffer[:n]
            for name in strategies:
                out["times"][f"{name}/{size}"] = []
                for _ in range(warmup):
                    lined_up_call(comms[name], x, y, False)
                # Correctness, as nccl-tests' #wrong: one call on integer data, compared element by element.
                y.copy_(checked[:n])
                comms[name].allreduce_(y)
                out["wrong"][f"{name}/{size}"] = int((y != expected[:n]).sum().item())
            start = time.perf_counter()
            for it in range(iters):
                stop = world.rank == 0 and it >= 3 and time.perf_counter() - start > budget_s
                # Rotate the order every round: on a loaded host the call right after another strategy's
                # can be systematically slower, and no strategy should always sit in that seat.
                k = it % len(strategies)
                for name in list(strategies[k:]) + list(strategies[:k]):
                    res = lined_up_call(comms[name], x, y, stop)
                    if res is None:
                        break
                    out["times"][f"{name}/{size}"].append(res[0])
                    out["bytes_sent"][f"{name}/{size}"] = res[1]
                if res is None:
                    break
    finally:
        for comm in comms.values():
            comm.close()
        shutdown_world()
    return out


def check_input(numel: int, rank: int, device=None):
    """Rank ``rank``'s integer-valued float32 input for the correctness check: ((7i + 13r) mod 17) − 8, so
    any order of additions sums it exactly and every rank can write down the expected sum without the
    others' data (nccl-tests checks its results the same way)."""
    import torch

    i = torch.arange(numel, dtype=torch.int64, device=device)
    return ((7 * i + 13 * rank) % 17 - 8).to(torch.float32)


def expected_sum(numel: int, world_size: int, device=None):
    """Σ over ranks of :func:`check_input`: what every rank must hold after the all-reduce."""
    total = check_input(numel, 0, device)
    for r in range(1, world_size):
        total += check_input(numel, r, device)
    return total


def calls_per_timing(size_bytes: int, world_size: int = 2) -> int:
    """Back-to-back calls timed together (their mean is one sample), as nccl-tests times a loop of calls:
    32 up to 128 KB, halving to 1 at 4 MB. A single call after the lining-up all-reduce would partly
    measure how unevenly the ranks leave it (which can take as long as a whole small call), not
    the call; large calls are timed one by one. The buffer grows P-fold per call, so at most
    P^k ≤ 2^100 (float32 holds 2^127)."""
    k = max(1, min(32, (4 << 20) // max(int(size_bytes), 1)))
    return max(1, min(k, int(100 // math.log2(max(world_size, 2)))))


def _p2p_floor(rank: int, device, rounds: int = 300) -> dict[str, float]:
    """What the transport itself costs for a 4-byte message between ranks 0 and 1 (others wait at a barrier):
    median seconds of a blocking ping-pong (a round trip) and of a simultaneous isend/irecv exchange (what
    one step of an exchange-based all-reduce waits for). Any algorithm built on torch.distributed
    point-to-point calls pays at least this per message."""
    import torch
    import torch.distributed as dist

    mine, theirs = torch.ones(1, device=device), torch.empty(1, device=device)
    ping, exch = [], []
    if rank < 2:
        other = 1 - rank
        for i in range(rounds + 20):
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(mine, dst=1)
                dist.recv(theirs, src=1)
            else:
                dist.recv(theirs, src=0)
                dist.send(mine, dst=0)
            t1 = time.perf_counter()
            r = dist.irecv(theirs, src=other)
            w = dist.isend(mine, dst=other)
            r.wait()
            w.wait()
            t2 = time.perf_counter()
            if i >= 20:
                ping.append(t1 - t0)
                exch.append(t2 - t1)
    dist.barrier()
    return {"pingpong_s": statistics.median(ping), "exchange_s": statistics.median(exch)} if ping else {}


def default_threads(world_size: int) -> int:
    """Intra-op threads per worker: the cores shared out, at least one (oversubscription only adds noise)."""
    return max(1, (os.cpu_count() or 1) // world_size)


def run_allreduce_bench(strategies: Sequence[str], sizes_bytes: Sequence[int], world_sizes: Sequence[int],
                        iters: int = 30, warmup: int = 3, *, backend: str = "gloo", threads: int | None = None,
                        seed: int = 0, comm_options: dict[str, dict[str, Any]] | None = None,
                        budget_s_per_size: float = 8.0, timeout_s: float = 1800.0,
                        settle_s: float = 0.005) -> list[dict[str, Any]]:
    """Time every strategy on float32 buffers of every size with every world size.

    Args:
        strategies: names in :data:`scalesgd.comm_registry.COMM_NAMES`.
        sizes_bytes: buffer sizes N in bytes (multiples of 4; float32 elements).
        world_sizes: P values; one local job of P processes is started for each.
        iters: timed rounds per size (one call of every strategy each, interleaved), fewer once a size has
            used ``budget_s_per_size`` seconds (all strategies together).
        warmup: untimed calls first (they also allocate the strategies' scratch buffers).
        backend: ``gloo`` (CPU), ``nccl`` or ``auto``.
        threads: torch intra-op threads per worker (default: cores // P).
        comm_options: per-strategy options, e.g. ``{"qsgd": {"levels": 127}}``.
        timeout_s: bound on each job.
        settle_s: busy pause before each timing, so one strategy's after-effects stay out of the next one's.
    Returns:
        One dict per (strategy, P, size) with :data:`ROW_COLUMNS`: ``time_s`` is the median over calls of
        the slowest rank's time (``time_mean_s`` their mean, ``slow_frac`` the share at least
        :data:`SLOW` × the median: stalls; ``wrong`` the most elements any rank got wrong in a checked
        call on integer data, which must be 0 where ``exact``), ``algbw_GBps`` = N/T/1e9,
        ``busbw_GBps`` = algbw·2(P−1)/P, ``bytes_sent`` the most any rank sent per call.
    """
    from scalesgd.comm import strategy_info
    from scalesgd.distributed import spawn

    for name in strategies:
        if name not in COMM_NAMES:
            raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(COMM_NAMES)}")
    info = {name: strategy_info(name) for name in strategies}
    sizes = [int(s) for s in sizes_bytes]
    if not sizes or any(s < 4 or s % 4 for s in sizes):
        raise ConfigError(f"sizes must be positive multiples of 4 bytes (float32 buffers), got {sizes}")
    if not world_sizes or any(int(p) < 2 for p in world_sizes):
        raise ConfigError(f"world sizes must be >= 2 (an all-reduce of one process moves nothing), got "
                          f"{list(world_sizes)}")
    if iters < 1 or warmup < 0:
        raise ConfigError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    if not settle_s >= 0:
        raise ConfigError(f"the settle time before each timing must be >= 0, got {settle_s * 1e3:g} ms")
    rows: list[dict[str, Any]] = []
    for p in (int(p) for p in world_sizes):
        nthreads = threads if threads is not None else default_threads(p)
        per_rank = spawn(_bench_worker, p, (list(strategies), sizes, iters, warmup, backend, nthreads, seed,
                                            comm_options or {}, budget_s_per_size, min(timeout_s, 600.0),
                                            settle_s),
                         timeout_s=timeout_s)
        p2p = per_rank[0].get("p2p") or {}
        for name in strategies:
            for size in sizes:
                key = f"{name}/{size}"
                per_call = np.max(np.array([r["times"][key] for r in per_rank]), axis=0)  # slowest rank
                t = float(np.median(per_call))
                algbw = size / t / 1e9
                rows.append({"strategy": name, "world_size": p, "size_bytes": size, "numel": size // 4,
                             "iters": int(per_call.size), "time_s": t, "time_min_s": float(per_call.min()),
                             "time_max_s": float(per_call.max()), "time_mean_s": float(per_call.mean()),
                             "slow_frac": float(np.mean(per_call >= SLOW * t)), "algbw_GBps": algbw,
                             "wrong": int(max(r["wrong"][key] for r in per_rank)), "exact": info[name].exact,
                             "cost_model": info[name].cost_model,
                             "busbw_GBps": algbw * 2 * (p - 1) / p,
                             "bytes_sent": int(max(r["bytes_sent"][key] for r in per_rank)),
                             "doubling_max_bytes": per_rank[0]["doubling_max_bytes"][name],
                             "doubling_p2_bytes": per_rank[0]["doubling_p2_bytes"][name],
                             "threads": nthreads, "p2p_pingpong_s": p2p.get("pingpong_s"),
                             "p2p_exchange_s": p2p.get("exchange_s")})
    return rows


# ----------------------------------------------------------------------------------------------------------
# Fits, table
# ----------------------------------------------------------------------------------------------------------


def _fittable(rows: list[dict[str, Any]]) -> bool:
    """α and β can be told apart only with timings at two or more message sizes."""
    return len({r["size_bytes"] for r in rows}) >= 2


def _doubling(row: dict[str, Any]) -> int:
    """The row's recursive-doubling threshold, the one that ran at its P (rows written before the bench
    recorded it: none)."""
    return int(row.get("doubling_max_bytes") or 0)


def _fit_entry(rows: list[dict[str, Any]]) -> dict[str, Any]:
    alpha, beta = fit_alpha_beta([r["size_bytes"] for r in rows], [r["world_size"] for r in rows],
                                 [r["time_s"] for r in rows], doubling_max_bytes=[_doubling(r) for r in rows])
    return {"alpha_s": alpha, "beta_s_per_byte": beta,
            "bandwidth_GBps": (1.0 / beta / 1e9) if beta > 0 else None, "rows": len(rows)}


def add_fits(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fit α, β per strategy, twice: once over all its rows (every size and P, as the model intends: α and β
    are properties of the links) and once per world size (on one host the "links" are the CPUs the P
    processes share, so β grows with P). Writes each row's ``model_time_s``/``model_rel_err`` (pooled fit)
    and ``model_p_time_s``/``model_p_rel_err`` (its P's fit); rel_err = (model − measured)/measured.

    Returns:
        ``{strategy: {alpha_s, beta_s_per_byte, bandwidth_GBps, rows, by_world_size: {P: {…same…}}}}``.
    """
    fits: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == name]
        if not _fittable(mine):
            continue
        fits[name] = _fit_entry(mine)
        fits[name]["by_world_size"] = {}
        for r in mine:
            r["model_time_s"] = float(ring_time_s(r["size_bytes"], r["world_size"], fits[name]["alpha_s"],
                                                  fits[name]["beta_s_per_byte"], _doubling(r)))
            r["model_rel_err"] = (r["model_time_s"] - r["time_s"]) / r["time_s"]
        for p in dict.fromkeys(r["world_size"] for r in mine):
            at_p = [r for r in mine if r["world_size"] == p]
            if not _fittable(at_p):
                continue
            f = fits[name]["by_world_size"][p] = _fit_entry(at_p)
            for r in at_p:
                r["model_p_time_s"] = float(ring_time_s(r["size_bytes"], p, f["alpha_s"], f["beta_s_per_byte"],
                                                        _doubling(r)))
                r["model_p_rel_err"] = (r["model_p_time_s"] - r["time_s"]) / r["time_s"]
    return fits


def wrong_results(rows: list[dict[str, Any]]) -> list[str]:
    """One line per row where an exact strategy returned a wrong sum in its checked call."""
    return [f"{r['strategy']} P={r['world_size']} {_human(r['size_bytes'])}: {r['wrong']} of {r['numel']} elements "
            "differ from the sum" for r in rows if r.get("exact", True) and r.get("wrong")]


def _human(nbytes: int) -> str:
    for unit, k in (("MB", 20), ("KB", 10)):
        if nbytes >= 1 << k and nbytes % (1 << k) == 0:
            return f"{nbytes >> k} {unit}"
    return f"{nbytes} B"


def format_table(rows: list[dict[str, Any]], tcp: dict[str, float] | None = None,
                 fits: dict[str, dict[str, float]] | None = None, memcpy: dict[str, Any] | None = None) -> str:
    """nccl-tests-style text: one block per (strategy, P), then the link and the fits: what was measured
    (``bench/allreduce_targets.py`` judges it against the project's targets).
    (KB, MB are binary: 1 KB = 1024 bytes; GB/s are 1e9 bytes/s as in nccl-tests.)"""
    lines: list[str] = []
    if tcp:
        lines.append(f"# loopback TCP: stream {tcp['stream_bytes_per_s'] / 1e9:.3f} GB/s, "
                     f"round trip {tcp['rtt_s'] * 1e6:.1f} us")
    for p in dict.fromkeys(r["world_size"] for r in rows):
        r0 = next(r for r in rows if r["world_size"] == p)
        if r0.get("p2p_exchange_s"):
            ratio = f" = {r0['p2p_exchange_s'] / tcp['rtt_s']:.1f}x the TCP round trip" if tcp else ""
            lines.append(f"# torch.distributed point-to-point, 4 bytes, ranks 0-1 of the P={p} job: ping-pong "
                         f"{r0['p2p_pingpong_s'] * 1e6:.1f} us, isend/irecv exchange {r0['p2p_exchange_s'] * 1e6:.1f} us"
                         f"{ratio} (the floor of one message step of any algorithm built on it)")
    ceiling = tcp["stream_bytes_per_s"] / 1e9 if tcp else None
    groups = list(dict.fromkeys((r["strategy"], r["world_size"]) for r in rows))
    for name, p in groups:
        mine = [r for r in rows if r["strategy"] == name and r["world_size"] == p]
        lines.append("")
        lines.append(f"# strategy={name}  P={p}  threads/worker={mine[0].get('threads', '?')}")
        head = (f"#{'size(B)':>11} {'size':>7} {'iters':>5} {'time(us)':>11} {'algbw(GB/s)':>11} "
                f"{'busbw(GB/s)':>11} {'sent(B)':>11}")
        if ceiling:
            head += f" {'bus/tcp':>7}"
        head += f" {'model(us)':>11} {'err(%)':>7} {'errP(%)':>7} {'#wrong':>7}"
        lines.append(head)
        for r in mine:
            line = (f"{r['size_bytes']:>12} {_human(r['size_bytes']):>7} {r['iters']:>5} {r['time_s'] * 1e6:>11.1f} "
                    f"{r['algbw_GBps']:>11.3f} {r['busbw_GBps']:>11.3f} {r['bytes_sent']:>11}")
            if ceiling:
                line += f" {r['busbw_GBps'] / ceiling:>7.2f}"
            line += (f" {r['model_time_s'] * 1e6:>11.1f} {r['model_rel_err'] * 100:>+7.1f}" if "model_time_s" in r
                     else " " * 20)
            line += f" {r['model_p_rel_err'] * 100:>+7.1f}" if "model_p_rel_err" in r else " " * 8
            if "wrong" in r:
                line += f" {r['wrong'] if r.get('exact', True) else '(' + str(r['wrong']) + ')':>7}"
            lines.append(line)
        if mine and "slow_frac" in mine[0]:
            worst = max(mine, key=lambda r: r["slow_frac"])
            share = sum(r["slow_frac"] * r["iters"] for r in mine) / sum(r["iters"] for r in mine)
            lines.append(f"#   timings >= {SLOW:g}x their size's median (stalls): {share:.0%} of all, most at "
                         f"{_human(worst['size_bytes'])} ({worst['slow_frac']:.0%}; mean there "
                         f"{worst['time_mean_s'] / worst['time_s']:.2f}x the median)")
    if fits:
        lines.append("")
        lines.append("# ring cost model T = 2(P-1)a + 2(P-1)/P*N*b (log2(P)*(a + N*b) where recursive doubling ran), "
                     "relative least squares; model/err: one fit over all P, errP: a fit per P")
        for name, f in fits.items():
            for label, g in [("all P", f)] + [(f"P={p}", g) for p, g in f.get("by_world_size", {}).items()]:
                bw = "inf" if g["bandwidth_GBps"] is None else f"{g['bandwidth_GBps']:.3f}"
                lat = "inf" if g["beta_s_per_byte"] == 0 else f"{g['alpha_s'] / g['beta_s_per_byte'] / 1024:.0f} KB"
                lines.append(f"#   {name:<10} {label:<6} alpha = {g['alpha_s'] * 1e6:9.1f} us   "
                             f"beta = {g['beta_s_per_byte'] * 1e9:8.4f} ns/B  (1/beta = {bw} GB/s, "
                             f"alpha/beta = {lat})")
        lines.append("#   our rings switch from recursive doubling to the ring where the two costs cross, at "
                     "8*alpha/beta for P=4 (--comm-option STRATEGY.latency_bytes=alpha/beta sets it)")
    if memcpy:
        lines.append("")
        rates = memcpy["bytes_per_s"]
        lines.append("# this host's memory copy, one process (torch copy_), GB/s: " + ", ".join(
            f"{_human(s)} {r / 1e9:.1f}" for s, r in zip(memcpy["sizes_bytes"], rates)))
        lines.append(f"#   per-byte cost varies {max(rates) / min(rates):.2f}x over these sizes; the best line "
                     f"a + b*N through the copy times is off by {memcpy['best_line_rel_error']:.3f} somewhere")
    bad = wrong_results(rows)
    if bad:
        lines += [""] + [f"# WRONG RESULTS: {b}" for b in bad]
    elif any("wrong" in r for r in rows):
        lines.append("")
        lines.append("# results checked (integer data, every strategy, size and P): all exact strategies correct"
                     + ("; #wrong in parentheses: lossy strategies, for information" if any(
                         not r.get("exact", True) for r in rows) else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``4096``, ``4KB``, ``64MB``, ``1GB`` (binary multiples) → bytes."""
    t = text.strip().upper().replace("IB", "B")
    for suffix, k in (("GB", 30), ("MB", 20), ("KB", 10), ("G", 30), ("M", 20), ("K", 10), ("B", 0)):
        if t.endswith(suffix):
            num = t[:-len(suffix)].strip()
            break
    else:
        num, k = t, 0
    try:
        value = float(num) * (1 << k)
    except ValueError:
        raise ConfigError(f"cannot read size {text!r}; write e.g. 4096, 4KB or 64MB") from None
    if value <= 0 or value != int(value):
        raise ConfigError(f"size {text!r} must be a positive whole number of bytes")
    return int(value)


def parse_sizes(items: Sequence[str]) -> list[int]:
    """Sizes from the command line: single sizes, or ``LO:HI`` for LO, 2·LO, … ≤ HI."""
    sizes: list[int] = []
    for item in items:
        if ":" in item:
            lo, hi = (parse_size(x) for x in item.split(":", 1))
            s = lo
            while s <= hi:
                sizes.append(s)
                s *= 2
        else:
            sizes.append(parse_size(item))
    return sizes


def _parse_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        name, dot, opt = key.partition(".")
        if not (eq and dot and name and opt):
            raise ConfigError(f"--comm-option {item!r} must look like STRATEGY.KEY=VALUE, e.g. qsgd.levels=127")
        value: Any = {"true": True, "false": False}.get(raw.lower(), raw)
        for conv in (int, float) if isinstance(value, str) else ():
            try:
                value = conv(raw)
                break
            except ValueError:
                pass
        out.setdefault(name, {})[opt] = value
    import torch  # here: the TCP probe's peer process imports this module without torch

    from scalesgd.comm import make_comm
    from scalesgd.distributed import World

    alone = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    for name, opts in out.items():  # a bad option fails now, not in every worker after the TCP probe
        make_comm(name, alone, **opts).close()
    return out


def run_from_args(args: argparse.Namespace) -> int:
    """The ``allreduce-bench`` subcommand: measure, print the table, write ``--json``/``--plot``; exit code 0,
    or :class:`DistributedError` (non-zero exit) after writing them if any exact strategy summed wrongly."""
    sizes = parse_sizes(args.sizes) if args.sizes else list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    workers = args.workers or ([2] if args.quick else [2, 4])
    iters = args.iters if args.iters is not None else (5 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    options = _parse_options(args.comm_option or [])
    _check_output(args.json, "--json", (".json",))
    _check_output(args.plot, "--plot", (".png", ".pdf", ".svg"))
    if not args.settle_ms >= 0:
        raise ConfigError(f"--settle-ms must be >= 0 milliseconds, got {args.settle_ms}")
    tcp = measure_tcp_loopback(stream_bytes=(64 << 20) if args.quick else (256 << 20),
                               n_pings=500 if args.quick else 2000)
    in_fit_range = [s for s in sizes if FIT_RANGE[0] <= s <= FIT_RANGE[1]]
    memcpy = measure_memcpy(in_fit_range) if len(in_fit_range) >= 2 else None
    rows = run_allreduce_bench(args.strategies, sizes, workers, iters=iters, warmup=warmup, backend=args.backend,
                               threads=args.threads, seed=args.seed, comm_options=options,
                               budget_s_per_size=args.budget_s, timeout_s=args.timeout_s,
                               settle_s=args.settle_ms / 1e3)
    fits = add_fits(rows)
    print(format_table(rows, tcp, fits, memcpy))
    if args.plot:
        from scalesgd import plots

        drawn = plots.allreduce_bench(rows, Path(args.plot), stream_bytes_per_s=tcp.get("stream_bytes_per_s"),
                                      fit_range=FIT_RANGE)
        print(f"# plot: {drawn}")
    if args.json:
        from scalesgd.writer import write_json_atomic

        write_json_atomic(Path(args.json), {
            "config": {"strategies": list(args.strategies), "sizes_bytes": sizes, "world_sizes": workers,
                       "iters": iters, "warmup": warmup, "backend": args.backend, "comm_options": options,
                       "settle_ms": args.settle_ms,
                       "cpu_count": os.cpu_count()},
            "tcp": tcp, "memcpy": memcpy, "rows": rows, "fits": fits})
    if wrong_results(rows):
        raise DistributedError("an exact strategy returned a wrong sum (the WRONG RESULTS lines above name it); "
                               "the timings of a broken all-reduce mean nothing")
    return 0


def _check_output(path: str | None, flag: str, suffixes: tuple[str, ...]) -> None:
    """Refuse an output the run could not write, before minutes of measuring."""
    if path is None:
        return
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise ConfigError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: directory {out.parent} does not exist or is not writable; create it "
                          "or choose another path")
