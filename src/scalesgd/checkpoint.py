"""Checkpoints of a running job: what is saved, where, how it is read back, and how many are kept.

A checkpoint is one file ``RUN_DIR/checkpoints/step-<step>.pt`` written by rank 0 (atomically: temporary
file, fsync, rename, fsync of the directory; :func:`scalesgd.writer.atomic_path`). It holds everything the
next step needs: the :class:`~scalesgd.train_state.TrainState` (parameters, optimizer and transform state,
estimator and batch-policy state, data cursor, counters), the model's state_dict (buffers included), the
run's config, every rank's own RNG states (torch, the communication generator, numpy, Python ``random``),
the wall time so far, the last evaluation and the byte length of ``metrics.jsonl`` when it was taken (a
resume cuts the file back to it, so no step is logged twice or lost).

Files hold tensors and plain Python only and are read with ``torch.load(weights_only=True)``: a file that
is truncated, holds pickled code, is of another format version or another model is refused with one
:class:`CheckpointError` line, never executed and never a traceback.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import json

import numpy as np
import torch

from scalesgd.config import FIELDS, RunConfig
from scalesgd.errors import CheckpointError, ConfigError
from scalesgd.writer import atomic_path, write_json_atomic

FORMAT = "scalesgd-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


def checkpoint_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: Path | str, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """The run's checkpoints, oldest first (by step; temporary files are not listed)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial_writes(run_dir: Path | str) -> list[Path]:
    """Delete the temporary files (``.NAME.*.tmp``, :func:`scalesgd.writer.atomic_path`) that a writer killed
    mid-write left in ``run_dir`` and its checkpoint directory; returns them. Only for the job that holds the
    run directory's lock: no other process writes there then."""
    removed = []
    for d in (Path(run_dir), checkpoint_dir(run_dir)):
        for tmp in d.glob(".*.tmp") if d.is_dir() else []:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


# --------------------------------------------------------------------------------------------------------
# Per-rank RNG states, as tensors and plain Python


def rng_state(comm_generator: torch.Generator) -> dict[str, Any]:
    """This process's RNG states: torch's global CPU generator (dropout), the communication generator
    (QSGD's rounding), numpy's and Python's global generators."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "comm": comm_generator.get_state(),
            "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                      float(cached)],
            "python": [int(version), list(internal), gauss],
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}


def set_rng_state(saved: dict[str, Any], comm_generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved (numpy's and Python's generators, torch's CPU (and CUDA)
    generator and ``comm_generator``)."""
    torch.set_rng_state(saved["torch"])
    comm_generator.set_state(saved["comm"])
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    if saved.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])


# --------------------------------------------------------------------------------------------------------
# Writing and reading


def save(run_dir: Path | str, blob: dict[str, Any], *, keep: int) -> Path:
    """Write ``blob`` as the checkpoint of ``blob["step"]`` and delete all but the newest ``keep``.

    The file appears complete or not at all: written to a temporary file, fsynced, renamed, and the
    directory fsynced so the rename survives a power cut. On any error (a full disk) the temporary file is
    removed and the previous checkpoints are untouched.

    Raises:
        CheckpointError: the file could not be written (with the cause, e.g. no space left on the device).
    """
    path = checkpoint_path(run_dir, int(blob["step"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            torch.save({"format": FORMAT, "version": FORMAT_VERSION, **blob}, tmp)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise CheckpointError(f"could not write the checkpoint {path}: {e.strerror or e}; the previous "
                              "checkpoints are intact. Free space or pick another --run-dir") from None
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load(path: Path | str, *, num_parameters: int | None = None) -> dict[str, Any]:
    """Read and check a checkpoint written by :func:`save` (``torch.load(weights_only=True)`` only).

    Args:
        path: the file.
        num_parameters: when given, the model's parameter count; a checkpoint of another model is refused.
    Raises:
        CheckpointError: one line, when the file is missing, truncated or not a torch file, holds anything
            but tensors and plain Python (pickled code is refused by the loader, never run), is of another
            format or format version, or of another model.
    """
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError) as e:
        # a truncated zip, a foreign file, or a global the weights-only unpickler refuses: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {first[:200]}); it is "
                              "truncated, not a scalesgd checkpoint, or holds pickled code (never loaded). "
                              "Delete it to resume from the previous one") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a scalesgd checkpoint (no format tag {FORMAT!r})")
    if blob.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {blob.get('version')!r}; this scalesgd "
                              f"reads version {FORMAT_VERSION}. Resume it with the scalesgd that wrote it")
    missing = [k for k in ("step", "train_state", "model", "ranks", "config", "metrics_bytes") if k not in blob]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it is damaged")
    if num_parameters is not None:
        saved = blob["train_state"]["params"]
        if not isinstance(saved, torch.Tensor) or saved.numel() != num_parameters:
            n = saved.numel() if isinstance(saved, torch.Tensor) else "?"
            raise CheckpointError(f"checkpoint {path} holds a model with {n} parameters, this run's has "
                                  f"{num_parameters}; it belongs to another run")
    return blob


