"""The run directory: the one place training output is written, by rank 0 only.

``RunWriter(enabled=False)`` is a no-op, so the training loop calls it unconditionally on every rank.
Layout (a run directory describes itself; reports read nothing else)::

    run_dir/config.json      resolved configuration
    run_dir/env.json         versions, git sha, world size, backend, host
    run_dir/metrics.jsonl    one JSON object per step; evaluation lines add test/train accuracy
    run_dir/tensorboard/     TensorBoard event files
    run_dir/summary.json     written last: final accuracy, steps, epochs, wall time, time to target
    run_dir/checkpoint.pt    final model parameters and optimizer step
    run_dir/checkpoints/     the last --keep-checkpoints checkpoints of a running job (scalesgd.checkpoint)
    run_dir/.lock            held (flock) by the job that writes the directory
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import platform
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from scalesgd.errors import ConfigError, DataError, ScalesgdError


RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoint.pt", "config.json")  # what a run writes here


def check_output_dir(path: Path | str | None, option: str) -> None:
    """Refuse an output directory that cannot be one: ``path`` must be a directory or not exist, and the
    nearest existing folder above it must be a writable directory (so ``mkdir(parents=True)`` and the writes
    after it will work). Call before anything is spawned or written, so a bad ``--out`` fails in one line
    instead of a traceback from a worker.

    Raises:
        ConfigError: naming ``option`` and ``path``, what is wrong and the fix.
    """
    if path is None or str(path) == "":
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file, not a directory; pick a directory (new or existing)")
    above = path if path.exists() else path.parent
    while not above.exists():  # the nearest existing ancestor is where mkdir will start
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"{option} {path} cannot be created: {above} is a file, not a directory; pick another path")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path} cannot be written: no write permission in {above}; pick a directory "
                          "you can write to")


def check_run_dir_is_new(run_dir: str | None, *, locked: bool = False) -> None:
    """Refuse a ``--run-dir`` that already holds a run: the new run would append its steps to the old
    ``metrics.jsonl`` (two runs' records in one file, silently wrong curves and times) and replace the old
    summary and checkpoint. A file, or a place that cannot be created or written, is refused too
    (:func:`check_output_dir`). Call before anything is spawned or written.

    Args:
        run_dir: the ``--run-dir`` given, or None (a fresh one will be named).
        locked: this process already holds the directory's lock (:func:`lock_run_dir`), so a held lock is its
            own and says nothing about another run.

    Raises:
        ConfigError: the directory holds a run (naming the pid of a run still writing there), or cannot be used."""
    if not run_dir:
        return
    check_output_dir(run_dir, "--run-dir")
    found = [name for name in RUN_FILES if (Path(run_dir) / name).exists()]
    holder = _lock_holder(Path(run_dir)) if found and not locked else None
    if holder is not None:  # a run still writing there: "delete the old directory" would pull it from under it
        raise ConfigError(f"--run-dir {run_dir} is in use by another scalesgd run (pid {holder}); wait for it to "
                          "end, stop it, or pick another --run-dir")
    if found:
        # a run stopped before its end (no summary, a checkpoint) is most likely one to continue, not to delete
        stopped = (not (Path(run_dir) / "summary.json").exists()
                   and any((Path(run_dir) / "checkpoints").glob("step-*.pt")))
        advice = (f"Continue it with `scalesgd train --resume {run_dir}`, pick a new --run-dir, or leave it out "
                  "for a fresh one under runs/." if stopped else
                  "Pick a new --run-dir, or leave it out for a fresh one under runs/, or delete the old directory "
                  "first.")
        raise ConfigError(f"--run-dir {run_dir} already holds a run ({', '.join(found)}); a new run there would "
                          f"mix its metrics with the old ones. {advice}")


def _lock_holder(run_dir: Path) -> str | None:
    """The pid written in ``run_dir/.lock`` while another process holds that lock (see :func:`lock_run_dir`),
    else None. Only probes: creates nothing and leaves the lock free."""
    try:
        import fcntl
    except ModuleNotFoundError:  # pragma: no cover - not POSIX: no lock
        return None
    try:
        fd = os.open(run_dir / ".lock", os.O_RDONLY)
    except OSError:  # no lock file: no run has held this directory
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock_run_dir(run_dir: Path | str) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (``fcntl.flock`` on ``run_dir/.lock``) while the block runs, so
    two jobs never write one run directory. Creates the directory. The kernel drops the lock when the
    holder dies, so a killed job never leaves a stale lock behind. A directory this call created is removed
    again if the job wrote nothing into it.

    Raises:
        ConfigError: another process holds the lock (its pid is named), or the directory cannot be made.
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError:
        raise ConfigError(f"--run-dir {run_dir} is a file, not a directory; pick another --run-dir") from None
    except OSError as e:
        raise ConfigError(f"cannot use --run-dir {run_dir}: {e.strerror or e}; pick another --run-dir") from None
    try:
        try:
            import fcntl
        except ModuleNotFoundError:  # pragma: no cover - not POSIX: no lock
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                raise ConfigError(f"--run-dir {run_dir} is in use by another scalesgd run (pid {holder}); wait "
                                  "for it to end, stop it, or pick another --run-dir") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        if created and os.listdir(run_dir) == [".lock"]:  # the job failed before writing: leave nothing behind
            (run_dir / ".lock").unlink()
            run_dir.rmdir()
        os.close(fd)


def truncate_metrics(run_dir: Path | str, nbytes: int) -> None:
    """Cut ``metrics.jsonl`` back to its first ``nbytes`` bytes (its length when a checkpoint was taken), so a
    resumed run logs every step after the checkpoint once.

    Raises:
        ConfigError: the file is shorter than ``nbytes`` (it lost lines the checkpoint
            saw).
    """
    path = Path(run_dir) / "metrics.jsonl"
    size = path.stat().st_size if path.exists() else 0
    if size < nbytes:
        raise ConfigError(f"{path} has {size} bytes but the checkpoint was taken at {nbytes}: lines were lost; "
                          "the run cannot be resumed exactly. Start a new run")
    if size > nbytes:
        with open(path, "r+b") as f:
            f.truncate(nbytes)
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit make it ``path`` in one step.

    The caller writes the whole file to the yielded path (``open``, ``torch.save``, ``savefig``); the file is
    then flushed to disk (fsync) and renamed over ``path`` with :func:`os.replace`, which is atomic within
    one file system, so a reader sees the old file or the new one, never half a file. On an exception the
    temporary file is removed and ``path`` is left as it was. The temporary name is unique (several
    processes may write the same target) and starts with ``.`` so listings skip it.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed it already: fsync the bytes it left
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path | str, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def write_json_atomic(path: Path | str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically, so readers never see half a file.

    Paths, devices and tuples are written as strings and lists; anything else that JSON cannot hold raises
    ``TypeError`` before ``path`` is touched.
    """
    write_atomic(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (Path, torch.device)):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """NaN/inf are not JSON; write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


CHECKPOINT_KEYS = ("model", "step", "config")  # what every reader of checkpoint.pt needs (RunWriter writes more)


def load_checkpoint(path: Path | str, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> dict[str, Any]:
    """Read a ``checkpoint.pt`` that :meth:`RunWriter.save_checkpoint` wrote, tensors and plain Python only.

    ``torch.load(weights_only=True)``: a file holding pickled code is refused by the loader, never run. Every
    failure (missing, truncated, not a zip, refused globals, not a dict, a key of ``keys`` missing) is one
    line naming the file, never torch's advice to load it with ``weights_only=False``.

    Raises:
        DataError: naming ``path``: not there, damaged, or not a scalesgd checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no checkpoint at {path}; pass a run directory written by `scalesgd train` (or its "
                        "checkpoint.pt)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError,
            AttributeError, ImportError, IndexError) as e:
        # torch's own message advises weights_only=False (running the file's code): say what happened instead
        raise DataError(f"{path} cannot be read as a checkpoint ({type(e).__name__}): it is damaged (truncated, "
                        "overwritten) or not a scalesgd checkpoint; files holding pickled code are refused, never "
                        "run. Re-run the training, or pass the checkpoint.pt of another run") from None
    missing = [k for k in keys if k not in blob] if isinstance(blob, dict) else list(keys)
    if missing:
        raise DataError(f"{path} is not a scalesgd checkpoint (it lacks {missing[0]!r}); pass the checkpoint.pt "
                        "that `scalesgd train` wrote")
    return blob


def git_sha(start: Path | None = None) -> str | None:
    """The commit of the source tree scalesgd runs from (or the working directory), if it is a git checkout."""
    for where in (Path(__file__).resolve().parent, start or Path.cwd()):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                 timeout=5)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def environment(*, world_size: int, backend: str, device: torch.device) -> dict[str, Any]:
    """What a reader needs to know about where a run ran."""
    import numpy

    import scalesgd

    env: dict[str, Any] = {
        "scalesgd": scalesgd.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "git_sha": git_sha(),
        "world_size": world_size,
        "backend": backend,
        "device": str(device),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def default_run_dir(model: str, dataset: str, global_batch_size: int, workers: int, seed: int,
                    root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = dataset.split(":")[0]
    base = root / f"{stamp}-{model}-{tag}-B{global_batch_size}-P{workers}-s{seed}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """A failed write (a full disk, a directory made read-only) is one line naming the file and the cause."""
    try:
        yield
    except OSError as e:
        raise ScalesgdError(f"cannot write {path}: {e.strerror or e}; the run stopped here (earlier checkpoints "
                            "are intact). Free space or fix the permissions, then resume with --resume") from None


class RunWriter:
    """Writes the run directory on rank 0; does nothing elsewhere."""

    def __init__(self, run_dir: Path | None, *, enabled: bool, tensorboard: bool = True,
                 tensorboard_every_s: float = 1.0, purge_step: int | None = None):
        self.enabled = enabled and run_dir is not None
        # TensorBoard gets every non-step record (evaluations, diversity, batch changes) but step records at
        # most once per tensorboard_every_s: add_scalar for ~20 values costs about as much as a small model's
        # whole step, and metrics.jsonl keeps every step anyway.
        self.tensorboard_every_s = tensorboard_every_s
        self._tb_last = -math.inf
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._metrics = None
        self._tb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run hides the events the interrupted one wrote after its checkpoint
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def metrics_bytes(self) -> int:
        """The length of ``metrics.jsonl`` so far (every line written is in it; 0 when disabled)."""
        if self._metrics is None:
            return 0
        self._metrics.flush()
        return os.fstat(self._metrics.fileno()).st_size

    def write_json(self, name: str, obj: Any) -> None:
        if self.enabled:
            with _write_errors(self.run_dir / name):
                write_json_atomic(self.run_dir / name, obj)

    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics line (and its numeric fields to TensorBoard, keyed by step)."""
        if not self.enabled:
            return
        clean = {k: _clean(v) for k, v in record.items()}
        with _write_errors(self.run_dir / "metrics.jsonl"):
            self._metrics.write(json.dumps(clean) + "\n")
        if self._tb is not None and "step" in record:
            if record.get("kind") == "step":
                now = time.monotonic()
                if now - self._tb_last < self.tensorboard_every_s:
                    return
                self._tb_last = now
            step = int(record["step"])
            for key, value in record.items():
                if key in ("step", "kind") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if isinstance(value, float) and not math.isfinite(value):
                    continue
                self._tb.add_scalar(key, value, step)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with _write_errors(self.run_dir / "checkpoint.pt"), atomic_path(self.run_dir / "checkpoint.pt") as tmp:
            torch.save(state, tmp)

    def close(self) -> None:
        if self._metrics is not None:
            metrics, self._metrics = self._metrics, None
            with _write_errors(self.run_dir / "metrics.jsonl"):  # flushes what is buffered
                metrics.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
