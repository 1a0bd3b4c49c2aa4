"""allreduce-bench: the fits and the table on synthetic timings, one tiny real run (the α–β fit itself is
tested with the performance model), and bench/allreduce_targets.py's judging of the targets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from scalesgd import allreduce_bench as ab
from scalesgd.cli import build_parser, cmd_allreduce_bench
from scalesgd.errors import ConfigError

TARGETS = Path(__file__).resolve().parents[1] / "bench" / "allreduce_targets.py"


@pytest.fixture(scope="module")
def targets_script():
    spec = importlib.util.spec_from_file_location("allreduce_targets", TARGETS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

ALPHA, BETA = 60e-6, 1.25e-9  # 60 us per message, 0.8 GB/s


def _row(strategy, p, size, t):
    algbw = size / t / 1e9
    return {"strategy": strategy, "world_size": p, "size_bytes": size, "numel": size // 4, "iters": 5,
            "time_s": t, "time_min_s": t, "time_max_s": t, "algbw_GBps": algbw,
            "busbw_GBps": algbw * 2 * (p - 1) / p, "bytes_sent": size}


def test_targets_met_and_missed_on_synthetic_rows(targets_script):
    evaluate_targets = targets_script.evaluate_targets
    sizes = [4096 << k for k in range(15)]
    rtt = 50e-6
    rows = []
    for s in sizes:
        t = float(ab.ring_time_s(s, 2, ALPHA, BETA))
        rows.append(_row("allreduce", 2, s, t))
        rows.append(_row("ring", 2, s, t / 0.8 if 4 << 20 <= s <= 25 << 20 else t))  # 0.8x busbw there
        # at P = 4 the shared CPUs make every byte cost three times as much: one (α, β) cannot fit both P
        rows.append(_row("allreduce", 4, s, float(ab.ring_time_s(s, 4, ALPHA, 3 * BETA))))
    fits = ab.add_fits(rows)
    assert fits["allreduce"]["by_world_size"][2]["alpha_s"] == pytest.approx(ALPHA, rel=1e-6)
    assert fits["allreduce"]["by_world_size"][4]["beta_s_per_byte"] == pytest.approx(3 * BETA, rel=1e-6)
    assert fits["ring"]["by_world_size"][2]["alpha_s"] == fits["ring"]["alpha_s"]
    rows += [_row("ring-tcp", 2, s, t / 0.7 if s == 8 << 20 else t / 1.5) for s in sizes
             for t in [float(ab.ring_time_s(s, 2, ALPHA, BETA))]]
    targets = {t["name"]: t for t in evaluate_targets(rows, {"rtt_s": rtt, "stream_bytes_per_s": 1e9})}
    ring_vs = targets["ring busbw / built-in busbw, P=2, 4-25 MB"]
    assert ring_vs["value"] == pytest.approx(0.8) and ring_vs["verdict"] == "MET" and ring_vs["stretch"] == "MISSED"
    # one slow size is enough to miss: the worst ratio over 4-25 MB counts
    tcp_vs = targets["ring-tcp busbw / built-in busbw, P=2, 4-25 MB"]
    assert tcp_vs["value"] == pytest.approx(0.7) and tcp_vs["verdict"] == "MISSED"
    assert tcp_vs["detail"]["median_ratio_by_size"][str(16 << 20)] == pytest.approx(1.5)
    assert targets["ring-tcp: time of <=4 KB messages / TCP RTT, P=2"]["value"] == pytest.approx(
        float(ab.ring_time_s(4096, 2, ALPHA, BETA)) / 1.5 / rtt)
    small = targets["allreduce: time of <=4 KB messages / TCP RTT, P=2"]
    assert small["value"] == pytest.approx(float(ab.ring_time_s(4096, 2, ALPHA, BETA)) / rtt)
    assert small["verdict"] == ("MET" if small["value"] <= 3 else "MISSED")
    assert targets["allreduce: max |model - measured|/measured, 64 KB-64 MB, a fit per P"]["verdict"] == "MET"
    assert targets["allreduce: max |model - measured|/measured, 64 KB-64 MB, one fit for all P"]["verdict"] == "MISSED"
    # without a P = 2 built-in row the comparison cannot be made
    only_ring = [r for r in rows if r["strategy"] == "ring"]
    assert evaluate_targets(only_ring, None)[0]["verdict"] == "N/A"
    text = ab.format_table(rows, {"rtt_s": rtt, "stream_bytes_per_s": 1e9}, fits)
    assert "# strategy=ring  P=2" in text and "alpha" in text
    assert "MET" not in text and "target" not in text  # the library prints what it measured, nothing more
    judged = targets_script.format_targets(evaluate_targets(rows, None))
    assert "MET" in judged and "MISSED" in judged and "(>= 0.75)" in judged


def test_small_messages_are_timed_back_to_back_within_float32_range():
    assert [ab.calls_per_timing(s) for s in (4096, 128 << 10, 256 << 10, 1 << 20, 4 << 20, 64 << 20)] == [
        32, 32, 16, 4, 1, 1]
    for p in (2, 4, 16, 1024):
        assert p ** ab.calls_per_timing(4096, p) <= 2.0 ** 100  # the buffer grows P-fold per call
    assert ab.calls_per_timing(4096, 1024) == 10


def test_sizes_and_options_parsing():
    assert ab.parse_size("4KB") == 4096 and ab.parse_size("64MiB") == 64 << 20 and ab.parse_size("1000") == 1000
    assert ab.parse_sizes(["4KB:32KB", "1MB"]) == [4096, 8192, 16384, 32768, 1 << 20]
    with pytest.raises(ConfigError):
        ab.parse_size("lots")
    assert ab._parse_options(["qsgd.levels=127", "ring.chunk_bytes=4096", "qsgd.scale=l2",
                              "ring.split_directions=False", "ring-tcp.spin_us=2.5"]) == {
        "qsgd": {"levels": 127, "scale": "l2"}, "ring": {"chunk_bytes": 4096, "split_directions": False},
        "ring-tcp": {"spin_us": 2.5}}
    with pytest.raises(ConfigError):
        ab._parse_options(["levels=3"])
    for bad, match in ((["ring.nope=1"], "cannot take the options nope=1"),
                       (["ring.split_directions=maybe"], "split_directions must be"),
                       (["rign.chunk_bytes=4096"], "unknown communication strategy 'rign'")):
        with pytest.raises(ConfigError, match=match):
            ab._parse_options(bad)  # refused while parsing, before minutes of measuring
    args = build_parser().parse_args(["allreduce-bench", "--quick", "--workers", "2", "3", "--json", "x.json"])
    assert args.func is cmd_allreduce_bench and args.workers == [2, 3] and args.quick
    assert list(ab.DEFAULT_SIZES) == [4096 << k for k in range(15)] and ab.DEFAULT_SIZES[-1] == 64 << 20
    with pytest.raises(ConfigError):
        ab.run_allreduce_bench(["ring"], [4096], [1], iters=1, warmup=0)
    with pytest.raises(ConfigError):
        ab.run_allreduce_bench(["nope"], [4096], [2], iters=1, warmup=0)
    with pytest.raises(ConfigError, match="settle"):
        ab.run_allreduce_bench(["ring"], [4096], [2], iters=1, warmup=0, settle_s=-0.001)


@pytest.mark.spawn
@pytest.mark.timeout(120)
def test_tcp_loopback_probe():
    tcp = ab.measure_tcp_loopback(stream_bytes=8 << 20, repeats=2, n_pings=100)
    assert tcp["stream_bytes_per_s"] > 1e6 and 0 < tcp["rtt_s"] < 0.1


def test_memcpy_probe_times_every_size_and_reports_how_straight_the_costs_are():
    sizes = [64 << 10, 256 << 10, 1 << 20]
    m = ab.measure_memcpy(sizes, repeats=3)
    assert m["sizes_bytes"] == sizes and len(m["times_s"]) == 3 and all(t > 0 for t in m["times_s"])
    assert m["bytes_per_s"] == pytest.approx([s / t for s, t in zip(sizes, m["times_s"])])
    assert 0 <= m["best_line_rel_error"] < 1
    text = ab.format_table([], memcpy=m)
    assert "memory copy" in text and "1 MB" in text and f"{m['best_line_rel_error']:.3f}" in text
    with pytest.raises(ConfigError):
        ab.measure_memcpy([1 << 20])


@pytest.mark.timeout(180)
def test_fit_prices_each_row_with_the_doubling_threshold_that_ran_at_its_p():
    # P = 2 doubled up to 256 KB, P = 4 up to 1.5 MB (the gloo ring's default latency_bytes, 192 KB, while
    # these links' α/β is 47 KB): one (α, β) describes every row exactly only if each row is priced by the
    # algorithm that ran at its own P
    sizes = [16384 << k for k in range(10)]  # 16 KB … 8 MB
    thresholds = {2: 256 << 10, 4: 1536 << 10}
    rows = []
    for p in (2, 4):
        for s in sizes:
            r = _row("ring-tcp", p, s, float(ab.ring_time_s(s, p, ALPHA, BETA, thresholds[p])))
            rows.append(dict(r, doubling_max_bytes=thresholds[p], doubling_p2_bytes=256 << 10))
    fits = ab.add_fits(rows)
    assert (fits["ring-tcp"]["alpha_s"], fits["ring-tcp"]["beta_s_per_byte"]) == pytest.approx((ALPHA, BETA), rel=1e-6)
    assert max(abs(r["model_rel_err"]) for r in rows) < 1e-6
    # priced with P = 2's threshold everywhere, the P = 4 rows between 256 KB and 1.5 MB do not fit
    for r in rows:
        r["doubling_max_bytes"] = 256 << 10
    ab.add_fits(rows)
    assert max(abs(r["model_rel_err"]) for r in rows) > 0.05
    assert "alpha/beta = " in ab.format_table(rows, None, fits)


@pytest.mark.spawn
def test_tiny_real_run_returns_complete_positive_rows(tmp_path):
    sizes = [4096, 65536]
    names = ("allreduce", "ring", "ring-tcp", "qsgd")
    rows = ab.run_allreduce_bench(list(names), sizes, [2], iters=3, warmup=1, timeout_s=150)
    assert [(r["strategy"], r["size_bytes"]) for r in rows] == [(n, s) for n in names for s in sizes]
    for r in rows:
        assert set(ab.ROW_COLUMNS) <= set(r)
        assert r["world_size"] == 2 and r["iters"] == 3
        assert 0 < r["time_min_s"] <= r["time_s"] <= r["time_max_s"]
        assert r["time_min_s"] <= r["time_mean_s"] <= r["time_max_s"] and 0 <= r["slow_frac"] <= 0.5
        # the checked call on integer data: exact strategies sum every element right, qsgd only estimates
        assert r["exact"] == (r["strategy"] != "qsgd")
        assert r["wrong"] == 0 if r["exact"] else r["wrong"] > 0
        assert r["algbw_GBps"] == pytest.approx(r["size_bytes"] / r["time_s"] / 1e9)
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"])  # 2(P-1)/P = 1 at P = 2
        assert r["bytes_sent"] > 0
        # the transport's own floor (a 4-byte ping-pong and exchange between ranks 0 and 1), on every row of the job
        assert 0 < r["p2p_exchange_s"] and 0 < r["p2p_pingpong_s"] < 1.0
    assert "point-to-point, 4 bytes" in ab.format_table(rows, {"rtt_s": 2e-5, "stream_bytes_per_s": 1e9})
    ring = {r["size_bytes"]: r for r in rows if r["strategy"] == "ring"}
    qsgd = {r["size_bytes"]: r for r in rows if r["strategy"] == "qsgd"}
    assert ring[65536]["bytes_sent"] == 65536  # each rank sends 2(P-1)/P·N = N at P = 2
    assert qsgd[65536]["bytes_sent"] < ring[65536]["bytes_sent"] / 4  # 4-bit codes
    # the rows say which sizes our rings sent by recursive doubling, so the fit models those by that algorithm
    assert {r["strategy"]: r["doubling_max_bytes"] for r in rows} == {
        "allreduce": 0, "ring": 256 << 10, "ring-tcp": 256 << 10, "qsgd": 0}
    fits = ab.add_fits(rows)
    assert all(r["model_time_s"] > 0 for r in rows) and set(fits) == set(names)
    json.dumps({"rows": rows, "fits": fits})
    assert {r["strategy"]: r["cost_model"] for r in rows} == {
        "allreduce": "ring", "ring": "ring", "ring-tcp": "ring", "qsgd": "all-gather"}


def _cli(argv):
    return build_parser().parse_args(["allreduce-bench", *argv])


@pytest.mark.spawn
@pytest.mark.timeout(240)
def test_cli_writes_table_json_and_plot(tmp_path, capsys, targets_script):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = _cli(["--quick", "--sizes", "4KB", "64KB", "--iters", "2", "--warmup", "0",
                 "--strategies", "allreduce", "ring-tcp", "--json", str(out_json), "--plot", str(out_png)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "# strategy=ring-tcp  P=2" in text and f"# plot: {out_png}" in text
    assert "timings >= 1.5x their size's median (stalls)" in text
    data = json.loads(out_json.read_text())
    assert {r["strategy"] for r in data["rows"]} == {"allreduce", "ring-tcp"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    assert "targets" not in data and "MET" not in text
    # the targets script judges the saved run
    assert targets_script.main([str(out_json), "--json", str(tmp_path / "targets.json")]) == 0
    judged = capsys.readouterr().out
    assert "# targets" in judged and "ring-tcp: time of <=4 KB messages / TCP RTT, P=2" in judged
    saved = json.loads((tmp_path / "targets.json").read_text())
    assert all(t["verdict"] in ("MET", "MISSED", "N/A") or t["verdict"].startswith("INFO") for t in saved)


def test_cli_refuses_outputs_it_could_not_write_before_measuring(tmp_path):
    for argv, match in ((["--plot", str(tmp_path / "bench.txt")], "--plot .*must end in .png"),
                        (["--json", str(tmp_path / "no" / "such" / "dir" / "b.json")], "--json .*does not exist"),
                        (["--json", str(tmp_path / "b.csv")], "--json .*must end in .json"),
                        (["--settle-ms", "-1"], "--settle-ms must be >= 0")):
        args = _cli(["--quick", *argv])
        with pytest.raises(ConfigError, match=match):
            args.func(args)  # fails at once: the TCP probe and the sweep would take tens of seconds


def test_check_data_sums_exactly_and_a_wrong_sum_is_named():
    import torch

    n, P = 1001, 4
    xs = [ab.check_input(n, r) for r in range(P)]
    assert all(torch.equal(x, x.round()) and x.abs().max() <= 8 for x in xs)
    assert not torch.equal(xs[0], xs[1])  # ranks hold different data, so a dropped rank shows
    assert torch.equal(ab.expected_sum(n, P), torch.stack(xs).double().sum(0).float())
    rows = [dict(_row("ring", 4, 4 << 20, 1e-3), wrong=0, exact=True),
            dict(_row("ring-tcp", 4, 4 << 20, 1e-3), wrong=17, exact=True),
            dict(_row("qsgd", 4, 4 << 20, 1e-3), wrong=900, exact=False)]
    assert ab.wrong_results(rows) == ["ring-tcp P=4 4 MB: 17 of 1048576 elements differ from the sum"]
    text = ab.format_table(rows)
    assert "# WRONG RESULTS: ring-tcp P=4 4 MB" in text and "(900)" in text
    assert "all exact strategies correct" in ab.format_table(rows[:1] + rows[2:])
