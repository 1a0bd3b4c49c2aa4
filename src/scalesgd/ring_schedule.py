"""The ring all-reduce's schedule, independent of how its messages travel (torch-free).

Both ring transports (:class:`scalesgd.comm.RingAllReduce` over torch.distributed point-to-point calls,
:class:`scalesgd.tcp_comm.TcpRingAllReduce` over our own sockets) follow this one schedule, so their
additions happen in the same order and their results are bit-identical.

Ring (reduce-scatter then all-gather; baidu-research/baidu-allreduce; Sergeev & Del Balso, arXiv
1802.05799): the buffer is cut into P segments. At global step g = 0 … 2P−3 rank r sends segment
(r − g) mod P to its right neighbour and receives segment (r − g − 1) mod P from its left one; during the
first P−1 steps it adds what it receives (after which rank r owns the full sum of segment (r + 1) mod P),
in the last P−1 it only copies. Each rank sends 2(P−1)/P·N bytes: T = 2(P−1)α + 2(P−1)/P·N·β.
Every segment is further cut into sub-chunks of about ``chunk_bytes`` for pipelining.

Recursive doubling (Thakur, Rabenseifner & Gropp 2005), for small messages when P is a power of two: at
step k rank r exchanges its partial sum with rank r XOR 2^k and both add the lower rank's partial first,
so partners hold the same bytes after every step. log2(P) messages of N bytes: T = log2(P)·(α + N·β).
"""

from __future__ import annotations

from scalesgd.errors import ConfigError
from scalesgd.perf_model import doubling_threshold_bytes

# Recursive doubling up to this size at P = 2 (the two algorithms send the same bytes there; above it the
# ring's pipelined additions win — measured with ``scalesgd allreduce-bench``).
DOUBLING_P2_BYTES = 256 << 10


def split(length: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous near-equal ``(start, stop)`` ranges covering ``range(length)`` (some may be empty)."""
    return [(k * length // parts, (k + 1) * length // parts) for k in range(parts)]


def check_ring_options(world_size: int, rank: int, chunk_bytes: int, small_bytes: int,
                       latency_bytes: float) -> None:
    """Raise :class:`ConfigError` naming the first bad ring setting."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"ring all-reduce needs 0 <= rank < world_size, got rank={rank}, "
                          f"world_size={world_size}")
    if chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes must be a positive number of bytes, got {chunk_bytes}")
    if small_bytes < 0 or not latency_bytes >= 0:
        raise ConfigError(f"small_bytes and latency_bytes must be >= 0 bytes, got small_bytes={small_bytes}, "
                          f"latency_bytes={latency_bytes}")


def doubling_max_bytes(world_size: int, small_bytes: int, latency_bytes: float) -> int:
    """The largest message sent by recursive doubling (0: never): ``small_bytes`` at P = 2, the α–β
    crossover ``latency_bytes``·(2(P−1) − log2 P)/(log2 P − 2(P−1)/P) at larger powers of two
    (:func:`scalesgd.perf_model.doubling_threshold_bytes`, the rule the performance model prices)."""
    return int(min(doubling_threshold_bytes(world_size, small_bytes, latency_bytes), 2 ** 62))


def plan(n: int, esize: int, world_size: int, chunk_bytes: int
         ) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]], int]:
    """Segments (one per rank), their sub-chunks of at most ``chunk_bytes`` and the most sub-chunks in one
    segment (the tag stride) for a buffer of ``n`` elements of ``esize`` bytes."""
    segs = split(n, world_size)
    per = max(1, chunk_bytes // esize)
    chunks = [[(a + x, a + y) for x, y in split(b - a, -(-(b - a) // per))] if b > a else [] for a, b in segs]
    return segs, chunks, max(len(c) for c in chunks)


def send_segment(rank: int, step: int, world_size: int) -> int:
    """The segment rank ``rank`` sends at ring step ``step``."""
    return (rank - step) % world_size


def recv_segment(rank: int, step: int, world_size: int) -> int:
    """The segment rank ``rank`` receives (and, in the reduce-scatter, adds) at ring step ``step``."""
    return (rank - step - 1) % world_size


def is_reduce_step(step: int, world_size: int) -> bool:
    """Steps 0 … P−2 add what arrives (reduce-scatter); the last P−1 copy it (all-gather)."""
    return step < world_size - 1


def ring_bytes_sent(segs: list[tuple[int, int]], rank: int, esize: int) -> int:
    """Bytes rank ``rank`` sends in one ring all-reduce: segment (r − g) mod P leaves at step g, so the
    reduce-scatter sends every segment but (r + 1) mod P and the all-gather every one but (r + 2) mod P."""
    P = len(segs)
    n = segs[-1][1]
    lens = [b - a for a, b in segs]
    return (2 * n - lens[(rank + 1) % P] - lens[(rank + 2) % P]) * esize


def ring_colour(sender: int, world_size: int) -> int:
    """Colour of the ring edge sender → sender + 1, such that neighbouring edges differ: sender mod 2, and a
    third colour for the closing edge of an odd ring. A transport that keeps each colour on a connection of
    its own never sends and receives on the same one."""
    return 2 if world_size % 2 and sender == world_size - 1 else sender % 2


def doubling_steps(rank: int, world_size: int) -> list[tuple[int, bool]]:
    """Recursive doubling's exchanges for ``rank``: ``(partner, partner_first)`` per step, where
    ``partner_first`` says the partner has the lower rank, so its partial is the left operand of the sum."""
    steps, mask = [], 1
    while mask < world_size:
        steps.append((rank ^ mask, bool(rank & mask)))
        mask <<= 1
    return steps


def doubling_colour(sender: int, receiver: int) -> int:
    """Colour of the edge sender → receiver in a recursive-doubling exchange: the sender's bit where the two
    ranks differ, so the two directions of every exchange travel on different connections."""
    return int(sender & (sender ^ receiver) != 0)


def peers(rank: int, world_size: int) -> set[int]:
    """Every rank ``rank`` talks to: its ring neighbours, and its recursive-doubling partners when P is a
    power of two."""
    peers = {(rank + 1) % world_size, (rank - 1) % world_size}
    if world_size & (world_size - 1) == 0:
        peers |= {rank ^ (1 << k) for k in range(world_size.bit_length() - 1)}
    return peers - {rank}


def stream_schedule(rank: int, world_size: int, chunks: list[list[tuple[int, int]]]
                    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[bool], int]:
    """The ring as two ordered streams, for a transport with one connection per direction.

    Returns ``(send_ranges, recv_ranges, adds, ready0)``: element ranges in stream order. The send stream
    carries the chunks of segment r, then every chunk completed at steps 0 … 2P−4 (what step g completes is
    what step g + 1 sends); the receive stream carries segment (r − g − 1) mod P at step g, added
    (``adds``) during the reduce-scatter, copied in place during the all-gather. Send ``k`` may start once
    ``k < ready0 + (receives completed)``.
    """
    P, r = world_size, rank
    recv_ranges, adds = [], []
    for step in range(2 * (P - 1)):
        for a, b in chunks[recv_segment(r, step, P)]:
            recv_ranges.append((a, b))
            adds.append(is_reduce_step(step, P))
    sends = list(chunks[r]) + recv_ranges[:len(recv_ranges) - len(chunks[(r + 2) % P])]
    return sends, recv_ranges, adds, len(chunks[r])
