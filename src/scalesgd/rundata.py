"""Reading run directories: the only input of reports, plots and sweeps."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from scalesgd.errors import ScalesgdError


@dataclass(frozen=True)
class RunData:
    """A run directory, read lazily."""

    path: Path

    @staticmethod
    def open(path: Path | str) -> "RunData":
        path = Path(path)
        if not (path / "metrics.jsonl").exists():
            raise ScalesgdError(f"{path} is not a run directory (no metrics.jsonl); pass the directory that "
                                "`scalesgd train` printed")
        return RunData(path)

    @cached_property
    def config(self) -> dict[str, Any]:
        return _read_json(self.path / "config.json") or {}

    @cached_property
    def summary(self) -> dict[str, Any] | None:
        return _read_json(self.path / "summary.json")

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        out = []
        with open(self.path / "metrics.jsonl") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash; the rest is still good
        return out

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "step"]

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "eval"]

    @property
    def label(self) -> str:
        c = self.config
        if not c:
            return self.path.name
        return f"{c.get('model')} B={c.get('global_batch_size')} P={c.get('workers')}"

    def time_breakdown(self, skip: int = 5) -> dict[str, list[float]]:
        """Median per-step compute, wait, transfer and update time for each rank (warm-up steps skipped).

        Rank 0 logs every rank's compute time (carried in the all-reduce); a rank's wait is the slowest
        rank's compute minus its own, and the transfer is rank 0's all-reduce time minus its wait.
        """
        steps = self.steps[skip:] or self.steps
        if not steps:
            return {"compute_s": [], "wait_s": [], "transfer_s": [], "update_s": []}
        ranks = sorted(int(k[len("compute_s_rank"):]) for k in steps[0] if k.startswith("compute_s_rank"))
        compute = np.array([[s[f"compute_s_rank{r}"] for r in ranks] for s in steps])  # (steps, P)
        slowest = compute.max(axis=1, keepdims=True)
        wait = slowest - compute
        transfer = np.maximum(np.array([s["comm_s"] for s in steps]) - wait[:, 0], 0.0)
        update = np.array([s["update_s"] for s in steps])
        return {"compute_s": list(np.median(compute, axis=0)), "wait_s": list(np.median(wait, axis=0)),
                "transfer_s": [float(np.median(transfer))] * len(ranks),
                "update_s": [float(np.median(update))] * len(ranks)}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ScalesgdError(f"{path} is not valid JSON ({e}); the run may have been interrupted") from None
