"""Communication strategies: how the workers' gradient buffers become their sum.

Every strategy follows :class:`scalesgd.comm_protocol.CommStrategy`, like PyTorch DDP's comm hooks: it
takes the rank's buffer (the local gradient contributions followed by a short tail of exact statistics
such as the local loss sum) and replaces it, in place, with the sum over all ranks. A strategy is a
*transport* (the built-in all-reduce, our rings, the parameter-server star), optionally behind a *codec*
that compresses the gradient part first (QSGD), in the shape of DDP's ``fp16_compress_wrapper(hook)``; the
last ``exact_tail`` elements are always reduced exactly, so loss, accuracy and diversity statistics are
never distorted by a codec.

Names (:data:`scalesgd.comm_registry.COMM_NAMES`) are resolved by :func:`make_comm`; what each strategy is
(exact or lossy, devices, options) is read from its class by :func:`strategy_info`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from scalesgd import distributed
from scalesgd import ring_schedule as rs
from scalesgd.comm_protocol import CommStats, CommStrategy, Option, RingTransport, Transport
from scalesgd.comm_registry import CODECS, DEFAULT_TRANSPORT, TRANSPORTS, parse_comm_name
from scalesgd.distributed import World
from scalesgd.errors import ConfigError

__all__ = ["BuiltinAllReduce", "CommInfo", "CommStats", "CommStrategy", "Compressed", "Option",
           "ParameterServerAllReduce", "QSGDCodec", "QuantizedBuckets", "RingAllReduce", "comm_settings",
           "make_comm", "qsgd_decode", "qsgd_encode", "qsgd_error_variance", "strategy_info"]


# --------------------------------------------------------------------------------------------------------------
# The registry: names -> classes, and what each strategy says about itself
# --------------------------------------------------------------------------------------------------------------


def _load(ref: str) -> type:
    module, _, cls = ref.partition(":")
    return getattr(importlib.import_module(module), cls)


@dataclass(frozen=True)
class CommInfo:
    """What a ``--comm`` name is, read from its classes' attributes (nothing is built).

    ``exact``: False when a codec makes the sum an estimate. ``devices``: device types it moves.
    ``options``: every keyword option it takes (codec's and transport's). ``cost_model``: "ring", "star"
    or "all-gather" (which α–β formula describes it). ``doubling_p2_bytes``: its default recursive-doubling
    size at P = 2 (0: it never goes by recursive doubling).
    """

    name: str
    exact: bool
    devices: tuple[str, ...]
    options: dict[str, Option]
    cost_model: str
    doubling_p2_bytes: int


def _classes(name: str) -> tuple[type | None, type]:
    codec, transport = parse_comm_name(name)
    return (_load(CODECS[codec]) if codec else None), _load(TRANSPORTS[transport])


def strategy_info(name: str) -> CommInfo:
    """The description of the strategy ``name`` (:class:`ConfigError` for an unknown name)."""
    codec, transport = _classes(name)
    doubling = transport.options["small_bytes"].default if transport.recursive_doubling else 0
    cost_model = transport.cost_model
    if codec is not None and hasattr(transport, "all_gather_bytes"):
        cost_model, doubling = "all-gather", 0  # compressed bytes are all-gathered, not summed by the transport
    return CommInfo(name=name, exact=transport.exact and codec is None, devices=transport.devices,
                    options={**(codec.options if codec else {}), **transport.options}, cost_model=cost_model,
                    doubling_p2_bytes=int(doubling))


def comm_settings(name: str, **settings: Any) -> dict[str, Any]:
    """The subset of ``settings`` that strategy ``name`` takes as options: a caller holding job-wide settings
    (e.g. the trainer's ``levels`` and ``timeout_s``) passes them all and each strategy gets its own."""
    options = strategy_info(name).options
    return {k: v for k, v in settings.items() if k in options}


def make_comm(name: str, world: World, *, generator: torch.Generator | None = None, **options) -> CommStrategy:
    """Build the communication strategy ``name`` for this rank.

    Args:
        name: one of :data:`scalesgd.comm_registry.COMM_NAMES`, e.g. ``ring``, ``qsgd``, ``qsgd+ring-tcp``.
        world: this process's place in the job and its machine's facts (cores, local workers, address).
        generator: randomness for a codec, seeded from (seed, rank) by the caller.
        options: the strategy's options (:func:`strategy_info` lists them), e.g. ``levels`` for ``qsgd``.
    Raises:
        ConfigError: unknown name, an option the strategy does not take or a bad value, a device it does not
            serve.
    Strategies that connect peers (``ring-tcp``, the split ``ring``) do so here: every rank builds its
    strategy at the same point. Call ``close()`` when done.
    """
    codec_cls, transport_cls = _classes(name)
    info = strategy_info(name)
    unknown = [k for k in options if k not in info.options]
    if unknown:
        given = ", ".join(f"{k}={options[k]!r}" for k in unknown)
        raise ConfigError(f"communication strategy {name!r} cannot take the options {given}; its options are "
                          f"{', '.join(info.options) or 'none'}")
    if world.device.type not in info.devices:
        raise ConfigError(f"--comm {name} moves {'/'.join(info.devices)} tensors and this worker's device is "
                          f"{world.device.type}; use --comm allreduce or ring")
    try:
        # The codec first: it holds nothing, while a transport may already have connected its peers.
        codec = None if codec_cls is None else codec_cls(
            world, generator=generator, **{k: v for k, v in options.items() if k in codec_cls.options})
        transport = transport_cls(world, **{k: v for k, v in options.items() if k in transport_cls.options})
    except TypeError as e:  # a value of the wrong type
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise ConfigError(f"communication strategy {name!r} cannot take the options {given}: {e}; give each "
                          "option a value of the type its class documents") from e
    return transport if codec is None else Compressed(codec, transport)


# --------------------------------------------------------------------------------------------------------------
# Transports. Each one sums in place and leaves bit-identical buffers on every rank.
# --------------------------------------------------------------------------------------------------------------


def scalar_sum(comm: CommStrategy, world: World) -> Callable[[list[float]], list[float]]:
    """``total(values) -> values summed over ranks`` (float64): a few numbers, such as a loss and some timings.

    Through ``comm`` when it is one of our exact rings (every rank gets the same bytes; on CPU ring-tcp's round
    trips cost tens of µs where a gloo collective costs about a millisecond on a small host), else the engine's
    all-reduce (:func:`scalesgd.distributed.all_reduce_scalars`, the reference the tests compare it with).
    Collective: every rank calls ``total`` with as many values at the same point.
    """
    if not isinstance(comm, RingTransport) or world.device.type != "cpu":
        return lambda values: distributed.all_reduce_scalars(values, world)

    def ring_sum(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)  # (len(values),)
        comm.allreduce_(t)
        return t.tolist()

    return ring_sum


class BuiltinAllReduce(Transport):
    """The engine's own all-reduce (gloo on CPU, NCCL on GPU): ``dist.all_reduce(buffer, SUM)``.

    Args:
        world: this process's place in ``group`` (the default group when None).
    """

    name = "allreduce"
    options: dict[str, Option] = {}

    def __init__(self, world: World, *, group=None):
        self.world_size = world.size
        self.rank = world.rank
        self.group = group

    def _allreduce_flat_(self, buffer: torch.Tensor, exact_tail: int) -> CommStats:
        if self.world_size > 1:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        # A ring all-reduce sends 2(P-1)/P of the buffer from each rank.
        sent = 2 * (self.world_size - 1) * buffer.numel() * buffer.element_size() // max(self.world_size, 1)
        return CommStats(bytes_sent=sent)

    def all_gather_bytes(self, payload: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``payload`` (1-D uint8, the same length everywhere), in rank order."""
        gathered = [torch.empty_like(payload) for _ in range(self.world_size)]
        dist.all_gather(gathered, payload, group=self.group)
        return gathered

class RingAllReduce(RingTransport):
    """Bandwidth-optimal ring all-reduce over torch.distributed point-to-point sends, following
    :mod:`scalesgd.ring_schedule`: a reduce-scatter then an all-gather, T = 2(P−1)α + 2(P−1)/P·N·β
    (baidu-research/baidu-allreduce; Sergeev & Del Balso, arXiv 1802.05799).

    Pipelining: every segment is cut into sub-chunks of about ``chunk_bytes``; a sub-chunk is forwarded to
    the right the moment it has been received and added, so the addition of one sub-chunk overlaps the
    transfer of the next, and the receives of step g + 1 are posted before step g is consumed.
    Bit-identical results: each segment is summed by one chain of additions in ring order and then copied
    verbatim to everyone, so all ranks hold the same bytes (the order differs from the built-in all-reduce,
    hence agreement with it only to float round-off).

    Small messages go by recursive doubling instead when P is a power of two (log2(P) exchanges instead of
    the ring's 2(P−1) latency-bound steps): at P = 2 up to ``small_bytes`` (the two send the same bytes
    there, and the ring's pipelined additions win above a size measured with ``allreduce-bench``), at larger
    P up to where the α–β costs of the two cross, ``latency_bytes``·(2(P−1) − log2 P)/(log2 P − 2(P−1)/P)
    (:func:`scalesgd.ring_schedule.doubling_max_bytes`, the rule the performance model prices).

    Each direction of a link on its own connection: the edge r → right travels on a process group of its
    own colour (:func:`scalesgd.ring_schedule.ring_colour`), different from the colour of the edge
    left → r, so what a rank sends and what it receives never share a socket or a transport thread (a gloo
    process group serves all its sockets from one I/O thread, and NCCL queues one communicator's sends and
    receives on one stream). Two groups do it for even P (which also splits every recursive-doubling
    exchange), three for odd P. The extra I/O threads need cores of their own, hence the default rule below.

    Args:
        world: this process's place in ``group`` (the default group when None), and its machine's facts.
        chunk_bytes: sub-chunk size for pipelining; smaller overlaps more but costs a message each.
        small_bytes: recursive doubling up to this size at P = 2; 0 turns recursive doubling off.
        latency_bytes: α/β of the links, the message size that takes as long to move as one message's
            latency (``allreduce-bench`` prints it for each strategy); sets the switch for P ≥ 4. The
            default is gloo's on a small host (README, "Communication and scaling").
        split_directions: send and receive on different process groups (above). None (default): split when
            ``group`` is the default group and either the backend is NCCL (where one communicator's receive
            would hold up its send behind it on one stream) or every local worker has a core
            (``world.local_size <= world.cpu_count``). The groups are made by every rank of the default
            group together, when the strategy is built if the process group is up, else at the first call;
            so True needs ``group=None``. :meth:`close` destroys them.
    """

    name = "ring"
    recursive_doubling = True
    DOUBLING_P2_BYTES = rs.DOUBLING_P2_BYTES  # the default small_bytes
    options = {
        "chunk_bytes": Option(int, 4 << 20, "sub-chunk size in bytes for pipelining"),
        "small_bytes": Option(int, rs.DOUBLING_P2_BYTES, "recursive doubling up to this size at P = 2 (0: off)"),
        "latency_bytes": Option(float, 192 << 10, "alpha/beta of the links: sets the doubling switch for P >= 4"),
        "split_directions": Option(bool, None, "send and receive on process groups of their own (unset: auto)"),
    }

    def __init__(self, world: World, *, group=None, chunk_bytes: int = 4 << 20,
                 small_bytes: int = rs.DOUBLING_P2_BYTES, latency_bytes: float = 192 << 10,
                 split_directions: bool | None = None):
        world_size, rank = world.size, world.rank
        rs.check_ring_options(world_size, rank, chunk_bytes, small_bytes, latency_bytes)
        if split_directions not in (None, True, False):
            raise ConfigError(f"ring split_directions must be true, false or unset (auto), got {split_directions!r}")
        if split_directions and group is not None:
            raise ConfigError("ring split_directions=True makes its process groups from the default group; "
                              "pass group=None, or split_directions=False with a group of your own")
        up = dist.is_available() and dist.is_initialized()
        if split_directions is None:
            split_directions = group is None and ((up and "nccl" in str(dist.get_backend()))
                                                  or world.core_per_local_worker)
        self.split_directions = bool(split_directions) and world_size > 1
        self._edge_groups: list | None = None
        self.small_bytes = int(small_bytes)
        self.latency_bytes = float(latency_bytes)
        # The largest message this rank sends by recursive doubling (0: never, e.g. P not a power of two).
        self.doubling_max_bytes = rs.doubling_max_bytes(world_size, self.small_bytes, self.latency_bytes)
        self.world_size = world_size
        self.rank = rank
        self.group = group
        self.chunk_bytes = int(chunk_bytes)
        self._scratch: torch.Tensor | None = None  # receive buffers, reused between calls
        self._plans: dict[tuple[int, int], tuple] = {}
        self._peer = (lambda q: q) if group is None else (lambda q: dist.get_global_rank(group, q))
        self._right, self._left = self._peer((rank + 1) % world_size), self._peer((rank - 1) % world_size)
        if self.split_directions and up:
            self._group_of_edge(0)  # now, while every rank builds its strategy, not inside a timed first call

    def close(self) -> None:
        """Destroy the process groups this strategy made (local: no collective, so a rank that fails can close
        its strategy without waiting for the others)."""
        made = self._edge_groups if self.split_directions else None
        self._edge_groups = None
        if made and dist.is_available() and dist.is_initialized():
            for g in made:
                dist.destroy_process_group(g)

    def _plan(self, n: int, esize: int) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]], int]:
        """:func:`scalesgd.ring_schedule.plan`, cached: a trainer reduces the same bucket sizes every step."""
        key = (n, esize)
        plan = self._plans.get(key)
        if plan is None:
            plan = rs.plan(n, esize, self.world_size, self.chunk_bytes)
            if len(self._plans) > 64:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _scratch_for(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        s = self._scratch
        if s is None or s.numel() < numel or s.dtype != like.dtype or s.device != like.device:
            s = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._scratch = s
        return s[:numel]

    def _group_of_edge(self, colour: int):
        """The process group that carries edges of ``colour`` (``group`` itself when directions are not
        split). The split groups are made by every rank together, at the first call at the latest."""
        if self._edge_groups is None:
            if self.split_directions:
                count = 2 if self.world_size % 2 == 0 else 3
                self._edge_groups = [dist.new_group(group_desc=f"scalesgd_ring_dir{k}") for k in range(count)]
            else:
                self._edge_groups = [self.group]
        return self._edge_groups[colour % len(self._edge_groups)]

    def _ring_colour(self, sender: int) -> int:
        return rs.ring_colour(sender, self.world_size)

    def _ring_(self, buffer: torch.Tensor) -> CommStats:
        """Reduce-scatter then all-gather, chunked and pipelined (see the class docstring)."""
        P, r = self.world_size, self.rank
        n, esize = buffer.numel(), buffer.element_size()
        segs, chunks, stride = self._plan(n, esize)
        seg_len = -(-n // P)
        # Receive areas for alternate reduce-scatter steps, so step g + 1 can land while step g is added.
        areas = min(2, P - 1)
        scratch = self._scratch_for(areas * seg_len, buffer).view(areas, seg_len)
        right, left = self._right, self._left
        n_steps = 2 * (P - 1)
        send_group = self._group_of_edge(rs.ring_colour(r, P))
        recv_group = self._group_of_edge(rs.ring_colour((r - 1) % P, P))

        def post_recvs(step: int) -> list:
            seg = rs.recv_segment(r, step, P)
            start0 = segs[seg][0]
            area = scratch[step % areas]
            return [dist.irecv(area[a - start0:b - start0] if rs.is_reduce_step(step, P) else buffer[a:b],
                               src=left, group=recv_group, tag=step * stride + c)
                    for c, (a, b) in enumerate(chunks[seg])]

        # Receives first: gloo's TCP transport sends a message only once the peer has posted its receive.
        recvs = post_recvs(0)
        sends = [dist.isend(buffer[a:b], dst=right, group=send_group, tag=c)
                 for c, (a, b) in enumerate(chunks[rs.send_segment(r, 0, P)])]
        done: list = []
        for step in range(n_steps):
            nxt = post_recvs(step + 1) if step + 1 < n_steps else []
            for w in done:  # the previous step's sends: at most two steps of sends in flight
                w.wait()
            done, sends = sends, []
            seg = rs.recv_segment(r, step, P)
            start0 = segs[seg][0]
            area = scratch[step % areas]
            for c, (a, b) in enumerate(chunks[seg]):
                recvs[c].wait()
                chunk = buffer[a:b]
                if rs.is_reduce_step(step, P):
                    torch.add(chunk, area[a - start0:b - start0], out=chunk)
                if step + 1 < n_steps:
                    # What was just completed is exactly what step + 1 passes on.
                    sends.append(dist.isend(chunk, dst=right, group=send_group, tag=(step + 1) * stride + c))
            recvs = nxt
        for w in done + sends:
            w.wait()
        return CommStats(bytes_sent=rs.ring_bytes_sent(segs, r, esize))

    def _recursive_doubling_(self, buffer: torch.Tensor) -> CommStats:
        """Latency-optimal all-reduce for small buffers, P a power of two (Thakur et al. 2005): at each step
        of :func:`scalesgd.ring_schedule.doubling_steps` exchange partials with the partner and add the
        lower rank's first, so partners hold the same bytes after every step. Sends log2(P)·N bytes."""
        other = self._scratch_for(buffer.numel(), buffer)
        steps = rs.doubling_steps(self.rank, self.world_size)
        for k, (partner, partner_first) in enumerate(steps):
            peer = self._peer(partner)
            recv = dist.irecv(other, src=peer, group=self._group_of_edge(rs.doubling_colour(partner, self.rank)),
                              tag=1 << 20 | 1 << k)
            send = dist.isend(buffer, dst=peer, group=self._group_of_edge(rs.doubling_colour(self.rank, partner)),
                              tag=1 << 20 | 1 << k)
            recv.wait()
            send.wait()
            if partner_first:
                torch.add(other, buffer, out=buffer)
            else:
                torch.add(buffer, other, out=buffer)
        return CommStats(bytes_sent=len(steps) * buffer.numel() * buffer.element_size())


class ParameterServerAllReduce(Transport):
    """The parameter-server baseline: every worker sends its buffer to rank 0, which sums and sends it back.

    Rank 0 adds the contributions in rank order (``buffer_0 + buffer_1 + … + buffer_{P-1}``) and sends the
    same bytes to everyone, so all ranks end bit-identical. It is a star: rank 0 receives and sends
    (P−1)·N bytes while the others send N, so its link is the bottleneck and T ≈ 2(P−1)·N·β, against
    2(P−1)/P·N·β for the ring — the gap the ring all-reduce closes.

    Args:
        world: this process's place in ``group`` (the default group when None).
    """

    name = "ps"
    cost_model = "star"
    options: dict[str, Option] = {}

    def __init__(self, world: World, *, group=None):
        if world.size < 1 or not 0 <= world.rank < world.size:
            raise ConfigError(f"parameter server needs 0 <= rank < world_size, got rank={world.rank}, "
                              f"world_size={world.size}")
        self.world_size = world.size
        self.rank = world.rank
        self.group = group
        self._scratch: torch.Tensor | None = None  # rank 0's receive buffers, reused between calls

    def _peer(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _allreduce_flat_(self, buffer: torch.Tensor, exact_tail: int) -> CommStats:
        P = self.world_size
        n = buffer.numel()
        if P == 1 or n == 0:
            return CommStats(bytes_sent=0)
        nbytes = n * buffer.element_size()
        if self.rank != 0:
            # Posting the receive at once is safe: rank 0 answers only after it has all of our buffer.
            send = dist.isend(buffer, dst=self._peer(0), group=self.group)
            recv = dist.irecv(buffer, src=self._peer(0), group=self.group)
            send.wait()
            recv.wait()
            return CommStats(bytes_sent=nbytes)
        s = self._scratch
        if s is None or s.numel() < (P - 1) * n or s.dtype != buffer.dtype or s.device != buffer.device:
            s = self._scratch = torch.empty((P - 1) * n, dtype=buffer.dtype, device=buffer.device)
        parts = s[:(P - 1) * n].view(P - 1, n)
        recvs = [dist.irecv(parts[i], src=self._peer(i + 1), group=self.group) for i in range(P - 1)]
        for i, w in enumerate(recvs):
            w.wait()
            torch.add(buffer, parts[i], out=buffer)
        sends = [dist.isend(buffer, dst=self._peer(i), group=self.group) for i in range(1, P)]
        for w in sends:
            w.wait()
        return CommStats(bytes_sent=(P - 1) * nbytes)


# --------------------------------------------------------------------------------------------------------------
# The QSGD codec, and a codec over any transport
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedBuckets:
    """A QSGD-encoded vector: signed integer levels in [−s, s] and one non-negative scale per bucket."""

    levels: torch.Tensor  # (n_buckets, bucket_size) int8, zero-padded past ``numel``
    scales: torch.Tensor  # (n_buckets,) in the original dtype
    numel: int
    num_levels: int


def qsgd_encode(values: torch.Tensor, *, num_levels: int, bucket_size: int, scale: str,
                generator: torch.Generator) -> QuantizedBuckets:
    """Unbiased stochastic quantization of ``values`` to ``num_levels`` levels per sign, bucket by bucket.

    For a bucket v with scale σ (‖v‖₂ for ``scale="l2"`` as in QSGD, ‖v‖∞ for ``"max"``) each coordinate
    becomes σ·sign(vᵢ)·ℓᵢ/s with ℓᵢ = ⌊s·|vᵢ|/σ + u⌋, u ~ U[0, 1): the lower or upper neighbouring level
    with the probabilities that make E[Q(v)] = v. Its variance obeys (Alistarh et al. 2017, "QSGD",
    arXiv 1610.02132, Lemma 3.1) E‖Q(v) − v‖² ≤ min(d/s², √d/s)·‖v‖² for a bucket of d coordinates;
    with σ = ‖v‖∞ ≤ ‖v‖₂ the same bound holds and is usually far from tight.

    Args:
        values: 1-D float tensor.
        num_levels: s ≥ 1 (at most 127, so the signed level fits an int8).
        bucket_size: coordinates per bucket (the last bucket is zero-padded; zeros quantize to 0 exactly).
        scale: ``"max"`` or ``"l2"``.
        generator: the only source of randomness.
    """
    n = values.numel()
    n_buckets = -(-n // bucket_size)
    padded = torch.zeros(n_buckets * bucket_size, dtype=values.dtype, device=values.device)
    padded[:n] = values
    v = padded.view(n_buckets, bucket_size)  # (n_buckets, bucket_size)
    mag = v.abs()
    scales = mag.amax(dim=1) if scale == "max" else torch.linalg.vector_norm(v, dim=1)  # (n_buckets,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    u = torch.rand(v.shape, generator=generator, dtype=values.dtype, device=generator.device).to(values.device)
    # ℓ = ⌊u + |v|·s/σ⌋, signed; the clamp only guards against |v|·s/σ rounding a hair above s.
    x = torch.addcmul(u, mag, (num_levels / safe)[:, None], out=u).floor_().clamp_(max=num_levels)
    levels = x.copysign_(v).to(torch.int8)
    return QuantizedBuckets(levels=levels, scales=scales, numel=n, num_levels=num_levels)


def qsgd_error_variance(values: torch.Tensor, *, num_levels: int, bucket_size: int, scale: str) -> float:
    """E‖Q(v) − v‖², the variance :func:`qsgd_encode` adds to ``values``, exactly (it needs no draw).

    A coordinate with x = s·|vᵢ|/σ between the levels ℓ = ⌊x⌋ and ℓ + 1 becomes ℓ + 1 with probability
    x − ℓ, so its variance is (ℓ + 1 − x)(x − ℓ)·(σ/s)², the variance of stochastic rounding (Alistarh et
    al. 2017, Lemma 3.1's proof). Summed in float64.

    Args:
        values: 1-D float tensor; num_levels, bucket_size, scale: as for :func:`qsgd_encode`.
    Returns:
        The expected squared error, in the squared units of ``values``.
    """
    n = values.numel()
    if n == 0:
        return 0.0
    n_buckets = -(-n // bucket_size)
    padded = torch.zeros(n_buckets * bucket_size, dtype=torch.float64, device=values.device)
    padded[:n] = values
    v = padded.view(n_buckets, bucket_size)
    mag = v.abs()
    scales = mag.amax(dim=1) if scale == "max" else torch.linalg.vector_norm(v, dim=1)  # (n_buckets,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    x = (mag * (num_levels / safe)[:, None]).clamp_(max=num_levels)
    frac = x - x.floor()
    per_bucket = (frac * (1 - frac)).sum(dim=1) * (scales / num_levels) ** 2
    return float(per_bucket.sum())


def qsgd_decode(q: QuantizedBuckets, out: torch.Tensor | None = None) -> torch.Tensor:
    """σ·ℓ/s per coordinate, as a flat tensor of ``q.numel`` elements (added into ``out`` when given)."""
    step = (q.scales / q.num_levels)[:, None]  # (n_buckets, 1)
    # A product then a sum, each rounded once by IEEE rules (no fused multiply-add, whose use varies with
    # the CPU's kernels): every rank decodes to the same bits whatever machine it runs on.
    dec = q.levels.to(q.scales.dtype).mul_(step).view(-1)[:q.numel]
    if out is None:
        return dec
    return torch.add(out, dec, out=out)


def _pack_levels(levels: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Levels as bytes on the wire: two 4-bit codes per byte when s ≤ 7, else one int8 per level."""
    flat = levels.view(-1)
    if num_levels > 7:
        return flat.view(torch.uint8)
    codes = (flat + 8).to(torch.uint8)  # in [1, 15]
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 8)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_levels(packed: torch.Tensor, count: int, num_levels: int) -> torch.Tensor:
    if num_levels > 7:
        return packed.view(torch.int8)[:count]
    both = torch.stack([packed & 15, packed >> 4], dim=1).view(-1)[:count]
    return both.to(torch.int8) - 8


class QSGDCodec:
    """QSGD as a codec: unbiased stochastic quantization of a rank's gradient part (:func:`qsgd_encode`),
    and its wire format.

    Wire format per rank (:meth:`pack`): one scale per bucket, the raw exact tail, then the levels (4 bits
    each when s ≤ 7, else 8 bits). Defaults: ``levels=7`` fills a 4-bit code (sign + 3 bits), about 8×
    smaller than float32 with 512-coordinate buckets (Alistarh et al. use 4 bits with buckets of 512 for
    ImageNet models), and ``scale="max"``, whose variance on Gaussian buckets of 512 is about 4% of ‖v‖²
    (the worst case is ≤ min(d/s², √d/s)·‖v‖² either way, 3.2·‖v‖² here). ``levels=127`` (8-bit codes,
    4× smaller than float32) brings it to about 0.01%.

    Args:
        world: this process's place in the job (its rank seeds the default generator).
        generator: randomness for the rounding; seed it from (seed, rank). Defaults to a generator seeded
            with the rank.
        levels: s, quantization levels per sign, 1 … 127.
        bucket_size: coordinates sharing one scale.
        scale: ``"max"`` (‖v‖∞) or ``"l2"`` (‖v‖₂, as in the paper).
    Raises:
        ConfigError: a bad option, or (at call time) a buffer that is not floating point.
    """

    name = "qsgd"
    exact = False
    options = {
        "levels": Option(int, 7, "s, quantization levels per sign, 1..127"),
        "bucket_size": Option(int, 512, "coordinates sharing one scale"),
        "scale": Option(str, "max", "bucket scale: max (L-infinity) or l2"),
    }

    def __init__(self, world: World, *, generator: torch.Generator | None = None, levels: int = 7,
                 bucket_size: int = 512, scale: str = "max"):
        if not 1 <= int(levels) <= 127:
            raise ConfigError(f"qsgd levels must be an integer in 1..127 (an int8 code), got {levels}")
        if int(bucket_size) < 1:
            raise ConfigError(f"qsgd bucket_size must be a positive number of coordinates, got {bucket_size}")
        if scale not in ("max", "l2"):
            raise ConfigError(f"qsgd scale must be 'max' or 'l2', got {scale!r}")
        self.levels = int(levels)
        self.bucket_size = int(bucket_size)
        self.scale = scale
        self.generator = generator if generator is not None else torch.Generator().manual_seed(world.rank)

    def check_input(self, buffer: torch.Tensor) -> None:
        if not buffer.dtype.is_floating_point:
            raise ConfigError(f"--comm qsgd quantizes floating-point gradients, got a {buffer.dtype} buffer; "
                              "sum integer buffers with an exact strategy (allreduce, ring, ring-tcp, ps)")

    def encode(self, values: torch.Tensor) -> QuantizedBuckets:
        return qsgd_encode(values, num_levels=self.levels, bucket_size=self.bucket_size, scale=self.scale,
                           generator=self.generator)

    def error_variance(self, values: torch.Tensor) -> float:
        """E‖Q(values) − values‖² of this codec's quantization (:func:`qsgd_error_variance`)."""
        return qsgd_error_variance(values, num_levels=self.levels, bucket_size=self.bucket_size, scale=self.scale)

    def payload_bytes(self, numel: int, exact_tail: int, element_size: int) -> int:
        """Bytes of :meth:`pack`'s output for a buffer of ``numel`` elements."""
        nq = numel - exact_tail
        n_buckets = -(-nq // self.bucket_size)
        level_bytes = n_buckets * self.bucket_size
        if self.levels <= 7:
            level_bytes = (level_bytes + 1) // 2
        return level_bytes + (n_buckets + exact_tail) * element_size

    def pack(self, q: QuantizedBuckets, tail: torch.Tensor) -> torch.Tensor:
        """One rank's message as 1-D uint8: scales and tail first, so their byte offsets stay aligned for the
        dtype view on the way back, then the packed levels."""
        return torch.cat([q.scales.view(torch.uint8), tail.contiguous().view(torch.uint8),
                          _pack_levels(q.levels, self.levels)])

    def unpack_add_(self, message: torch.Tensor, buffer: torch.Tensor, exact_tail: int) -> None:
        """Decode one rank's :meth:`pack` message and add it into ``buffer`` (gradient part and tail)."""
        n = buffer.numel()
        nq = n - exact_tail
        esize = buffer.element_size()
        n_buckets = -(-nq // self.bucket_size)
        scales = message[:n_buckets * esize].view(buffer.dtype)
        tail = message[n_buckets * esize:(n_buckets + exact_tail) * esize].view(buffer.dtype)
        levels = _unpack_levels(message[(n_buckets + exact_tail) * esize:], n_buckets * self.bucket_size,
                                self.levels)
        qsgd_decode(QuantizedBuckets(levels=levels.view(n_buckets, self.bucket_size), scales=scales, numel=nq,
                                     num_levels=self.levels), out=buffer[:nq])
        if exact_tail:
            torch.add(buffer[nq:], tail, out=buffer[nq:])


class Compressed(Transport):
    """A codec over a transport, the shape of PyTorch DDP's ``fp16_compress_wrapper(hook)``: compress the
    gradient part, let the transport do the communication, decompress. ``--comm qsgd`` is QSGD over the
    built-in all-reduce; ``--comm qsgd+ring``, ``qsgd+ring-tcp``, ``qsgd+ps`` put it over the others.

    What travels: over a transport that can all-gather bytes (the built-in: ``dist.all_gather``), every
    rank's packed message (:meth:`QSGDCodec.pack`: codes, scales, raw tail) is all-gathered and each rank
    decodes and adds all P messages in rank order, so everyone computes the same bytes; ``bytes_sent``
    counts the (P−1) copies of the message a ring all-gather sends. Quantized codes of different ranks have
    different scales and cannot be summed as integers, so over the other transports each rank replaces its
    gradient part by its decoded quantization Q(v), and the transport sums those values like any buffer
    (in the buffer's dtype, so no bytes are saved on the wire; ``bytes_sent`` is the transport's). Either
    way the result is Σᵣ Q(vᵣ), an unbiased estimate of the sum, and the last ``exact_tail`` elements are
    summed without loss. With one worker the buffer is still quantized, so a run's statistics do not change
    character with P.
    """

    exact = False

    def __init__(self, codec: QSGDCodec, transport: Transport):
        self.codec = codec
        self.transport = transport
        self.world_size = transport.world_size
        self.rank = getattr(transport, "rank", 0)
        self.name = codec.name if transport.name == DEFAULT_TRANSPORT else f"{codec.name}+{transport.name}"
        self.devices = transport.devices
        self.options = {**codec.options, **transport.options}
        self._gathers = hasattr(transport, "all_gather_bytes")
        self.cost_model = "all-gather" if self._gathers else transport.cost_model
        # Over a transport that sums the decoded values, its recursive doubling runs as usual.
        self.doubling_max_bytes = 0 if self._gathers else getattr(transport, "doubling_max_bytes", 0)
        self.small_bytes = 0 if self._gathers else getattr(transport, "small_bytes", 0)

    def error_variance(self, values: torch.Tensor) -> float:
        """E‖Q(v) − v‖² the codec adds to this rank's ``values`` (its gradient part). Summed over ranks in the
        exact tail it makes ‖Σᵣ Q(vᵣ)‖² − Σᵣ E‖Q(vᵣ) − vᵣ‖² an unbiased estimate of ‖Σᵣ vᵣ‖² (the ranks' rounding
        is independent and unbiased), which is how the trainer keeps its noise statistics exact."""
        return self.codec.error_variance(values)

    def payload_bytes(self, numel: int, exact_tail: int, element_size: int) -> int:
        """Bytes one rank contributes to the all-gather (over the built-in transport)."""
        return self.codec.payload_bytes(numel, exact_tail, element_size)

    def check_input(self, buffer: torch.Tensor) -> None:
        self.transport.check_input(buffer)
        self.codec.check_input(buffer)

    def _allreduce_flat_(self, buffer: torch.Tensor, exact_tail: int) -> CommStats:
        n = buffer.numel()
        if n == 0:
            return CommStats(bytes_sent=0)
        nq = n - exact_tail
        q = self.codec.encode(buffer[:nq])
        if not self._gathers or self.world_size == 1:
            qsgd_decode(q, out=buffer[:nq].zero_())
            return self.transport.allreduce_(buffer, exact_tail)
        payload = self.codec.pack(q, buffer[nq:])
        assert payload.numel() == self.codec.payload_bytes(n, exact_tail, buffer.element_size())
        gathered = self.transport.all_gather_bytes(payload)
        buffer.zero_()
        for message in gathered:  # rank order: the same additions on every rank
            self.codec.unpack_add_(message, buffer, exact_tail)
        return CommStats(bytes_sent=(self.world_size - 1) * payload.numel())

    def close(self) -> None:
        self.transport.close()
