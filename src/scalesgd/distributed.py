"""Who this process is in the job, and how the job's processes are started.

The environment is read here and nowhere else: under ``torchrun`` the rendezvous comes from its
variables (:data:`TORCHRUN_VARS`, all of them); otherwise :func:`spawn` starts P local
processes on a loopback port. Every process group gets a timeout, so a dead peer ends the job with an
error that names it instead of a hang.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import pickle
import re
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from scalesgd.errors import ConfigError, DistributedError, ScalesgdError, StoppedError, WorkerFailedError
from scalesgd.launch import worker_context

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class World:
    """This process's place in the job, and the facts about its machine that communication strategies use.

    ``local_size``: workers on this machine (torchrun's LOCAL_WORLD_SIZE, else the whole job); ``cpu_count``:
    this machine's CPU cores; ``host``: the address other ranks reach this process on (see
    :func:`reachable_host`). :func:`init_world` fills them from the environment; the defaults describe a
    lone process on loopback.
    """

    rank: int
    size: int
    local_rank: int
    device: torch.device
    backend: str
    local_size: int = 1
    cpu_count: int = 1
    host: str = "127.0.0.1"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def core_per_local_worker(self) -> bool:
        """Whether every worker on this machine has a CPU core of its own (spinning and extra I/O threads
        only pay then)."""
        return self.local_size <= self.cpu_count


@dataclass(frozen=True)
class Rendezvous:
    """Where the processes meet: ``tcp://addr:port`` plus this process's rank and the world size."""

    addr: str
    port: int
    rank: int
    size: int
    local_rank: int
    from_env: bool = False  # made by torchrun: join through env:// (reuses torchrun's own store)
    store_hosted: bool = False  # the launcher holds the rendezvous store at addr:port: join it as a client


# What torchrun (torch.distributed.run's elastic agent) sets for every worker it starts. A process with any of
# the per-rank ones is one rank of a launched job; it is a torchrun launch only with all of them.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID")
_PER_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def torchrun_rendezvous(environ: dict[str, str] | None = None) -> Rendezvous | None:
    """The rendezvous torchrun put in the environment; None when this process was not launched as a rank.

    Raises:
        ConfigError: some of torchrun's variables are set but not all (e.g. RANK and WORLD_SIZE left in the
            shell): that is not a torchrun launch, and running as rank RANK of WORLD_SIZE would silently
            override ``--workers``. DistributedError: a malformed value.
    """
    env = os.environ if environ is None else environ
    present = [v for v in TORCHRUN_VARS if v in env]
    if not any(v in env for v in _PER_RANK_VARS):
        return None
    missing = [v for v in TORCHRUN_VARS if v not in env]
    if missing:
        raise ConfigError(f"the environment sets {', '.join(f'{v}={env[v]}' for v in present)} but not "
                          f"{', '.join(missing)}: this is not a torchrun launch; unset "
                          f"{' '.join(v for v in present if v in _PER_RANK_VARS)} to run on --workers local "
                          "processes, or launch with torchrun --nproc-per-node P")
    try:
        return Rendezvous(addr=env["MASTER_ADDR"], port=int(env["MASTER_PORT"]), rank=int(env["RANK"]),
                          size=int(env["WORLD_SIZE"]), local_rank=int(env["LOCAL_RANK"]), from_env=True)
    except ValueError as e:
        raise DistributedError(f"malformed torchrun environment ({e}); launch with torchrun or unset RANK/WORLD_SIZE")


def check_workers_match(rdv: Rendezvous | None, workers: int) -> None:
    """Refuse an explicit ``--workers`` that disagrees with torchrun's world size (the launch decides it).

    Raises:
        ConfigError: one line naming both numbers and the fix.
    """
    if rdv is not None and workers != rdv.size:
        raise ConfigError(f"--workers {workers} disagrees with torchrun's WORLD_SIZE={rdv.size}: under torchrun the "
                          f"launch sets the number of workers; drop --workers, or launch {workers} processes "
                          f"(torchrun --nproc-per-node {workers})")


# Keys of scalesgd's own in torchrun's store: where this attempt's rank 0 serves the process group's store, and
# that the job has formed its process group once (so a later attempt is a restart, whatever its agent counts).
_ATTEMPT_STORE_KEY = "scalesgd/attempt_store"
_STARTED_KEY = "scalesgd/started"


