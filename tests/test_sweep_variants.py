"""``scalesgd sweep``'s variants (named series of [base] with options changed), ``tune_batch`` (one lr tuned at
one batch for every point) and ``stop_at_target = false`` (every run trains the whole budget)."""

from __future__ import annotations

import math

import pytest

from scalesgd.errors import ConfigError
from scalesgd.sweep import Point, expand_grid, load_spec, plan, point_config, runs_in_sweep, spec_from_mappings
from scalesgd.sweep.plots import Curve, final_accuracy
from scalesgd.sweep.report import _series_label, _side_by_side_lines, _table_lines, rows_by_series
from scalesgd.sweep.runner import Outcome, SweepResult

BASE = {"dataset": "digits", "model": "mlp", "epochs": 2, "lr_schedule": "constant", "diversity": "off",
        "base_batch_size": 16}
VARIANTS = {"lin-warm": {"lr_rule": "linear", "warmup_epochs": 1}, "sqrt": {"lr_rule": "sqrt"}}


def _spec(**sweep):
    return spec_from_mappings({"batch_sizes": [64, 16], "seeds": [0, 1, 2], "lrs": [0.1], "target": 0.9,
                               "bound": "init", **sweep}, dict(BASE), source="test")


def test_variants_are_series_of_base_with_their_options_changed(tmp_path):
    spec = _spec(variants=VARIANTS)
    assert spec.variant_names == ("lin-warm", "sqrt")
    groups = plan(spec)
    assert [(g.variant, g.global_batch_size) for g in groups] == [("lin-warm", 16), ("lin-warm", 64),
                                                                   ("sqrt", 16), ("sqrt", 64)]
    assert {g.series for g in groups} == {(1, 1, "lin-warm"), (1, 1, "sqrt")}
    points = expand_grid(spec)
    assert len(points) == runs_in_sweep(spec) == 2 * 2 * 3 and len({p.name for p in points}) == len(points)
    assert points[0].name == "lin-warm-B16-P1-lr0.1-s0-r1"
    cfg = point_config(spec, Point(1, 1, 64, 0.1, 2, "lin-warm"), n_train=1438, run_root=tmp_path)
    assert (cfg.lr_rule, cfg.warmup_epochs, cfg.global_batch_size, cfg.seed) == ("linear", 1.0, 64, 2)
    assert cfg.extra["variant"] == "lin-warm" and cfg.run_dir == str(tmp_path / "lin-warm-B64-P1-lr0.1-s2-r1")
    sq = point_config(spec, Point(1, 1, 64, 0.1, 2, "sqrt"), n_train=1438, run_root=tmp_path)
    assert (sq.lr_rule, sq.warmup_epochs) == ("sqrt", 0.0)  # the other variant's warm-up does not leak
    assert spec.base.lr_rule is None and spec.base.effective_lr_rule == "constant"  # [base] itself unchanged
    # Without variants the names and the one series are what they were.
    plain = _spec()
    assert plain.variant_names == ("",) and expand_grid(plain)[0].name == "B16-P1-lr0.1-s0-r1"
    assert {g.series for g in plan(plain)} == {(1, 1, "")}


def test_tune_batch_tunes_once_on_base_and_every_point_runs_at_the_winner():
    spec = _spec(variants=VARIANTS, lrs=[0.05, 0.1, 0.2], tune_batch=16)
    first, *rest = plan(spec)
    assert (first.variant, first.global_batch_size, first.seeds) == ("", 16, ())
    assert [(p.lr, p.seed, p.variant) for p in first.tuning] == [(0.05, 0, ""), (0.1, 0, ""), (0.2, 0, "")]
    assert all(g.tuning == () and g.seeds == (0, 1, 2) for g in rest) and len(rest) == 4
    assert runs_in_sweep(spec) == 3 + 4 * 3  # the tuning runs are [base]'s, no variant's seed is covered
    # Without variants the base series at B0 reuses its tuning run on the first seed.
    plain = _spec(lrs=[0.05, 0.1, 0.2], tune_batch=16)
    assert runs_in_sweep(plain) == 3 + 2 * 3 - 1
    names = [p.name for p in expand_grid(plain)]
    assert len(set(names)) == len(names) and names.count("B16-P1-lr0.05-s0-r1") == 1
    # all-seeds tuning at tune_batch: every seed of every lr, once
    assert runs_in_sweep(_spec(lrs=[0.05, 0.1], tune_batch=16, tune="all-seeds")) == 2 * 3 + 3


def test_stop_at_target_false_trains_the_whole_budget(tmp_path):
    point = Point(1, 1, 16, 0.1, 0)
    assert point_config(_spec(), point, n_train=1438, run_root=tmp_path).target_accuracy == 0.9
    cfg = point_config(_spec(stop_at_target=False), point, n_train=1438, run_root=tmp_path)
    assert cfg.target_accuracy is None and cfg.extra["target"] == 0.9  # the sweep still reads passes to 0.9