# Options a resume may change: they do not change the maths (workers: the global batch, its order and the
# lr do not depend on it; the result matches to float round-off).
RESUME_MAY_CHANGE = ("workers", "progress", "timeout_s", "threads_per_worker", "master_addr", "master_port",
                     "check_replicas_every", "checkpoint_every_steps", "checkpoint_every_s", "keep_checkpoints",
                     "max_restarts", "loader_workers")


def write_run_config(run_dir: Path | str, config: dict[str, Any]) -> None:
    """``checkpoints/config.json``: the run's options exactly as given (``RunConfig.to_dict()``), what a resume
    reads (the run's own config.json replaces n_train by the data set's size)."""
    checkpoint_dir(run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(checkpoint_dir(run_dir) / "config.json", config)


def resume_config(run_dir: Path | str, given: dict[str, Any]) -> RunConfig:
    """The configuration of the run in ``run_dir`` (``checkpoints/config.json``, else its config.json), with
    the options in ``given`` that :data:`RESUME_MAY_CHANGE` applied.

    Args:
        run_dir: the run directory to continue.
        given: options the user set on the command line (or a --config file), by field name.
    Raises:
        ConfigError: no such run directory or config.json, or ``given`` contradicts the run's configuration
            in an option that changes the maths (one line naming the option and both values).
    """
    run_dir = Path(run_dir)
    path = checkpoint_dir(run_dir) / "config.json"
    if not path.is_file():  # a run from before checkpoints: its config.json (n_train there is the data's size)
        path = run_dir / "config.json"
    if not path.is_file():
        what = ("no such directory" if not run_dir.exists() else "it is a file, not a run directory"
                if not run_dir.is_dir() else "it has no config.json")
        raise ConfigError(f"cannot resume {run_dir}: {what}; pass a run directory that `scalesgd train` wrote")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        known = {k: v for k, v in saved.items() if k in FIELDS}
        known["lr_milestones"] = tuple(known.get("lr_milestones", ()))
        cfg = RunConfig(**known)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot resume {run_dir}: its config.json is unreadable ({e})") from None
    changes: dict[str, Any] = {"run_dir": str(run_dir)}
    for name, value in given.items():
        if name == "run_dir":
            if value is not None and Path(value).resolve() != run_dir.resolve():
                raise ConfigError(f"--resume {run_dir} continues the run in its own directory; leave out "
                                  f"--run-dir {value}")
        elif name in RESUME_MAY_CHANGE:
            changes[name] = value
        elif value != getattr(cfg, name):
            option = name.replace("_", "-")
            was = getattr(cfg, name)
            raise ConfigError(f"--{option} {value} contradicts the resumed run's "
                              f"{f'{option} = {was}' if was is not None else f'unset --{option}'} "
                              f"({path}); leave --{option} out, or start a new run to change it")
    return cfg.replace(**changes)
