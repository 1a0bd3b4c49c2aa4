"""Who this process is in the job, and how the job's processes are started.

The environment is read here and nowhere else: under ``torchrun`` the rendezvous comes from its
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); otherwise :func:`spawn` starts P local
processes on a loopback port. Every process group gets a timeout, so a dead peer ends the job with an
error that names it instead of a hang.
"""

from __future__ import annotations

import datetime as _dt
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from scalesgd.errors import ConfigError, DistributedError, ScalesgdError, StoppedError, WorkerFailedError

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


def torchrun_rendezvous(environ: dict[str, str] | None = None) -> Rendezvous | None:
    """The rendezvous torchrun (or any launcher that sets the same variables) put in the environment."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        return Rendezvous(addr=env.get("MASTER_ADDR", "127.0.0.1"), port=int(env.get("MASTER_PORT", "29500")),
                          rank=int(env["RANK"]), size=int(env["WORLD_SIZE"]),
                          local_rank=int(env.get("LOCAL_RANK", env["RANK"])), from_env=True)
    except ValueError as e:
        raise DistributedError(f"malformed torchrun environment ({e}); launch with torchrun or unset RANK/WORLD_SIZE")


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


def stop_with_parent(parent_pid: int) -> None:
    """Send this process SIGTERM when its parent (the launcher) dies, so no worker trains unsupervised.

    On Linux the kernel does it (``prctl(PR_SET_PDEATHSIG)``); everywhere a daemon thread also polls
    ``os.getppid()`` once a second (it covers other systems and a parent that died before the prctl). The
    worker treats SIGTERM as a stop request: it checkpoints at the next step and exits.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl in this libc: the watchdog below still runs
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="scalesgd-parent-watchdog", daemon=True).start()


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
            init_method = "env://" if rdv.from_env else f"tcp://{rdv.addr}:{rdv.port}"
            dist.init_process_group(backend=backend, init_method=init_method,
                                    rank=rdv.rank, world_size=rdv.size,
                                    timeout=_dt.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:  # noqa: PERF203 - converted to a clear message
            raise DistributedError(
                f"rank {rdv.rank} could not join the process group at {rdv.addr}:{rdv.port} ({e}); "
                "check that every rank uses the same address and port and that the port is free") from e
    return World(rank=rdv.rank, size=rdv.size, local_rank=rdv.local_rank, device=device, backend=backend,
                 local_size=local_world_size(rdv.size), cpu_count=os.cpu_count() or 1, host=reachable_host())


def shutdown_world() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def _child(payload: bytes, rdv: Rendezvous, results: Any, parent_pid: int) -> None:
    """Entry point of a spawned worker: run ``fn(rdv, *args)`` and report its outcome on ``results``."""
    stop_with_parent(parent_pid)
    try:
        fn, args = pickle.loads(payload)
        out = fn(rdv, *args)
        _report(results, ("ok", rdv.rank, pickle.dumps(out)))  # by value: this process may exit before it is read
    except ScalesgdError as e:
        _report(results, ("error", rdv.rank, f"{type(e).__name__}:{e}"))
        sys.exit(3)
    except BaseException as e:  # noqa: BLE001 - a bug: reported once, with its traceback, by the parent
        _report(results, ("crash", rdv.rank, "".join(traceback.format_exception(e))))
        sys.exit(1)


def _report(results: Any, outcome: tuple) -> None:
    try:
        results.put(outcome)
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


def _first_failure(procs: list, arrivals: list[tuple[int, str, Any]]) -> tuple[int, str, Any]:
    """The rank whose failure ended the job: one that died without a report (by a signal first, then by an
    unexpected exit code) caused the others' communication errors; else the first report to arrive, a
    user-facing error before a crash before a communication error."""
    reported = {r for r, _, _ in arrivals}
    silent = [(r, p.exitcode) for r, p in enumerate(procs) if r not in reported and p.exitcode not in (None, 0)]
    for r, code in sorted(silent, key=lambda rc: (rc[1] >= 0, rc[0])):
        return r, "died", _died(r, code)
    failed = [a for a in arrivals if a[1] != "ok"]
    for wanted in (lambda a: a[1] == "error" and not str(a[2]).startswith("DistributedError:"),
                   lambda a: a[1] == "crash", lambda a: True):
        for a in failed:
            if wanted(a):
                return a
    raise AssertionError("no failure to blame")  # pragma: no cover - only called with a failure


def spawn(fn: Callable[..., Any], nprocs: int, args: tuple = (), *, port: int | None = None,
          addr: str = "127.0.0.1", timeout_s: float | None = None) -> list[Any]:
    """Run ``fn(rendezvous, *args)`` in ``nprocs`` fresh local processes and return their results by rank.

    If one worker fails, the others are killed and its error is raised here, so no worker is left hanging.
    The rank named is the one that failed first: a worker that died without a report (a signal, an
    unexpected exit code) before the survivors that then saw a communication error. Workers stop when this
    process dies (:func:`stop_with_parent`); a SIGTERM/SIGINT/SIGHUP here is passed on to them as SIGTERM
    (they checkpoint and stop), a second one kills them. ``timeout_s`` bounds the whole job.

    Raises:
        WorkerFailedError: a worker died or crashed (with its signal, exit code or traceback).
        ScalesgdError: the first user-facing error a worker reported (its own type).
        DistributedError: the job ran past ``timeout_s``.
        StoppedError: a second stop signal arrived before the workers had stopped.
    """
    if port is None:
        port = free_port(addr)
    else:
        check_port_free(port, addr)
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    # Plain pickle copies tensors by value; multiprocessing's own pickler would share them through file
    # descriptors served by this process, which breaks when several jobs are spawned in a row.
    payload = pickle.dumps((fn, args))
    procs = []
    outcomes: dict[int, tuple[str, Any]] = {}
    arrivals: list[tuple[int, str, Any]] = []
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failure: tuple[int, str, Any] | None = None

    def drain() -> None:
        while not results.empty():
            status, rank, out = results.get()
            outcomes[rank] = (status, out)
            arrivals.append((rank, status, out))

    # A signal to the launcher is passed on to the workers, which checkpoint at the next step and stop.
    with StopRequest() as stop:
        forwarded = False
        try:
            for rank in range(nprocs):
                rdv = Rendezvous(addr=addr, port=port, rank=rank, size=nprocs, local_rank=rank)
                p = ctx.Process(target=_child, args=(payload, rdv, results, os.getpid()), daemon=False)
                p.start()
                procs.append(p)
            while len(outcomes) < nprocs:
                if stop.signum is not None and not forwarded:
                    for p in procs:
                        if p.is_alive():
                            os.kill(p.pid, signal.SIGTERM)
                    forwarded = True
                if stop.count > 1:  # asked twice: do not wait for the checkpoint
                    failure = (-1, "stopped", f"stopped by a second {stop.name}; the workers were killed and "
                                              "the last checkpoint written stands")
                    break
                drain()
                if any(status != "ok" for status, _ in outcomes.values()):
                    failure = _first_failure(procs, arrivals)
                    break
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcomes]
                if dead:
                    time.sleep(0.2)  # let a dying worker's report arrive before blaming it
                    drain()
                    if not any(r in outcomes for r in dead):
                        failure = _first_failure(procs, arrivals)
                        break
                    continue
                if all(p.exitcode == 0 for p in procs) and results.empty() and len(outcomes) < nprocs:
                    time.sleep(0.1)
                    drain()
                    if len(outcomes) < nprocs:
                        missing = sorted(set(range(nprocs)) - set(outcomes))
                        failure = (missing[0], "crash", f"worker {missing[0]} exited without a result")
                        break
                if deadline is not None and time.monotonic() > deadline:
                    failure = (-1, "timeout", f"the job did not finish within {timeout_s:.0f} s")
                    break
                time.sleep(0.02)
            if failure is not None and failure[1] not in ("timeout", "stopped"):
                # The first report may be a survivor's "connection reset": give the others up to 2 s to
                # exit or report, then blame the rank that really failed first.
                settle = time.monotonic() + 2.0
                while time.monotonic() < settle and any(p.is_alive() and r not in outcomes
                                                        for r, p in enumerate(procs)):
                    time.sleep(0.05)
                    drain()
                drain()
                failure = _first_failure(procs, arrivals)
        finally:
            if failure is not None or len(outcomes) < nprocs:
                for p in procs:  # SIGKILL: a survivor's checkpoint could not complete without its peers
                    if p.is_alive():
                        p.kill()
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    if failure is not None:
        rank, status, payload = failure
        if status == "error":
            kind, _, message = str(payload).partition(":")
            raise _rebuild_error(kind, message)
        if status == "timeout":
            raise DistributedError(f"{payload}; the workers were stopped")
        if status == "stopped":
            raise StoppedError(payload)
        if status == "died":
            raise WorkerFailedError(f"{payload}; the other workers were stopped")
        raise WorkerFailedError(f"worker {rank} failed:\n{payload}")
    return [pickle.loads(outcomes[r][1]) for r in range(nprocs)]


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

