"""The ring all-reduce over our own TCP connections instead of torch.distributed point-to-point calls.

Why a second transport: on CPU every ``isend``/``irecv`` goes through gloo, whose I/O thread and request
objects cost several TCP round trips per message on a small host (``allreduce-bench`` measures this floor
and prints it next to the round trip). A small all-reduce is a handful of messages, so no algorithm built
on those calls gets near the TCP round trip. Here each rank holds plain non-blocking sockets to the peers
its algorithm talks to and drives them from its own thread: a message costs a ``send`` and a ``recv_into``
system call, and nothing else runs while it waits.

The algorithm and its arithmetic are those of :class:`scalesgd.comm.RingAllReduce`, both following
:mod:`scalesgd.ring_schedule`: recursive doubling for small buffers when P is a power of two, else the
chunked reduce-scatter + all-gather ring. The additions happen in the same order, so the result is
bit-identical to ``ring``'s. CPU tensors only (the bytes are read and written in place through byte views
of their storage); on GPUs use NCCL's built-in all-reduce.

The connections are set up once, when the strategy is built: every rank listens on an ephemeral port,
the addresses are exchanged with one ``all_gather_object`` over the process group, and the higher rank
of each pair connects to the lower one. The address a rank listens on is ``World.host``
(:func:`scalesgd.distributed.reachable_host`: ``SCALESGD_TCP_HOST`` when set, else the local address that
routes to ``MASTER_ADDR``).
"""

from __future__ import annotations

import select
import socket
import struct
import time

import torch
import torch.distributed as dist

from scalesgd import ring_schedule as rs
from scalesgd.comm_protocol import CommStats, Option, RingTransport
from scalesgd.distributed import World
from scalesgd.errors import ConfigError, DistributedError

_RANK = struct.Struct("!i")


