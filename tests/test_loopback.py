"""Issue 18, item 9: everything a local run opens listens on the loopback address only.

A local run (``--workers P``, no torchrun) used to serve its rendezvous store on every interface (``*:PORT``:
its keys could be read and written from another address of the machine without authentication); gloo's
sockets listened on whatever the machine's hostname resolves to (or on ``GLOO_SOCKET_IFNAME``), and ring-tcp
on an address found from a ``MASTER_ADDR`` a shell may have left set. The tests run in an environment that
tempts every one of them off loopback: ``MASTER_ADDR`` and ``GLOO_SOCKET_IFNAME`` name a non-loopback
interface of this machine when it has one. The sockets in LISTEN state are read from ``/proc/net/tcp`` and
``/proc/net/tcp6`` and matched to the run's processes by inode (``/proc/PID/fd``).
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.spawn  # Linux: reads /proc


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").exists() else []:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                pass
    return out


def _socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, PermissionError):
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    return inodes


def _address(hex_addr: str) -> str:
    """An address of /proc/net/tcp{,6}: hex of the in-memory bytes, 32-bit words in host order."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(int.from_bytes(raw[i:i + 4], "big").to_bytes(4, sys.byteorder) for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words)


def listening(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state (st 0A) that one of ``pids`` holds."""
    inodes = _socket_inodes(pids)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                addr, port = fields[1].rsplit(":", 1)
                found.append((_address(addr), int(port, 16)))
    return found


def is_loopback(addr: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _interface_address(name: str) -> str | None:
    """The IPv4 address of interface ``name`` (SIOCGIFADDR), None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def tempting_environment() -> dict[str, str]:
    """This process's environment with MASTER_ADDR and GLOO_SOCKET_IFNAME pointing at a non-loopback interface
    of this machine (as a shell or a cluster profile may leave them), when it has one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                           "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
    for _, name in socket.if_nameindex():
        addr = _interface_address(name)
        if addr is not None and not is_loopback(addr):
            env.update(MASTER_ADDR=addr, GLOO_SOCKET_IFNAME=name)
            break
    return env


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


RUN = ["--model", "mlp", "--dataset", "synthetic-logreg", "--steps", "100000", "--workers", "2",
       "--global-batch-size", "32", "--threads-per-worker", "1", "--no-progress", "--timeout-s", "60",
       "--diversity", "off"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("options", [["--comm", "allreduce"], ["--comm", "ring"], ["--comm", "ps"],
                                     ["--comm", "ring-tcp"], ["--comm", "qsgd+ps"],
                                     ["--comm", "ps", "--backup-workers", "1"], ["--master-port", "free"]],
                         ids=["allreduce", "ring", "ps", "ring-tcp", "qsgd+ps", "backup-workers", "master-port"])
def test_a_local_run_listens_on_loopback_only(tmp_path, options):
    if options[-1] == "free":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            options = [options[0], str(s.getsockname()[1])]
    run_dir = tmp_path / "run"
    env = tempting_environment()
    proc = subprocess.Popen([sys.executable, "-m", "scalesgd", "train", *RUN, *options, "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 200
        seen: set[tuple[str, int]] = set()
        while time.monotonic() < deadline:
            seen.update(listening(_descendants(proc.pid)))
            steps = [r["step"] for r in _records(run_dir) if r["kind"] == "step"]
            if steps and steps[-1] >= 5:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        else:
            raise AssertionError("the run did not reach step 5")
        seen.update(listening(_descendants(proc.pid)))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    # the launcher's store and each worker's gloo listener, at least
    assert len(seen) >= 2, seen
    assert all(is_loopback(addr) for addr, _ in seen), f"listening off loopback: {sorted(seen)} (env {env.get('MASTER_ADDR')})"
    if options[0] == "--master-port":
        assert ("127.0.0.1", int(options[1])) in seen  # the store on the port asked for, loopback only


def _mesh_listeners(rdv):
    """In a worker: the addresses every socket this process listens on while the ring-tcp strategy builds its
    mesh (its listener lives only until the peers have connected), and after one all-reduce what still
    listens (gloo's)."""
    import torch

    from scalesgd import distributed
    from scalesgd.comm import make_comm

    bound = []

    class Recording(socket.socket):
        def listen(self, *args):
            bound.append(self.getsockname()[0])
            return super().listen(*args)

    world = distributed.init_world(rdv, "gloo", timeout_s=60)
    try:
        socket.socket = Recording  # tcp_comm calls socket.socket(...)
        comm = make_comm("ring-tcp", world, generator=torch.Generator().manual_seed(0))
        buf = torch.ones(1000)
        comm.allreduce_(buf)
        comm.close()
        return world.host, bound, listening([os.getpid()]), float(buf[0])
    finally:
        distributed.shutdown_world()


@pytest.mark.timeout(300)
def test_ring_tcp_listens_on_the_address_the_workers_meet_on(monkeypatch):
    from scalesgd import distributed

    for name, value in tempting_environment().items():
        monkeypatch.setenv(name, value)
    results = distributed.spawn(_mesh_listeners, 2, timeout_s=200)
    for host, bound, still, total in results:
        assert total == 2.0
        assert host == "127.0.0.1" and bound and all(is_loopback(a) for a in bound), (host, bound)
        assert still and all(is_loopback(a) for a, _ in still), still  # gloo's own listener
