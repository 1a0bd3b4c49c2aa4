"""How local worker processes are started: forked from a server that has already imported the training code.

A worker started the ``spawn`` way is a fresh interpreter: it imports torch and this package again, in every
worker of every job, and tears them down again at exit. The fork server (multiprocessing's ``forkserver``
start method) is one extra process that imports them once and then forks a worker per request; a forked
worker starts with everything imported and leaves through ``os._exit``. A sweep or a test session that starts
many jobs pays the imports once.

Why forking from the server is safe: the server only imports, and never computes. Importing torch starts
no OpenMP pool, no CUDA context and no process group, so each worker begins as a fresh interpreter would
and makes its own; the one thread an import starts, numpy's idle OpenBLAS pool, OpenBLAS itself stops and
restarts across fork (``pthread_atfork``), as for any forked numpy program.

Multiprocessing hands each worker the launcher's working directory, ``sys.path`` and ``sys.argv``;
:func:`scalesgd.distributed.spawn` hands it the rest of what a fork from the server would otherwise take
from the server instead of the launcher: the environment, stdout and stderr. Only what torch reads from the
environment while it is imported comes from the environment the server started in.

:func:`prestart` starts the server and returns at once; the command line calls it before it imports torch
itself, so that the server's imports run on another core while the launcher does its own. That is why this
module imports nothing heavy. Where the platform has no fork server (Windows), workers are spawned.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import signal
from collections.abc import Mapping
from multiprocessing.context import BaseContext

# What the server imports before it forks anyone: the training loop, and with it torch and the package;
# TensorBoard's writer, which rank 0 imports as it opens the run directory (imported once here, off the path
# from launch to first step, instead of in every job's rank 0); and the command line, whose script every
# worker re-runs as multiprocessing's __mp_main__ (a no-op import once it is here).
PRELOAD = ("scalesgd.run", "torch.utils.tensorboard", "scalesgd.cli")


def worker_context() -> BaseContext:
    """The multiprocessing context that local workers are started with: the preloaded fork server where the
    platform has one, else ``spawn``. The preload list only takes effect when the server starts."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    atexit.unregister(_end_server)  # registered once, however often this is called
    atexit.register(_end_server)
    return ctx


def _end_server() -> None:
    """At exit, end the fork server this process started, at once.

    Left alone, the server notices that its launcher is gone and exits through a full interpreter shutdown
    (torch's included: seconds on a busy machine), holding the launcher's stdout and stderr all the while, so
    that whoever reads them to the end (a shell pipe, ``subprocess.run``) waits for it. It holds nothing else
    worth a clean exit: its workers have been joined, and its socket file is removed by this process.
    """
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)  # multiprocessing keeps no public handle
    if pid is None:  # none started by this process
        return
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):  # already gone, or reaped elsewhere
        pass


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether torchrun (or a launcher that sets the same variables) made this process a rank (then it is a
    worker itself and starts none). ``environ`` defaults to ``os.environ``; the values are read by
    :func:`scalesgd.distributed.torchrun_rendezvous`."""
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env


def prestart() -> None:
    """Start the fork server now, without waiting for its imports, unless this process is a torchrun rank.

    Starting it twice is harmless (it is started once per process and restarted if it died)."""
    if launched_by_torchrun() or worker_context().get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    forkserver.ensure_running()