class TcpMesh:
    """Non-blocking TCP connections from this rank to each rank in ``peers`` (ranks of ``group``).

    Collective: every rank of the group must build its mesh at the same point, and the peer relation must
    be symmetric (q in my peers ⇔ I am in q's). Waits at most ``timeout_s`` for any connection or any byte.
    """

    def __init__(self, rank: int, world_size: int, peers: set[int], *, host: str, group=None,
                 timeout_s: float = 300.0, spin_s: float = 0.0):
        self.rank, self.timeout_s, self.spin_s = rank, float(timeout_s), float(spin_s)
        self.socks: dict[int, socket.socket] = {}
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
            # Stuck: poll for up to spin_s (a sleeping process wakes only some time after its data arrives), then sleep.
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
    """A writable byte view of a contiguous CPU tensor's storage, of any dtype (through torch's own uint8
    view: numpy has no bfloat16)."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())



class TcpRingAllReduce(RingTransport):
    """``ring-tcp``: :class:`scalesgd.comm.RingAllReduce`'s algorithms (:mod:`scalesgd.ring_schedule`), with
    messages on our own TCP connections.

    Args:
        world: this process's place in ``group`` (the default group when None) and its machine's facts:
            ``world.host`` is the address this rank listens on, ``world.core_per_local_worker`` decides the
            default ``spin_us``.
        chunk_bytes: pipelining grain: a received chunk is added and forwarded while the next arrives.
        small_bytes, latency_bytes: where recursive doubling stops, as for :class:`RingAllReduce`; the
            default α/β is this transport's on loopback (README, "Communication and scaling").
        timeout_s: longest wait for a peer before the call fails with an error that names it.
        spin_us: how long a stuck transfer polls before it sleeps in ``select`` (a sleeping process wakes
            only some time after its data arrives). Default: 50 when every local worker has a core to poll on,
            else 0.
    """

    name = "ring-tcp"
    devices = ("cpu",)
    recursive_doubling = True
    options = {
        "chunk_bytes": Option(int, 1 << 20, "pipelining grain in bytes"),
        "small_bytes": Option(int, rs.DOUBLING_P2_BYTES, "recursive doubling up to this size at P = 2 (0: off)"),
        "latency_bytes": Option(float, 80 << 10, "alpha/beta of the links: sets the doubling switch for P >= 4"),
        "timeout_s": Option(float, 300.0, "longest wait for a peer, in seconds"),
        "spin_us": Option(float, None, "poll this long before sleeping (unset: 50 with a core per worker, else 0)"),
    }

    def __init__(self, world: World, *, group=None, chunk_bytes: int = 1 << 20,
                 small_bytes: int = rs.DOUBLING_P2_BYTES, latency_bytes: float = 80 << 10,
                 timeout_s: float = 300.0, spin_us: float | None = None):
        world_size, rank = world.size, world.rank
        rs.check_ring_options(world_size, rank, chunk_bytes, small_bytes, latency_bytes)
        if spin_us is None:
            spin_us = 50.0 if world.core_per_local_worker else 0.0
        if spin_us < 0:
            raise ConfigError(f"spin_us must be >= 0 microseconds, got {spin_us}")
        self.world_size, self.rank = world_size, rank
        self.chunk_bytes = int(chunk_bytes)
        self.small_bytes = int(small_bytes)
        self.latency_bytes = float(latency_bytes)
        self.doubling_max_bytes = rs.doubling_max_bytes(world_size, self.small_bytes, self.latency_bytes)
        self.spin_us = float(spin_us)
        # Per buffer (address, length, dtype): the byte views and schedule of one call. The views keep the
        # buffer's storage alive, so no other tensor can take its address while the entry exists.
        self._views: dict[tuple, tuple] = {}
        self.mesh: TcpMesh | None = None
        if world_size > 1:
            self.mesh = TcpMesh(rank, world_size, rs.peers(rank, world_size), host=world.host,
                                group=group, timeout_s=timeout_s, spin_s=self.spin_us * 1e-6)

    def close(self) -> None:
        """Close the sockets to the peers."""
        if self.mesh is not None:
            self.mesh.close()
        self._views.clear()

    def _ring_(self, buffer: torch.Tensor) -> CommStats:
        P, r = self.world_size, self.rank
        sends, recvs, recv_ranges, adds, ready0, scratch, sent = self._cached(
            ("ring", buffer.data_ptr(), buffer.numel(), buffer.dtype), lambda: self._make_schedule(buffer))

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

    def _make_schedule(self, buffer: torch.Tensor) -> tuple:
        """The ring's byte views of ``buffer`` and the scratch, in stream order
        (:func:`scalesgd.ring_schedule.stream_schedule`): received chunks land in the scratch and are added
        during the reduce-scatter, straight into place in the all-gather."""
        P, r, n, esize = self.world_size, self.rank, buffer.numel(), buffer.element_size()
        segs, chunks, _ = rs.plan(n, esize, P, self.chunk_bytes)
        scratch = torch.empty(max(b - a for c in chunks for a, b in c), dtype=buffer.dtype)
        raw, area = _bytes(buffer), _bytes(scratch)
        send_ranges, recv_ranges, adds, ready0 = rs.stream_schedule(r, P, chunks)
        sends = [raw[a * esize:b * esize] for a, b in send_ranges]
        recvs = [area[:(b - a) * esize] if add else raw[a * esize:b * esize]
                 for (a, b), add in zip(recv_ranges, adds)]
        return sends, recvs, recv_ranges, adds, ready0, scratch, rs.ring_bytes_sent(segs, r, esize)

    def _recursive_doubling_(self, buffer: torch.Tensor) -> CommStats:
        """As :meth:`RingAllReduce._recursive_doubling_`, each exchange on the partner's socket."""
        other, mine, theirs = self._cached(("rd", buffer.data_ptr(), buffer.numel(), buffer.dtype),
                                           lambda: self._doubling_views(buffer))
        steps = rs.doubling_steps(self.rank, self.world_size)
        for partner, partner_first in steps:
            self.mesh.transfer(partner, mine, partner, theirs)
            if partner_first:
                torch.add(other, buffer, out=buffer)
            else:
                torch.add(buffer, other, out=buffer)
        return CommStats(bytes_sent=len(steps) * buffer.numel() * buffer.element_size())

    @staticmethod
    def _doubling_views(buffer: torch.Tensor) -> tuple:
        other = torch.empty_like(buffer)
        return other, [_bytes(buffer)], [_bytes(other)]
