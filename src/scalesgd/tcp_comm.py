"""The ring all-reduce over our own TCP connections instead of torch.distributed point-to-point calls.

Why a second transport: on CPU every ``isend``/``irecv`` goes through gloo, whose I/O thread and request
objects cost about 100 µs per message on a small host (``allreduce-bench`` measures this floor and prints
it). A small all-reduce is a handful of messages, so no algorithm built on those calls gets near the TCP
round trip. Here each rank holds plain non-blocking sockets to the peers its algorithm talks to and
drives them from its own thread: a message costs a ``send`` and a ``recv_into`` system call, and nothing
else runs while it waits.

The algorithm and its arithmetic are those of :class:`scalesgd.comm.RingAllReduce`: recursive doubling
for small buffers when P is a power of two, else the chunked reduce-scatter + all-gather ring. The
additions happen in the same order, so the result is bit-identical to ``ring``'s. CPU tensors only (the
bytes are read and written in place through their numpy views); on GPUs use NCCL's built-in all-reduce.

The connections are set up once, when the strategy is built: every rank listens on an ephemeral port,
the addresses are exchanged with one ``all_gather_object`` over the process group, and the higher rank
of each pair connects to the lower one. The address a rank listens on is ``SCALESGD_TCP_HOST`` when set,
else the local address that routes to ``MASTER_ADDR`` (127.0.0.1 for local jobs).
"""

from __future__ import annotations

import select
import socket
import struct
import time

import torch
import torch.distributed as dist

from scalesgd.comm import CommStats, RingAllReduce
from scalesgd.distributed import core_per_local_worker, reachable_host
from scalesgd.errors import ConfigError, DistributedError

_RANK = struct.Struct("!i")


class TcpMesh:
    """Non-blocking TCP connections from this rank to each rank in ``peers`` (ranks of ``group``).

    Collective: every rank of the group must build its mesh at the same point, and the peer relation must
    be symmetric (q in my peers ⇔ I am in q's). Waits at most ``timeout_s`` for any connection or any byte.
    """

    def __init__(self, rank: int, world_size: int, peers: set[int], *, group=None, timeout_s: float = 300.0,
                 spin_s: float = 0.0):
        self.rank, self.timeout_s, self.spin_s = rank, float(timeout_s), float(spin_s)
        self.socks: dict[int, socket.socket] = {}
        host = reachable_host()
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        connected = False
        try:
            srv.bind((host, 0))
            srv.listen(max(1, len(peers)))
            addrs: list = [None] * world_size
            dist.all_gather_object(addrs, (host, srv.getsockname()[1]), group=group)
            for q in sorted(p for p in peers if p < rank):  # connect down, accept from above: no cycles
                s = socket.create_connection(tuple(addrs[q]), timeout=self.timeout_s)
                s.sendall(_RANK.pack(rank))
                self.socks[q] = s
            srv.settimeout(self.timeout_s)
            expected = {p for p in peers if p > rank}
            while expected:
                conn, _ = srv.accept()
                conn.settimeout(self.timeout_s)
                head = b""
                while len(head) < _RANK.size:
                    more = conn.recv(_RANK.size - len(head))
                    if not more:
                        break
                    head += more
                q = _RANK.unpack(head)[0] if len(head) == _RANK.size else -1
                if q not in expected:
                    conn.close()
                    raise DistributedError(f"rank {rank}: unexpected connection from rank {q} while setting up "
                                           f"the TCP ring; is another job using the same ports?")
                expected.discard(q)
                self.socks[q] = conn
            connected = True
        except OSError as e:  # timeouts included
            raise DistributedError(f"rank {rank} could not connect the TCP ring to its peers ({e}); set "
                                   "SCALESGD_TCP_HOST to an address the other ranks can reach") from e
        finally:
            srv.close()
            if not connected:  # whatever failed, leave no half-built mesh behind
                self.close()
        for s in self.socks.values():
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks.clear()

    def _lost(self, peer: int, err: OSError | None) -> DistributedError:
        why = f" ({err.strerror or err})" if err is not None else ""
        return DistributedError(f"rank {self.rank}: rank {peer} closed its TCP connection in the middle of an "
                                f"all-reduce{why}; did that worker fail?")

    def transfer(self, dst: int, sends: list, src: int, recvs: list, on_recv=None, ready0: int | None = None) -> None:
        """Write the byte views ``sends`` to ``dst`` in order while filling the views ``recvs`` from ``src``.

        ``sends[k]`` may be written once ``k < ready0 + (receives completed)`` (default: all at once), and
        ``on_recv(j)`` runs as soon as ``recvs[j]`` is full: the ring adds a received chunk there, and the
        chunk it has just completed is the next thing it sends. Blocks only in ``select`` when neither side
        can move; raises :class:`DistributedError` after ``timeout_s`` without progress or if a peer hangs up.
        """
        out_sock, in_sock = self.socks[dst], self.socks[src]
        n_send, n_recv = len(sends), len(recvs)
        ready = n_send if ready0 is None else ready0
        si = soff = ri = roff = 0
        spin_until = None
        while si < n_send or ri < n_recv:
            moved = False
            while si < min(n_send, ready + ri):
                view = sends[si]
                try:
                    k = out_sock.send(view[soff:])
                except BlockingIOError:
                    break
                except OSError as e:
                    raise self._lost(dst, e) from e
                moved = True
                soff += k
                if soff < len(view):
                    break  # the socket buffer is full
                si, soff = si + 1, 0
            while ri < n_recv:
                view = recvs[ri]
                try:
                    k = in_sock.recv_into(view[roff:])
                except BlockingIOError:
                    break
                except OSError as e:
                    raise self._lost(src, e) from e
                if k == 0:
                    raise self._lost(src, None)
                moved = True
                roff += k
                if roff < len(view):
                    break
                if on_recv is not None:
                    on_recv(ri)
                ri, roff = ri + 1, 0
            if moved:
                spin_until = None
                continue
            # Stuck: poll for up to spin_s (a sleeping process wakes 10-20 µs after its data arrives), then sleep.
            if self.spin_s > 0:
                now = time.perf_counter()
                if spin_until is None:
                    spin_until = now + self.spin_s
                if now < spin_until:
                    continue
            want_send = si < min(n_send, ready + ri)
            r_ready, w_ready, _ = select.select([in_sock] if ri < n_recv else [], [out_sock] if want_send else [],
                                                [], self.timeout_s)
            if not r_ready and not w_ready:
                who = f"rank {src}" if src == dst else f"ranks {dst} (sending) and {src} (receiving)"
                raise DistributedError(f"rank {self.rank}: no progress with {who} for {self.timeout_s:g} s in the "
                                       "TCP ring all-reduce; that worker is stuck or gone (raise --timeout-s if "
                                       "it is only slow)")


