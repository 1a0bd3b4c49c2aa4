"""Reading run directories: the only input of reports, plots, sweeps, ``predict`` and the benches.

One reader, strict: a damaged file is one :class:`~scalesgd.errors.DataError` line naming the file (and the
line of ``metrics.jsonl``) and what is wrong, never a record silently dropped. Also here: the one
definition of *passes to a target* (:func:`passes_to_target`), used by ``sweep``, ``predict`` and
``bench/time_to_accuracy.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from scalesgd.errors import DataError

# Keys a metrics line must carry for the reader to place it: every line has a kind; steps and evaluations
# are placed on the step and epoch axes (plots, passes to target).
REQUIRED_KEYS = {"step": ("step", "epoch"), "eval": ("step", "epoch")}
# Kinds whose every value (but ``kind``) is a number or null, as the trainer writes them: a string there would
# otherwise be skipped as "not finite" by readers that filter with :func:`finite` (another estimator chosen
# silently) or fail deep inside arithmetic.
NUMERIC_KINDS = ("step", "eval", "diversity")
# The trainer's non-numeric values in those kinds, by key, with the type each must have: local SGD's flags (a
# step without the all-reduce, a step that ended with an average) and the ranks whose gradients a backup-workers
# step used (:mod:`scalesgd.backup_comm`).
NON_NUMERIC_KEYS = {"local_sgd": "a boolean", "averaged": "a boolean", "backup_used_ranks": "a list of ranks"}
# Config keys that say nothing about what was run (where it was written, how it printed), left out when
# runs are told apart by their differences.
_NOT_A_DIFFERENCE = {"run_dir", "progress", "extra", "master_port", "master_addr", "checkpoint_every_steps",
                     "checkpoint_every_s", "keep_checkpoints", "max_restarts"}


@dataclass(frozen=True)
class RunData:
    """A run directory (written by :class:`scalesgd.writer.RunWriter`), read lazily and strictly."""

    path: Path

    @staticmethod
    def open(path: Path | str) -> "RunData":
        """The run directory at ``path``; :class:`DataError` if it has no ``metrics.jsonl``."""
        path = Path(path)
        if not (path / "metrics.jsonl").is_file():
            raise DataError(f"{path} is not a run directory (no metrics.jsonl); pass the directory that "
                            "`scalesgd train` printed")
        return RunData(path)

    @cached_property
    def config(self) -> dict[str, Any]:
        """config.json ({} when absent)."""
        return _read_json(self.path / "config.json") or {}

    @cached_property
    def summary(self) -> dict[str, Any] | None:
        """summary.json, written last by a finished run; None for a run that was interrupted or diverged."""
        return _read_json(self.path / "summary.json")

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        """Every line of metrics.jsonl, in order.

        Raises:
            DataError: naming ``metrics.jsonl:LINE`` for a line that is not UTF-8, not JSON (the last line: a
                write cut short; an earlier one: the file is damaged), not a JSON object, lacks a key in
                :data:`REQUIRED_KEYS`, or (a line of :data:`NUMERIC_KINDS`) holds a value that is not a number.
        """
        path = self.path / "metrics.jsonl"
        numbered = [(no, raw) for no, raw in enumerate(path.read_bytes().splitlines(), 1) if raw.strip()]
        out = []
        for i, (line_no, raw) in enumerate(numbered):
            where = f"{path}:{line_no}"
            # only the last line can be cut off by an interrupted run; anything earlier was damaged afterwards
            fix = ("the run was cut off mid-write: re-run it or delete that line" if i == len(numbered) - 1 else
                   "the file is damaged (only the last line can be cut off by an interrupted run): re-run it")
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{where} is not UTF-8 text (byte {e.start + 1} of the line); {fix}") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e}); {fix}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where} is a JSON {type(rec).__name__}, not an object; metrics.jsonl holds "
                                "one object per line as `scalesgd train` writes it")
            kind = rec.get("kind")
            missing = [k for k in ("kind", *REQUIRED_KEYS.get(kind, ())) if k not in rec]
            if missing:
                raise DataError(f"{where} lacks the key {missing[0]!r}; this is not a metrics line that "
                                "`scalesgd train` writes (kind=step/eval lines carry step and epoch)")
            if kind in NUMERIC_KINDS:
                bad = [k for k, v in rec.items() if k != "kind" and v is not None and not _valid_value(k, v)]
                bad += [k for k in REQUIRED_KEYS.get(kind, ()) if rec[k] is None and k not in bad]
                if bad:
                    wanted = NON_NUMERIC_KEYS.get(bad[0], "a number")
                    raise DataError(f"{where}: {bad[0]!r} is {json.dumps(rec[bad[0]])}, not {wanted}; a kind={kind} "
                                    "line of `scalesgd train` holds numbers (or null) only, but for "
                                    f"{', '.join(NON_NUMERIC_KEYS)}: the file is damaged or was edited, re-run it "
                                    "or fix that value")
            out.append(rec)
        return out

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == "step"]

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == "eval"]

    @property
    def updates(self) -> list[dict[str, Any]]:
        """An asynchronous run's applied updates (``--algorithm async-ps|hogwild``), in the order written; a
        synchronous run has none (its lines are :attr:`steps`)."""
        return [r for r in self.records if r["kind"] == "update"]

    @property
    def label(self) -> str:
        """``model B=… P=…`` from config.json (the directory name when there is none)."""
        c = self.config
        if not c:
            return self.path.name
        return f"{c.get('model')} B={c.get('global_batch_size')} P={c.get('workers')}"

    def time_breakdown(self, skip: int = 5) -> dict[str, Any]:
        """Median per-step compute, wait, all-reduce transfer and update per rank (warm-up skipped).

        Rank 0 logs every rank's compute time (carried in the all-reduce, ``compute_s_rank{r}``); a rank's
        wait is the slowest rank's compute minus its own. Each rank's all-reduce and update times of step t
        ride in step t+1's all-reduce (``prev_comm_s_rank{r}``, ``prev_update_s_rank{r}`` of the record of
        step t+1); a rank's transfer at step t is its all-reduce time minus its wait. Runs written before
        those fields existed carry rank 0's times only: their transfer and update are then rank 0's, the
        same number for every rank, and ``per_rank_comm`` is False. A run resumed with another worker count is
        described by its last world's steps (those that carry its ranks). Local-SGD steps (``local_sgd``) are
        left out: they all-reduce nothing, so their records hold rank 0's compute only (the other ranks' slots
        are 0).

        Returns:
            ``compute_s``, ``wait_s``, ``transfer_s``, ``update_s``: lists, one median per rank (seconds;
            empty without synchronous step records); ``per_rank_comm``: whether transfer and update are each
            rank's own.
        """
        synchronous = [s for s in self.steps if not s.get("local_sgd")]
        if not synchronous:
            return {"compute_s": [], "wait_s": [], "transfer_s": [], "update_s": [], "per_rank_comm": False}

        def ranks_of(step: dict[str, Any]) -> list[int]:
            return sorted(int(k[len("compute_s_rank"):]) for k in step if k.startswith("compute_s_rank"))

        # the last world's ranks: a run resumed with another --workers logs another set after the resume
        ranks = ranks_of(synchronous[-1])
        current = [s for s in synchronous if ranks_of(s) == ranks]
        steps = current[skip:] or current
        compute = np.array([[s[f"compute_s_rank{r}"] for r in ranks] for s in steps])  # (steps, P)
        slowest = compute.max(axis=1, keepdims=True)
        wait = slowest - compute
        following = {s["step"] - 1: s for s in self.steps}  # step t's own times are in step t+1's record
        keys = [(f"prev_comm_s_rank{r}", f"prev_update_s_rank{r}") for r in ranks]
        rows = [i for i, s in enumerate(steps)
                if all(c in following.get(s["step"], {}) and u in following[s["step"]] for c, u in keys)]
        if rows:
            comm = np.array([[following[steps[i]["step"]][c] for c, _ in keys] for i in rows])  # (steps, P)
            update = np.array([[following[steps[i]["step"]][u] for _, u in keys] for i in rows])
            transfer = np.maximum(comm - wait[rows], 0.0)
            per_rank = True
        else:  # rank 0's all-reduce and update only
            rank0 = np.maximum(np.array([s["comm_s"] for s in steps]) - wait[:, 0], 0.0)
            transfer = np.repeat(rank0[:, None], len(ranks), axis=1)
            update = np.repeat(np.array([s["update_s"] for s in steps])[:, None], len(ranks), axis=1)
            per_rank = False
        return {"compute_s": [float(v) for v in np.median(compute, axis=0)],
                "wait_s": [float(v) for v in np.median(wait, axis=0)],
                "transfer_s": [float(v) for v in np.median(transfer, axis=0)],
                "update_s": [float(v) for v in np.median(update, axis=0)], "per_rank_comm": per_rank}


def distinct_labels(runs: Sequence[RunData]) -> list[str]:
    """A label per run that tells the runs apart: ``model B=… P=…`` plus every config option whose value
    differs between the runs (``comm=ring``); the directory (name, else path) when nothing else does."""
    labels = [run.label for run in runs]
    configs = [run.config for run in runs]
    keys = sorted({k for c in configs for k in c} - _NOT_A_DIFFERENCE - {"model", "global_batch_size", "workers"})
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    out = []
    for run, label, c in zip(runs, labels, configs):
        extra = " ".join(f"{k}={c.get(k)}" for k in differ)
        out.append(f"{label} {extra}".strip())
    if len(set(out)) < len(out):  # the same options: only the directory tells them apart
        names = [run.path.name for run in runs]
        where = names if len(set(names)) == len(names) else [str(run.path) for run in runs]
        out = [f"{label} ({w})" for label, w in zip(out, where)]
    return out


# ---------------------------------------------------------------------------------------------------------
# Passes to a target


@dataclass(frozen=True)
class TargetCrossing:
    """Where an evaluation metric first reaches its target: the epoch and each requested clock there."""

    passes: float  # epochs (passes over the training set) at the target
    clocks: dict[str, float]  # each requested key of the evaluations (e.g. train_time_s), at the same point


def passes_to_target(evals: Sequence[Mapping[str, Any]], metric: str, target: float, *,
                     clocks: Sequence[str] = ()) -> TargetCrossing | None:
    """Passes (epochs) at which ``metric`` first reaches ``target``, linearly interpolated between evaluations.

    Let e_k be the first evaluation with m_k ≥ target and e_j the last one before it with a value
    (m_j < target). Then, with f = (target − m_j) / (m_k − m_j) ∈ (0, 1],

        passes = epoch_j + f · (epoch_k − epoch_j),

    and every key in ``clocks`` (``train_time_s``, ``time_s``, …) is interpolated with the same f. When the
    first evaluation is already at the target there is nothing to interpolate from, and its own values are
    returned. Evaluations whose ``metric`` is None (a regression run's accuracy) are skipped. Interpolating
    makes the measure finer than the evaluation interval and unbiased by it (the first-evaluation-past rule
    overstates passes by half an interval on average); it assumes the metric rises about linearly between
    two evaluations, the same assumption as the sweep's figures.

    Args:
        evals: evaluation records in order (``kind == "eval"`` lines of metrics.jsonl or the like), each with
            ``epoch``, ``metric`` and the ``clocks`` keys.
        metric: the key compared with ``target`` (``test_accuracy``, ``train_accuracy``).
        target: the target value (an accuracy in (0, 1]).
        clocks: further keys to interpolate at the crossing.
    Returns:
        :class:`TargetCrossing`, or None when no evaluation reaches the target.
    Raises:
        DataError: an evaluation at or just before the crossing lacks ``epoch`` or a clock key.
    """
    prev = None
    for rec in evals:
        value = rec.get(metric)
        if value is None:
            continue
        if value >= target:
            keys = ("epoch", *clocks)
            for r in (rec, prev) if prev is not None else (rec,):
                missing = [k for k in keys if r.get(k) is None]
                if missing:
                    raise DataError(f"an evaluation record lacks {missing[0]!r}, needed for passes to the target")
            if prev is None:
                at = {k: float(rec[k]) for k in keys}
            else:
                f = (target - prev[metric]) / (value - prev[metric])
                at = {k: float(prev[k]) + f * (float(rec[k]) - float(prev[k])) for k in keys}
            return TargetCrossing(passes=at.pop("epoch"), clocks=at)
        prev = rec  # below the target: m_j < target
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    """A run's JSON file, None when absent; :class:`DataError` naming the file when it is damaged."""
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); the run may have been interrupted while writing it: "
                        "re-run it or delete the file") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} holds a JSON {type(value).__name__}, not an object; it is not a file "
                        "`scalesgd train` wrote")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _valid_value(key: str, value: Any) -> bool:
    """Whether ``value`` has the type the trainer writes under ``key`` in a numeric kind (:data:`NON_NUMERIC_KEYS`,
    else a number)."""
    if key == "backup_used_ranks":
        return isinstance(value, list) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                               for r in value)
    if key in NON_NUMERIC_KEYS:
        return isinstance(value, bool)
    return _is_number(value)


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite number (JSON null, strings, booleans and NaN are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