def _attempt_store(job_store: dist.Store, rdv: Rendezvous, timeout_s: float) -> dist.Store:
    """A store of this attempt's own for the process group, served by its rank 0 and found through torchrun's.

    torchrun's agents share one store across the attempts of a job, so keys an earlier attempt wrote are still
    there: a rank reading the gloo address a dead rank published is refused. Prefixing the keys by the
    restart count works for one agent only: with several (``--nnodes 2``), an agent whose own workers were
    healthy restarts them without counting a restart, so the ranks of one attempt disagree on it. Instead
    rank 0 serves a fresh store (on the address that routes to MASTER_ADDR, :func:`reachable_host`) and
    publishes its address; the others take the published address once it accepts connections (an earlier
    attempt's rank 0 has exited before any rank of this one starts, so a stale address refuses them).
    """
    if rdv.rank == 0:
        store = host_store(reachable_host(), rdv.size, timeout_s)
        job_store.set(_ATTEMPT_STORE_KEY, f"{reachable_host()} {store.port}")
        return store
    deadline = time.monotonic() + timeout_s
    while True:
        host, port = job_store.get(_ATTEMPT_STORE_KEY).decode().split()
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                pass
            return dist.TCPStore(host, int(port), rdv.size, False, timeout=_dt.timedelta(seconds=timeout_s))
        except OSError:  # an earlier attempt's rank 0, gone: this attempt's has not published yet
            if time.monotonic() > deadline:
                raise DistributedError(f"rank {rdv.rank} found no store of this attempt's rank 0 within "
                                       f"{timeout_s:.0f} s (last published: {host}:{port})") from None
            time.sleep(0.05)


def torchrun_restarted(rdv: Rendezvous, timeout_s: float = 300.0) -> bool:
    """Whether this torchrun job has run before (it is a restart; the run continues from its checkpoint).

    True when torchrun counted a restart (``TORCHELASTIC_RESTART_COUNT`` > 0), or when the job's store says
    an earlier attempt formed its process group: with several agents only the one whose worker failed counts
    a restart, the others restart their healthy workers with the count unchanged. Under
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` every attempt has a fresh store, and the count is all there is.
    """
    if restart_count() > 0:
        return True
    if not rdv.from_env or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return False
    try:
        store = dist.TCPStore(rdv.addr, rdv.port, rdv.size, False, timeout=_dt.timedelta(seconds=timeout_s))
        return bool(store.check([_STARTED_KEY]))
    except RuntimeError as e:
        raise DistributedError(f"rank {rdv.rank} could not reach torchrun's store at {rdv.addr}:{rdv.port} ({e}); "
                               "check that every agent uses the same --rdzv-endpoint") from None