def _bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage."""
    return memoryview(t.numpy()).cast("B")


class TcpRingAllReduce(RingAllReduce):
    """``ring-tcp``: :class:`RingAllReduce`'s algorithms, with messages on our own TCP connections.

    Args:
        world_size, rank, group: as for :class:`RingAllReduce`.
        chunk_bytes: pipelining grain: a received chunk is added and forwarded while the next arrives.
        small_bytes, latency_bytes: where recursive doubling stops, as for :class:`RingAllReduce`; the
            default α/β (80 KB) is this transport's on loopback (α ≈ 20 µs, β ≈ 1/4 GB/s), which puts the
            switch at 640 KB for P = 4 (measured between 512 KB and 1 MB).
        timeout_s: longest wait for a peer before the call fails with an error that names it.
    """

    name = "ring-tcp"

    def __init__(self, *, world_size: int, rank: int, group=None, chunk_bytes: int = 1 << 20,
                 small_bytes: int = RingAllReduce.DOUBLING_P2_BYTES, latency_bytes: float = 80 << 10,
                 timeout_s: float = 300.0, spin_us: float | None = None):
        super().__init__(world_size=world_size, rank=rank, group=group, chunk_bytes=chunk_bytes,
                         small_bytes=small_bytes, latency_bytes=latency_bytes, split_directions=False)
        if spin_us is None:
            # Polling only pays when every local worker has a core of its own to poll on.
            spin_us = 50.0 if core_per_local_worker(world_size) else 0.0
        if spin_us < 0:
            raise ConfigError(f"spin_us must be >= 0 microseconds, got {spin_us}")
        self.spin_us = float(spin_us)
        # Per buffer (address, length, dtype): the byte views and schedule of one call. The views keep the
        # buffer's storage alive, so no other tensor can take its address while the entry exists.
        self._views: dict[tuple, tuple] = {}
        self.mesh: TcpMesh | None = None
        if world_size > 1:
            peers = {(rank + 1) % world_size, (rank - 1) % world_size}  # the ring's neighbours
            if world_size & (world_size - 1) == 0:  # recursive doubling's partners
                peers |= {rank ^ (1 << k) for k in range(world_size.bit_length() - 1)}
            self.mesh = TcpMesh(rank, world_size, peers - {rank}, group=group, timeout_s=timeout_s,
                                spin_s=self.spin_us * 1e-6)

    def close(self) -> None:
        if self.mesh is not None:
            self.mesh.close()

    def _check_device(self, buffer: torch.Tensor) -> None:
        if buffer.device.type != "cpu":
            raise ConfigError("--comm ring-tcp moves CPU tensors through sockets; on GPUs use --comm allreduce "
                              "(NCCL) or --comm ring")

    def _ring_(self, buffer: torch.Tensor) -> CommStats:
        P, r = self.world_size, self.rank
        sends, recvs, recv_ranges, adds, ready0, scratch, sent = self._schedule(buffer)

        def on_recv(j: int) -> None:
            if adds[j]:
                a, b = recv_ranges[j]
                torch.add(buffer[a:b], scratch[:b - a], out=buffer[a:b])

        self.mesh.transfer((r + 1) % P, sends, (r - 1) % P, recvs, on_recv, ready0=ready0)
        return CommStats(bytes_sent=sent)

    def _cached(self, key: tuple, make):
        got = self._views.get(key)
        if got is None:
            if len(self._views) > 16:
                self._views.clear()
            got = self._views[key] = make()
        return got

    def _schedule(self, buffer: torch.Tensor) -> tuple:
        """The ring's byte views of ``buffer`` and the scratch, in stream order (cached: a trainer reduces the
        same buffer every step)."""
        return self._cached(("ring", buffer.data_ptr(), buffer.numel(), buffer.dtype),
                            lambda: self._make_schedule(buffer))

    def _make_schedule(self, buffer: torch.Tensor) -> tuple:
        P, r, n, esize = self.world_size, self.rank, buffer.numel(), buffer.element_size()
        segs, chunks, _ = self._plan(n, esize)
        scratch = torch.empty(max(b - a for c in chunks for a, b in c), dtype=buffer.dtype)
        raw, area = _bytes(buffer), _bytes(scratch)
        # The stream carries, in order: the chunks of segment r, then every chunk completed at steps
        # 0 … 2P−4 (what step g completes is what step g + 1 sends). Receives: segment (r − g − 1) mod P at
        # step g, into the scratch and added during the reduce-scatter, straight into place in the all-gather.
        recv_ranges, adds = [], []
        for step in range(2 * (P - 1)):
            for a, b in chunks[(r - step - 1) % P]:
                recv_ranges.append((a, b))
                adds.append(step < P - 1)
        sends = [raw[a * esize:b * esize] for a, b in chunks[r]]
        sends += [raw[a * esize:b * esize] for a, b in recv_ranges[:len(recv_ranges) - len(chunks[(r + 2) % P])]]
        recvs = [area[:(b - a) * esize] if add else raw[a * esize:b * esize]
                 for (a, b), add in zip(recv_ranges, adds)]
        seg_len_of = [b - a for a, b in segs]
        sent = (2 * n - seg_len_of[(r + 1) % P] - seg_len_of[(r + 2) % P]) * esize
        return sends, recvs, recv_ranges, adds, len(chunks[r]), scratch, sent

    # Recursive doubling is RingAllReduce's, with each exchange on the partner's socket.

    def _rd_scratch(self, buffer: torch.Tensor) -> torch.Tensor:
        return self._cached(("rd", buffer.data_ptr(), buffer.numel(), buffer.dtype), lambda: torch.empty_like(buffer))

    def _exchange(self, buffer: torch.Tensor, other: torch.Tensor, partner: int, tag: int) -> None:
        mine, theirs = self._cached(("rd-views", buffer.data_ptr(), other.data_ptr(), buffer.numel(), buffer.dtype),
                                    lambda: ([_bytes(buffer)], [_bytes(other)]))
        self.mesh.transfer(partner, mine, partner, theirs)
