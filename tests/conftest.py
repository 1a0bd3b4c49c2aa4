"""Test tiers: every test that starts a process carries the ``spawn`` marker, and the fast tier proves it.

``make test`` runs everything. ``make test-fast`` runs ``pytest -m "not spawn"`` with SCALESGD_TEST_TIER=fast,
and then the guard below makes any test that starts a process fail, naming itself: a multiprocessing
process (workers, the fork server), a subprocess (torchrun, the CLI, git), or a bare fork/posix_spawn/system.
A test that needs a process is marked ``@pytest.mark.spawn`` (or by a module-level ``pytestmark``), so a
mislabelled test cannot hide in the fast tier.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing.process
import multiprocessing.util
import os
import subprocess
import sys

import pytest

FAST_TIER = os.environ.get("SCALESGD_TEST_TIER") == "fast"


class ProcessInFastTier(AssertionError):
    """A test without the ``spawn`` marker started a process while the fast tier was running."""


def _refuse(nodeid: str, what: str):
    def start(*args, **kwargs):
        if what == "subprocess" and len(args) > 1:  # Popen.__init__(self, args, ...): say which command
            command = args[1] if isinstance(args[1], str) else " ".join(map(str, args[1]))
            detail = f"subprocess: {command[:80]}"
        else:
            detail = what
        raise ProcessInFastTier(f"{nodeid} started a process ({detail}) in the fast tier; mark it "
                                "@pytest.mark.spawn (or pytestmark = pytest.mark.spawn) so that it runs only in "
                                "`make test`")
    return start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Around the whole of a test (setup of the fixtures it brings in, of any scope; call; teardown): in the
    fast tier, an unmarked test may not start a process."""
    if not FAST_TIER or item.get_closest_marker("spawn") is not None:
        yield
        return
    import scalesgd.launch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multiprocessing.process.BaseProcess, "start", _refuse(item.nodeid, "multiprocessing"))
        mp.setattr(multiprocessing.util, "spawnv_passfds", _refuse(item.nodeid, "multiprocessing helper process"))
        mp.setattr(subprocess.Popen, "__init__", _refuse(item.nodeid, "subprocess"))
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
            if hasattr(os, name):
                mp.setattr(os, name, _refuse(item.nodeid, f"os.{name}"))
        # Starting the fork server early only saves time (scalesgd.launch); a test that needs workers still
        # starts them, and is caught above.
        mp.setattr(scalesgd.launch, "prestart", lambda: None)
        yield


@contextlib.contextmanager
def _load_script(path, name: str):
    """A bench or experiment script imported from its file as module ``name`` (registered in sys.modules while
    in use: dataclasses look their module up there as the file executes)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def load_script():
    """``with load_script(path, name) as module:`` — see :func:`_load_script`."""
    return _load_script