def restart_count(environ: dict[str, str] | None = None) -> int:
    """How many times torchrun has restarted this job (``TORCHELASTIC_RESTART_COUNT``; 0 outside torchrun)."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        raise DistributedError(f"malformed TORCHELASTIC_RESTART_COUNT {env['TORCHELASTIC_RESTART_COUNT']!r}; "
                               "launch with torchrun or unset it") from None


# --------------------------------------------------------------------------------------------------------
# Signals and supervision

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class StopRequest:
    """Records the first SIGTERM / SIGINT / SIGHUP this process receives instead of dying of it.

    The training loop polls :attr:`signum` before each step and, when set, checkpoints after that step on
    every rank and stops (the request rides in the step's all-reduce, so all ranks stop at the same step).
    Use as a context manager: the handlers are installed on entry (main thread only; elsewhere this records
    nothing) and the previous ones restored on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0  # signals received
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def stop_with_parent(launcher_pid: int) -> None:
    """Send this worker SIGTERM when its launcher dies, so no worker trains unsupervised.

    On Linux the kernel does it when the parent dies (``prctl(PR_SET_PDEATHSIG)``; the parent is the
    launcher, or the fork server, which exits with the launcher); everywhere a daemon thread also checks once
    a second that the parent and the launcher are still there (it covers other systems and a parent that died
    before the prctl). The worker treats SIGTERM as a stop request: it checkpoints at the next step and exits.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl in this libc: the watchdog below still runs
            pass

    def launcher_alive() -> bool:
        try:
            os.kill(launcher_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else (the pid was reused): treat as gone
            return False
        return True

    def watch() -> None:
        while os.getppid() == parent and launcher_alive():
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="scalesgd-launcher-watchdog", daemon=True).start()


def local_world_size(default: int) -> int:
    """Workers on this machine: torchrun's LOCAL_WORLD_SIZE, else ``default`` (a local spawn knows its own)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", default))


def reachable_host() -> str:
    """The address other ranks can reach this process on: ``SCALESGD_TCP_HOST`` when set, else the local
    address that routes to MASTER_ADDR (127.0.0.1 for local jobs, or when no route is found)."""
    if os.environ.get("SCALESGD_TCP_HOST"):
        return os.environ["SCALESGD_TCP_HOST"]
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))  # UDP: picks the outgoing interface, sends nothing
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def resolve_backend(backend: str) -> str:
    """``auto`` is NCCL when CUDA is present, gloo otherwise."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--backend nccl needs CUDA GPUs, and none is visible; use --backend gloo on CPU")
    return backend


def init_world(rdv: Rendezvous, backend: str, timeout_s: float = 300.0) -> World:
    """Join the process group described by ``rdv`` (a no-op group of one when size is 1)."""
    backend = resolve_backend(backend)
    if backend == "nccl":
        device = torch.device("cuda", rdv.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if rdv.size > 1 and not dist.is_initialized():
        try:
            timeout = _dt.timedelta(seconds=timeout_s)
            if rdv.store_hosted:
                store = dist.TCPStore(rdv.addr, rdv.port, rdv.size, False, timeout=timeout)
                dist.init_process_group(backend=backend, store=store, rank=rdv.rank, world_size=rdv.size,
                                        timeout=timeout)
            elif rdv.from_env:
                job_store, _, _ = next(dist.rendezvous("env://", rdv.rank, rdv.size, timeout=timeout))
                dist.init_process_group(backend=backend, store=_attempt_store(job_store, rdv, timeout_s),
                                        rank=rdv.rank, world_size=rdv.size, timeout=timeout)
                if rdv.rank == 0:  # every rank has joined, so every rank has asked torchrun_restarted already
                    job_store.set(_STARTED_KEY, "1")
            else:
                dist.init_process_group(backend=backend, init_method=f"tcp://{rdv.addr}:{rdv.port}", rank=rdv.rank,
                                        world_size=rdv.size, timeout=timeout)
        except (RuntimeError, ValueError) as e:  # noqa: PERF203 - converted to a clear message
            raise DistributedError(
                f"rank {rdv.rank} could not join the process group at {rdv.addr}:{rdv.port} ({e}); "
                "check that every rank uses the same address and port and that the port is free") from e
    # A local job's own listeners (ring-tcp) bind the address its workers meet on (127.0.0.1 unless --master-addr
    # names another), not one found from a MASTER_ADDR that a shell may have left set.
    host = reachable_host() if rdv.from_env else rdv.addr
    return World(rank=rdv.rank, size=rdv.size, local_rank=rdv.local_rank, device=device, backend=backend,
                 local_size=local_world_size(rdv.size), cpu_count=os.cpu_count() or 1, host=host)


def shutdown_world() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_local_address(addr: str) -> None:
    """Refuse a rendezvous address local workers cannot listen on (rank 0's store binds it on this machine).

    Raises:
        ConfigError: one line, when ``addr`` does not resolve or is not an address of this machine.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((addr, 0))
    except socket.gaierror as e:
        raise ConfigError(f"--master-addr {addr!r} does not resolve ({e.strerror}); local workers meet on this "
                          "machine: leave it out (127.0.0.1) or give one of this machine's addresses") from None
    except OSError as e:
        raise ConfigError(f"--master-addr {addr} is not an address of this machine ({e.strerror}); local workers "
                          "meet on this machine: leave it out (127.0.0.1) or give one of its own addresses") from None


def host_store(addr: str, world_size: int, timeout_s: float = 300.0, port: int = 0) -> dist.TCPStore:
    """A rendezvous store served by this process on ``addr`` only, on ``port`` (0: one the system picks;
    ``.port``); the workers join it with ``Rendezvous(store_hosted=True)``. Keep it referenced until the job ends.

    The listening socket is bound here and handed to the store (``master_listen_fd``): a TCPStore that binds
    its own listens on every interface of the machine, where anyone who can reach it may read and write the
    job's keys without authentication.

    Raises:
        ConfigError: ``addr`` cannot be bound here (:func:`check_local_address`).
        DistributedError: ``port`` is taken.
    """
    check_local_address(addr)
    family = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((addr, port))
        sock.listen(max(128, world_size))
    except OSError as e:
        sock.close()
        raise DistributedError(f"rendezvous port {port} on {addr} is in use ({e.strerror}); pass another "
                               "--master-port or leave it out to pick a free one") from None
    port = int(sock.getsockname()[1])
    fd = sock.detach()  # the store owns the descriptor from here on (it closes it when it is destroyed)
    try:
        return dist.TCPStore(addr, port, world_size, True, timeout=_dt.timedelta(seconds=timeout_s),
                             wait_for_workers=False, master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def is_loopback(addr: str) -> bool:
    """Whether ``addr`` (a name or an address) resolves to a loopback address only (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def loopback_interface() -> str | None:
    """The name of this machine's loopback network interface (``lo`` on Linux, ``lo0`` on BSD and macOS),
    None when there is none: Linux marks it IFF_LOOPBACK in ``/sys/class/net/NAME/flags``, elsewhere its
    name says it."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    for name in names:
        try:
            flags = int(Path(f"/sys/class/net/{name}/flags").read_text(), 16)
        except (OSError, ValueError):
            continue
        if flags & 0x8:  # IFF_LOOPBACK
            return name
    return next((name for name in names if name in ("lo", "lo0")), None)


def worker_environment(addr: str) -> dict[str, str]:
    """The environment local workers meeting on ``addr`` start with: this process's, and, when ``addr`` is a
    loopback address, gloo's sockets on the loopback interface (``GLOO_SOCKET_IFNAME``; gloo otherwise
    listens on the address this machine's hostname resolves to, often one every machine on the network can
    reach). Every peer of a local job is on this machine, so loopback always reaches them."""
    environ = dict(os.environ)
    if is_loopback(addr):
        lo = loopback_interface()
        if lo is not None:
            environ["GLOO_SOCKET_IFNAME"] = lo
    return environ


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``addr`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def check_port_free(port: int, addr: str = "127.0.0.1") -> None:
    """Raise a clear error if ``port`` is taken (the rendezvous would otherwise fail obscurely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, port))
        except OSError as e:
            raise DistributedError(f"rendezvous port {port} on {addr} is in use ({e.strerror}); pass another "
                                   "--master-port or leave it out to pick a free one") from e


class _Stdio:
    """The launcher's stdout and stderr, handed to a worker as it starts.

    A worker forked from the fork server (:mod:`scalesgd.launch`) would otherwise write wherever the server's
    stdout and stderr pointed when it started, not where the launcher's point now (a redirected sweep log,
    pytest's capture). Pickled while multiprocessing starts the worker, the descriptors travel with it.
    """

    def __init__(self, fds: dict[int, Any] | None = None):
        self.fds = fds or {}  # worker side: target descriptor -> multiprocessing's handle on the sent copy

    def __reduce__(self):
        from multiprocessing import reduction

        sent = {}
        for fd in (1, 2):
            try:
                os.fstat(fd)
            except OSError:  # a launcher without this stream: the worker keeps the server's
                continue
            sent[fd] = reduction.DupFd(fd)
        return (_Stdio, (sent,))

    def attach(self) -> None:
        """Make the sent descriptors this process's stdout and stderr."""
        for target, handle in self.fds.items():
            fd = handle.detach()
            if fd != target:
                os.dup2(fd, target)
                os.close(fd)


def _child(payload: bytes, rdv: Rendezvous, results: Any, environ: dict[str, str], stdio: _Stdio | None,
           launcher_pid: int) -> None:
    """Entry point of a local worker: take on the launcher's environment and output streams, run
    ``fn(rdv, *args)`` and send its outcome on ``results`` (this worker's own pipe)."""
    stop_with_parent(launcher_pid)
    try:
        if stdio is not None:
            stdio.attach()
        os.environ.clear()
        os.environ.update(environ)
        fn, args = pickle.loads(payload)
        out = fn(rdv, *args)
        _report(results, ("ok", pickle.dumps(out)))  # by value: this process may exit before it is read
    except ScalesgdError as e:
        _report(results, ("error", f"{type(e).__name__}:{e}"))
        sys.exit(3)
    except BaseException as e:  # noqa: BLE001 - a bug: reported once, with its traceback, by the parent
        _report(results, ("crash", "".join(traceback.format_exception(e))))
        sys.exit(1)


def _report(results: Any, outcome: tuple) -> None:
    try:
        results.send(outcome)
    except OSError:  # the launcher is gone (its end of the pipe closed): nobody to tell
        pass


def _died(rank: int, exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"worker {rank} was killed by {name} (signal {-exitcode})"
    return f"worker {rank} exited with code {exitcode} without reporting an error"


def _first_failure(procs: list[Any], reports: list[tuple[int, str, str]]) -> tuple[int, str, str]:
    """The rank whose failure ended the job: one that died without a report (by a signal first, then by an
    unexpected exit code) caused the others' communication errors; else the first report to arrive, a
    user-facing error before a crash before a communication error."""
    reported = {r for r, _, _ in reports}
    silent = [(r, p.exitcode) for r, p in enumerate(procs) if r not in reported and p.exitcode not in (None, 0)]
    for r, code in sorted(silent, key=lambda rc: (rc[1] >= 0, rc[0])):
        return r, "died", _died(r, code)
    for wanted in (lambda a: a[1] == "error" and not str(a[2]).startswith("DistributedError:"),
                   lambda a: a[1] == "crash", lambda a: True):
        for a in reports:
            if wanted(a):
                return a
    raise AssertionError("no failure to blame")  # pragma: no cover - only called with a failure


def spawn(fn: Callable[..., Any], nprocs: int, args: tuple = (), *, port: int | None = None,
          addr: str = "127.0.0.1", timeout_s: float | None = None) -> list[Any]:
    """Run ``fn(rendezvous, *args)`` in ``nprocs`` new local processes and return their results by rank.

    The processes are forked from the preloaded fork server of :mod:`scalesgd.launch` (spawned where there is
    none); each gets this process's environment, working directory, ``sys.path``, stdout and stderr as they
    are now. ``fn`` and ``args`` must be picklable (``fn`` by name).

    If one worker fails, the others are killed and its error is raised here, naming the rank that failed
    first: a worker that died without a word (a signal, ``os._exit``) before the survivors that then saw a
    communication error; else a :class:`ScalesgdError` it raised comes back as the same class and message,
    a crash with its traceback. Workers stop when this process dies (:func:`stop_with_parent`); a SIGTERM,
    SIGINT or SIGHUP here is passed on to them as SIGTERM (they checkpoint and stop), a second one kills them.
    No worker is left running, and ``timeout_s`` bounds the whole job.

    Raises:
        WorkerFailedError: a worker died or crashed (with its signal, exit code or traceback).
        ScalesgdError: the first user-facing error a worker reported (its own class).
        DistributedError: the job ran past ``timeout_s``.
        StoppedError: a second stop signal arrived before the workers had stopped.
    """
    store = None
    if nprocs > 1:
        # The launcher binds the rendezvous store itself, on ``addr`` only, and holds it for the whole job: a port
        # probed free and handed on could be taken by another process before rank 0 bound it, and a store rank 0
        # made itself would listen on every interface.
        store = host_store(addr, nprocs, port=port or 0)
        port = store.port
    elif port is None:
        port = free_port(addr)  # no process group of its own; a caller that makes one uses this port
    else:
        check_port_free(port, addr)
    ctx = worker_context()
    stdio = _Stdio() if ctx.get_start_method() == "forkserver" else None  # spawned workers inherit them
    environ = worker_environment(addr)
    # Plain pickle copies tensors by value; multiprocessing's own pickler would share them through file
    # descriptors served by this process, which breaks when several jobs are spawned in a row.
    payload = pickle.dumps((fn, args))
    procs, readers = [], []
    with StopRequest() as stop:
        try:
            for rank in range(nprocs):
                rdv = Rendezvous(addr=addr, port=port, rank=rank, size=nprocs, local_rank=rank,
                                 store_hosted=store is not None)
                reader, writer = ctx.Pipe(duplex=False)  # one per worker: a message always names its sender
                p = ctx.Process(target=_child, args=(payload, rdv, writer, environ, stdio, os.getpid()),
                                daemon=False)
                p.start()
                writer.close()  # the worker holds its own copy
                procs.append(p)
                readers.append(reader)
            outcomes, failure = _collect(procs, readers, timeout_s, stop)
            if stop.signum is not None and failure is not None and failure[1] in ("died", "crash"):
                # asked to stop, and a worker ended without its own stop message (it had not begun training)
                failure = (failure[0], "stopped", f"stopped by {stop.name} ({str(failure[2]).splitlines()[0]})")
        finally:
            # Reached with a failure, a timeout, or an exception here: stop whoever still runs. SIGKILL: a
            # survivor could not finish a checkpoint without its peers anyway.
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
            for reader in readers:
                reader.close()
    if failure is not None:
        rank, status, message = failure
        if status == "error":
            kind, _, message = str(message).partition(":")
            error = _rebuild_error(kind, message)
            if isinstance(error, StoppedError) and stop.signum is not None:
                # the signal this launcher was sent: the workers name the SIGTERM it passed on to them
                error = StoppedError(re.sub(r"stopped by SIG[A-Z]+", f"stopped by {stop.name}", str(error), count=1),
                                     signum=stop.signum)
            raise error
        if status == "timeout":
            raise DistributedError(f"{message}; the workers were stopped")
        if status == "stopped":
            raise StoppedError(message, signum=stop.signum)
        if status == "died":
            raise WorkerFailedError(f"{message}; the other workers were stopped")
        raise WorkerFailedError(f"worker {rank} failed:\n{message}")
    return [pickle.loads(outcomes[r]) for r in range(nprocs)]


def _read(r: int, procs: list[Any], readers: list[Any], ready: set) -> tuple[str, Any] | None:
    """Worker ``r``'s outcome if it has one now: ("ok" | "error" | "crash", message), ("dead", None) when it
    exited without a word, None while it runs."""
    if readers[r] not in ready and procs[r].sentinel not in ready:
        return None
    # A worker sends before it exits, so once it has exited its message (if any) is in its pipe.
    if readers[r].poll():
        try:
            return readers[r].recv()
        except EOFError:  # closed without a message: died
            pass
    elif procs[r].sentinel not in ready:
        return None
    procs[r].join(timeout=10)
    return "dead", None


def _collect(procs: list[Any], readers: list[Any], timeout_s: float | None, stop: StopRequest
             ) -> tuple[dict[int, bytes], tuple[int, str, str] | None]:
    """Wait for every worker's outcome; stop at the first failure. Returns (pickled results by rank, failure as
    (rank, "error" | "crash" | "died" | "timeout" | "stopped", message) or None).

    After the first failure the others get up to 2 s to exit or report, so that the rank that failed first
    is the one blamed (:func:`_first_failure`), not a survivor whose connection it reset.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    outcomes: dict[int, bytes] = {}
    reports: list[tuple[int, str, str]] = []  # failures in order of arrival
    pending = set(range(len(procs)))
    forwarded = False
    settle_until = None

    while pending:
        if stop.signum is not None and not forwarded:
            for r in pending:
                if procs[r].is_alive():
                    os.kill(procs[r].pid, signal.SIGTERM)
            forwarded = True
        if stop.count > 1:  # asked twice: do not wait for the checkpoint
            return outcomes, (-1, "stopped", f"stopped by a second {stop.name}; the workers were killed and the "
                                             "last checkpoint written stands")
        now = time.monotonic()
        if settle_until is not None and now >= settle_until:
            break
        if deadline is not None and now >= deadline:
            return outcomes, (-1, "timeout", f"the job did not finish within {timeout_s:.0f} s")
        # Wakes on a message or a worker's exit; at least every 0.25 s to pass a stop signal on.
        limit = min(t - now for t in (deadline, settle_until, now + 0.25) if t is not None)
        ready = set(wait([readers[r] for r in pending] + [procs[r].sentinel for r in pending], limit))
        for r in sorted(pending):
            got = _read(r, procs, readers, ready)
            if got is None:
                continue
            pending.discard(r)
            status, message = got
            if status == "ok":
                outcomes[r] = message
            elif status != "dead":
                reports.append((r, status, message))
            elif procs[r].exitcode == 0:
                reports.append((r, "crash", f"worker {r} exited without a result"))
            if status != "ok" and settle_until is None:
                settle_until = time.monotonic() + 2.0
    if settle_until is None:
        return outcomes, None
    return outcomes, _first_failure(procs, reports)


def _rebuild_error(kind: str, message: str) -> ScalesgdError:
    import scalesgd.errors as errors

    cls = getattr(errors, kind, ScalesgdError)
    if not (isinstance(cls, type) and issubclass(cls, ScalesgdError)):
        cls = ScalesgdError
    return cls(message)


def all_reduce_scalars(values: list[float], world: World) -> list[float]:
    """Sum a few Python floats over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=world.device if world.backend == "nccl" else "cpu")
    if world.size > 1:
        dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any, world: World) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, by rank (None on the other ranks); pickled between the job's own
    processes only."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()