def test_report_labels_series_by_variant_counts_divergence_and_draws_final_accuracy(tmp_path):
    spec = _spec(variants=VARIANTS, seeds=[0, 1], lrs=[0.05, 0.1], tune_batch=16, stop_at_target=False)
    result = SweepResult(spec, plan(spec))
    result.chosen_lr[plan(spec)[0].key] = 0.1
    result.tuning_notes[plan(spec)[0].key] = "0.05: 3.00 passes; 0.1: 2.00 passes"
    for g in result.groups[1:]:
        result.chosen_lr[g.key] = 0.1
        for s in g.seeds:
            p = g.at(0.1, s)
            diverged = g.variant == "lin-warm" and g.global_batch_size == 64 and s == 1
            result.outcomes[p] = (Outcome(p, "diverged") if diverged else
                                  Outcome(p, "done", reached=True, passes_to_target=2.0, time_to_target_s=1.0,
                                          time_per_pass_s=0.5, epochs=2.0, train_time_s=1.0,
                                          final_test_accuracy=0.8 + 0.01 * s))
    series = rows_by_series(result)
    assert list(series) == [(1, 1, "lin-warm"), (1, 1, "sqrt")]  # the tuning group is no series
    assert _series_label(spec, (1, 1, "sqrt")) == "sqrt"
    rows = series[(1, 1, "lin-warm")]
    assert rows[1].diverged == 1 and rows[1].stat("final_test_accuracy") == (0.8, 0.0)  # over the finished seed
    assert rows[0].stat("final_test_accuracy") == pytest.approx((0.805, math.sqrt(2) * 0.005))
    text = "\n".join(_table_lines(result, (1, 1, "lin-warm"), rows))
    assert "| 64 | 0.1 (nan) | 1/2 (1 diverged) |" in text
    assert "at B=16 on [base], for every B: **0.1** won — 0.05: 3.00 passes" in text
    side = "\n".join(_side_by_side_lines(spec, series))
    assert "| B | lin-warm | sqrt |" in side and "after the budget of 2 passes" in side
    assert "| 64 | 0.8000 ± 0.0000 (1 diverged) | 0.8050 ± 0.0071 |" in side
    assert "| 64 | ≥ 2.00 (1/2 reached, 1 diverged) | 2.00 ± 0.00 |" in side
    assert _side_by_side_lines(spec, {(1, 1, "sqrt"): series[(1, 1, "sqrt")]}) == []  # one series: nothing
    curve = Curve("lin-warm", (16, 64), (0.805, 0.8), (0.007, 0.0), diverged=(0, 1), seeds=2)
    path = final_accuracy([curve], tmp_path / "acc.png", budget=2, at_target=False)
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("sweep, match", [
    ({"variants": {"a": {"n_train": 100}}}, "variant 'a' sets 'n_train': variants share one data set"),
    ({"variants": {"a": {"lr": 0.3}}}, "variant 'a' sets 'lr', which the sweep sets"),
    ({"variants": {"a": {"target_accuracy": 0.5}}}, "variant 'a' sets 'target_accuracy'"),
    ({"variants": {"a b": {"lr_rule": "sqrt"}}}, "variant 'a b': a variant's name becomes part"),
    ({"variants": {"a": {"lr_rule": "fast"}}}, "variant 'a'.*lr-rule"),
    ({"variants": {"a": {"lr_rule": "adascale"}}}, "variant 'a': --lr-rule adascale needs the gradient"),
    ({"variants": {"a": {"learning_rate": 0.1}}}, "variant 'a': unknown key 'learning_rate'"),
    ({"variants": {"a": "sqrt"}}, "variant 'a' must be a table of run options"),
    ({"variants": ["sqrt"]}, r"variants must be a table of named option tables, e.g. \[sweep.variants\] with sqrt"),
    ({"variants": {"a": {"lr_rule": "sqrt"}}, "bound": "online"}, "variant 'a' sets diversity = \"off\""),
    ({"lrs": [0.1, 0.2], "tune_batch": 32}, "tune_batch = 32 is not one of batch_sizes"),
    ({"tune_batch": 16}, "lrs has one value"),
    ({"stop_at_target": "no"}, "stop_at_target must be true or false"),
])
def test_bad_variants_and_options_say_what_to_fix(sweep, match):
    with pytest.raises(ConfigError, match=match):
        _spec(**sweep)


def test_variants_read_from_toml_in_order(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text('[sweep]\nbatch_sizes = [16]\ntarget = 0.9\nbound = "init"\n[sweep.variants]\n'
                    'z = { lr_rule = "sqrt" }\na = { lr_rule = "linear", warmup-epochs = 0.5 }\n'
                    '[base]\ndataset = "digits"\ndiversity = "off"\n')
    spec = load_spec(path)
    assert spec.variant_names == ("z", "a")  # the file's order, not sorted
    assert spec.config_for("a").warmup_epochs == 0.5 and spec.variants[1].describe() == (
        "`a` (lr_rule = 'linear', warmup_epochs = 0.5)")
    with pytest.raises(KeyError):
        spec.config_for("b")
