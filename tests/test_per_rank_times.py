"""Every rank's own all-reduce and update times reach the metrics and ``scalesgd report``'s per-worker table.

Two gloo workers train with rank 1 a straggler (``--straggler rank1x5``), so rank 0 sits in the all-reduce
waiting for rank 1 and the ranks' all-reduce times genuinely differ. Each worker records what it measured
itself (its ``StepResult.comm_s`` / ``update_s``, by wrapping ``train_step`` inside the worker); the metrics
rank 0 wrote must carry exactly those numbers for every rank, and the report's rows must be medians of
each rank's own values — not rank 0's repeated.
"""

from __future__ import annotations

import json
import statistics

import pytest

from scalesgd import distributed, run
from scalesgd.cli import main
from scalesgd.config import RunConfig

pytestmark = pytest.mark.spawn

STEPS = 16


def _recording_worker(rdv, cfg):
    """``run.worker`` with ``train_step`` wrapped to keep this rank's own (comm_s, update_s) of every step."""
    own = []
    inner = run.train_step

    def recording(**kwargs):
        result, tx_state = inner(**kwargs)
        own.append((result.comm_s, result.update_s))
        return result, tx_state

    run.train_step = recording
    try:
        run.worker(rdv, cfg)
    finally:
        run.train_step = inner
    return own


@pytest.mark.timeout(300)
def test_report_shows_each_ranks_own_transfer_and_update(tmp_path):
    run_dir = tmp_path / "run"
    cfg = RunConfig(dataset="digits", model="mlp", width=256, global_batch_size=256, lr=0.05, steps=STEPS,
                    diversity="off", workers=2, eval_every=1000, eval_train_examples=64, progress=False,
                    threads_per_worker=1, timeout_s=120, seed=0, straggler="rank1x5", run_dir=str(run_dir))
    own = distributed.spawn(_recording_worker, 2, (cfg,), timeout_s=240)  # own[r][i]: rank r's step i (0-based)
    assert [len(o) for o in own] == [STEPS, STEPS]
    steps = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "step"}
    # the record of step t+1 (1-based steps) carries every rank's own times of step t, as that rank measured them
    assert "prev_comm_s_rank0" not in steps[1]  # no step before the first
    for t in range(1, STEPS):
        for r in range(2):
            assert steps[t + 1][f"prev_comm_s_rank{r}"] == pytest.approx(own[r][t - 1][0], rel=1e-6)  # float32 tail
            assert steps[t + 1][f"prev_update_s_rank{r}"] == pytest.approx(own[r][t - 1][1], rel=1e-6, abs=1e-9)
        assert steps[t]["comm_s"] == pytest.approx(own[0][t - 1][0], rel=1e-6)  # rank 0's own line agrees
    # the straggler makes the ranks differ: rank 0 waits inside the all-reduce for slow rank 1
    comm0 = statistics.median(o[0] for o in own[0][1:])
    comm1 = statistics.median(o[0] for o in own[1][1:])
    assert comm0 > 2 * comm1

    assert main(["report", str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| rank | compute (ms) | wait (ms) | transfer (ms) | update (ms) |" in text
    rows = {int(line.split("|")[1]): [float(v) for v in line.split("|")[2:6]]
            for line in text.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")}
    # independent reference: each rank's own medians over steps 6..STEPS-1 (the report skips 5 warm-up records;
    # the last step has no following record to carry its times)
    for r in range(2):
        transfer, update = [], []
        for t in range(6, STEPS):
            c = [steps[t][f"compute_s_rank{q}"] for q in range(2)]
            transfer.append(max(own[r][t - 1][0] - (max(c) - c[r]), 0.0))
            update.append(own[r][t - 1][1])
        assert rows[r][2] == pytest.approx(statistics.median(transfer) * 1e3, abs=2e-3)  # printed to 3 decimals
        assert rows[r][3] == pytest.approx(statistics.median(update) * 1e3, abs=2e-3)
    raw0 = statistics.median(own[0][t - 1][0] for t in range(6, STEPS))
    assert raw0 > rows[0][2] / 1e3 + 1e-4  # rank 0's transfer has its wait taken out
