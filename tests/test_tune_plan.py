"""Sweep planning without Ray: the space, the groups of trials that share a sampling run, the
candidates each trial takes, the CLI's config handling and the table / plot writers."""

import itertools
import math

import pandas as pd
import pytest
import yaml

from twa_ray.cli import build_parser, main, smoke_sweep, sweep_config_from_args
from twa_ray.config import SweepConfig, config_from_dict, sweep_config_from_dict
from twa_ray.report import plot_sweep, write_table
from twa_ray.store.arrow import CandidateInfo
from twa_ray.tune_plan import SweepPlan, check_space, draw_trials, plan_sweep, select_candidates


def _sweep(space, *, mode="v", sampling=None, **options):
    d = {
        "data": {"num_samples": 1500},
        "sampling": {"epochs": 12, "sample_frac": 0.5, **(sampling or {})},
        "twa": {"epochs": 2},
        "mode": mode,
        "sweep": {"space": space, **options},
    }
    return sweep_config_from_dict(d)


# ----------------------------------------------------------------------------- the space


def test_space_nested_dotted_and_bare_names_agree():
    nested = _sweep(
        {"twa": {"lr": {"grid": [0.1, 0.2]}}, "sampling": {"sample_interval": {"grid": [1, 2]}}}
    )
    dotted = _sweep({"twa.lr": {"grid": [0.1, 0.2]}, "sample_interval": {"grid": [1, 2]}})
    assert dict(nested.space) == dict(dotted.space)
    assert set(dotted.space) == {"twa.lr", "sampling.sample_interval"}


def test_space_errors_are_reported_together():
    with pytest.raises(ValueError) as e:
        _sweep(
            {
                "lr": {"grid": [0.1]},
                "nope": {"grid": [1]},
                "bits": 4,
                "twa.epochs": {"loguniform": [0, 1]},
            },
            num_samples=0,
        )
    msg = str(e.value)
    for part in (
        "'lr' is ambiguous",
        "unknown knob 'nope'",
        "not a search space",
        "lo > 0",
        "num_samples=0",
    ):
        assert part in msg
    with pytest.raises(ValueError, match="unknown option"):
        sweep_config_from_dict({"sweep": {"space": {}, "metric_x": 1}})
    with pytest.raises(ValueError, match="'sweep:' section"):
        sweep_config_from_dict({"data": {}})


def test_trials_grid_times_num_samples_with_seeded_draws():
    cfg = _sweep(
        {
            "twa.lr": {"loguniform": [1e-3, 1.0]},
            "twa.bits": {"grid": [2, 4]},
            "twa.optimizer": {"choice": ["sgd", "adamw"]},
        },
        num_samples=3,
    )
    plan = plan_sweep(cfg, sampling_dir="/tmp/unused")
    params = [t.params for t in plan.trials]
    assert len(params) == 6 and [p["twa.bits"] for p in params] == [2, 4] * 3
    assert all(1e-3 <= p["twa.lr"] <= 1.0 and isinstance(p["twa.lr"], float) for p in params)
    assert params == [t.params for t in plan_sweep(cfg, sampling_dir="/tmp/unused").trials]
    assert len({p["twa.lr"] for p in params}) == 6  # every trial draws anew
    assert (
        plan_sweep(_sweep(dict(cfg.space), num_samples=3, seed=1), sampling_dir="/x")
        .trials[0]
        .params
        != params[0]
    )
    # mode 'both' in the base: each trial trains one model, so the sweep tries both
    both = plan_sweep(_sweep({"twa.bits": {"grid": [2, 4]}}, mode="both"), sampling_dir="/x")
    assert sorted(t.params["mode"] for t in both.trials) == ["t", "t", "v", "v"]


def test_grids_are_crossed_first_name_fastest_then_repeated():
    trials = draw_trials(
        {"twa.lr": {"grid": [0.1, 0.2]}, "twa.bits": {"grid": [2, 4, 8]}}, num_samples=2, seed=0
    )
    assert [(t["twa.bits"], t["twa.lr"]) for t in trials] == [
        (b, lr) for lr in (0.1, 0.2) for b in (2, 4, 8)
    ] * 2
    assert draw_trials({}, num_samples=3, seed=0) == [{}, {}, {}]


def test_invalid_trials_fail_before_anything_runs():
    with pytest.raises(ValueError, match="gives 1 candidate"):  # interval 6 over 6 sampled epochs
        plan_sweep(
            _sweep({"twa.bits": {"grid": [2, 4]}, "sample_interval": {"grid": [6]}}),
            sampling_dir="/x",
        )
    with pytest.raises(ValueError, match="a trial trains one model"):
        plan_sweep(_sweep({"mode": {"choice": ["t", "both"]}}, num_samples=8), sampling_dir="/x")


@pytest.mark.parametrize(
    "space,needle",
    [
        pytest.param(
            {"twa.bits": {"choice": [4, 3]}},
            "twa.bits: {choice: [4, 3]}: the value 3 is refused (invalid TWA config: bits=3: use one of",
            id="choice-value",
        ),
        pytest.param(
            {"twa.bits": {"uniform": [1, 8]}},
            "twa.bits: {uniform: [1, 8]}: uniform draws fractional numbers but twa.bits takes integer values; use {choice: [..]}",
            id="uniform-on-integer",
        ),
        pytest.param(
            {"sampling.sample_interval": {"loguniform": [1, 4]}},
            "loguniform draws fractional numbers",
            id="loguniform-on-integer",
        ),
        pytest.param(
            {"data.model": {"uniform": [0, 1]}},
            "data.model takes string values",
            id="uniform-on-string",
        ),
        pytest.param(
            {"mode": {"uniform": [0, 1]}},
            "mode takes one of ['t', 'v', 'both']",
            id="uniform-on-literal",
        ),
        pytest.param(
            {"twa.lr": {"uniform": [-0.1, 0.1]}},
            "twa.lr: {uniform: [-0.1, 0.1]}: the bound -0.1 is refused (invalid TWA config: lr=-0.1",
            id="negative-lr-range",
        ),
        pytest.param(
            {"sample_frac": {"uniform": [0.5, 1.5]}},
            "the bound 1.5 is refused (invalid sampling config: sample_frac=1.5",
            id="range-upper-bound",
        ),
        pytest.param(
            {"twa.lr": {"grid": [0.1, "fast"]}},
            "the value 'fast' is refused (config key 'twa.lr': expected a number",
            id="grid-type",
        ),
        pytest.param(
            {"mode": {"grid": ["t", "x"]}},
            "mode: {grid: [t, x]}: the value 'x' is refused",
            id="mode-value",
        ),
    ],
)
def test_every_value_of_the_space_is_checked_before_any_draw(space, needle):
    """Each value of a choice is checked, not only those a draw happens to pick (8 draws of
    ``choice: [4, 3]`` may all be 4), and a range by its bounds and its knob's type."""
    with pytest.raises(ValueError) as e:
        plan_sweep(_sweep(space, num_samples=1, seed=0), sampling_dir="/x")
    msg = str(e.value)
    assert (
        msg.startswith("invalid sweep space: ")
        and needle in msg
        and msg.endswith("fix the sweep: section")
    ), msg


def test_a_value_valid_with_another_knobs_value_is_not_refused():
    base = _sweep({}).base
    # blocks 'tensor' is refused with the span subspace alone, fine with the swept 'affine'
    span = config_from_dict({"twa": {"subspace": "span", "blocks": "model"}})
    check_space(
        span, {"twa.subspace": {"grid": ["affine"]}, "twa.blocks": {"grid": ["model", "tensor"]}}
    )
    with pytest.raises(ValueError, match="twa.blocks"):
        check_space(span, {"twa.blocks": {"grid": ["model", "tensor"]}})
    check_space(
        base,
        {
            "twa.lr": {"loguniform": [1e-4, 1]},
            "twa.epochs": {"uniform": [1, 3]},
            "mode": {"choice": ["t", "v"]},
        },
    )


# ----------------------------------------------------------------------------- groups


def test_trials_that_share_sampling_knobs_share_one_run(tmp_path):
    cfg = _sweep(
        {
            "sampling.lr": {"grid": [0.05, 0.1]},
            "sample_interval": {"grid": [2, 3]},
            "twa.lr": {"grid": [0.01, 0.1]},
        }
    )
    plan = plan_sweep(cfg, sampling_dir=str(tmp_path))
    assert len(plan.trials) == 8 and len(plan.groups) == 2
    for g in plan.groups.values():
        assert len(g.trials) == 4
        assert g.sampling.sample_interval == 1  # gcd(2, 3): both intervals' snapshots
        assert g.store == str(tmp_path / g.key / "candidates") and g.run_id == f"sweep-{g.key}"
        lrs = {plan.trials[i].config.sampling.lr for i in g.trials}
        assert len(lrs) == 1 and g.sampling.lr in lrs
        assert all(plan.trials[i].group == g.key for i in g.trials)
    # the same sweep planned again names the same runs (a restarted sweep finds them)
    assert plan_sweep(cfg, sampling_dir=str(tmp_path)).groups.keys() == plan.groups.keys()


def test_plan_round_trips_through_json_and_pickle(tmp_path):
    """plan.json is SweepPlan.to_dict(); --resume reads it back with from_dict; Ray Tune pickles
    the plan to every trial."""
    import json
    import pickle

    cfg = _sweep(
        {
            "sampling.lr": {"grid": [0.05, 0.1]},
            "twa.lr": {"loguniform": [1e-3, 1.0]},
            "twa.bits": {"choice": [1, 2]},
        },
        num_samples=2,
    )
    plan = plan_sweep(cfg, sampling_dir=str(tmp_path))
    plan = plan.with_candidates({t.index: [f"c{t.index}", "c9"] for t in plan.trials})
    plan = SweepPlan.from_dict(json.loads(json.dumps(plan.to_dict())))  # what resume reads
    assert SweepPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert plan.trials[3].candidates == ("c3", "c9") and plan.space == json.loads(
        json.dumps(dict(cfg.space))
    )
    with pytest.raises(ValueError, match="--overwrite"):
        SweepPlan.from_dict({"trials": [], "groups": {}})


def test_epoch_fractions_share_the_longest_run_step_fractions_do_not():
    space = {"sample_frac": {"grid": [0.25, 0.5]}, "sample_interval": {"grid": [1]}}
    plan = plan_sweep(_sweep(space, sampling={"epochs": 16}), sampling_dir="/x")
    (g,) = plan.groups.values()
    assert g.sampling.sample_frac == 0.5 and g.sample_epochs == 8
    assert sorted(t.sample_epochs for t in plan.trials) == [4, 8]
    # interval 2 with a 6-epoch member: the run needs epoch 3 too (its final snapshot) -> gcd 1
    plan = plan_sweep(
        _sweep(
            {"sample_frac": {"grid": [0.25, 0.5]}, "sample_interval": {"grid": [2]}},
            sampling={"epochs": 24},
        ),
        sampling_dir="/x",
    )
    (g,) = plan.groups.values()
    assert (g.sample_epochs, g.sampling.sample_interval) == (12, 2)  # 6 is even: gcd 2
    step = plan_sweep(
        _sweep(space, sampling={"epochs": 16, "interval_unit": "step"}), sampling_dir="/x"
    )
    assert len(step.groups) == 2


def test_no_reuse_gives_every_trial_its_own_run():
    cfg = _sweep(
        {"twa.lr": {"grid": [0.01, 0.1]}, "sample_interval": {"grid": [1, 2]}}, reuse_sampling=False
    )
    plan = plan_sweep(cfg, sampling_dir="/x")
    assert len(plan.groups) == 4
    assert sorted(g.sampling.sample_interval for g in plan.groups.values()) == [1, 1, 2, 2]


# ----------------------------------------------------------------------------- candidates


def _direct_run(unit, interval, sample_epochs, steps_per_epoch):
    """(step, epoch) of the snapshots the sampling loop writes (twa_ray.ray.sampling)."""
    out, step = [], 0
    for epoch in range(1, sample_epochs + 1):
        for _ in range(steps_per_epoch):
            step += 1
            if unit == "step" and step % interval == 0:
                out.append((step, step / steps_per_epoch))
        last = epoch == sample_epochs
        if unit == "epoch" and (epoch % interval == 0 or last):
            out.append((step, float(epoch)))
        elif unit == "step" and last and step % interval:
            out.append((step, float(epoch)))
    return out


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_selection_equals_a_direct_run_with_the_coarser_interval(unit):
    spe = 5
    for intervals, epochs in itertools.product(
        [(1, 2), (2, 4), (2, 3), (3, 6, 9)], [(7,), (4, 7), (6, 9)]
    ):
        if unit == "step" and len(epochs) > 1:
            continue  # step intervals never merge fractions
        e_max = max(epochs)
        parts = list(intervals) + ([e for e in epochs if e < e_max] if unit == "epoch" else [])
        base = math.gcd(*parts)
        infos = [
            CandidateInfo(f"s{s}", s, e, "", 0, "r") for s, e in _direct_run(unit, base, e_max, spe)
        ]
        for s, e in itertools.product(intervals, epochs):
            want = [f"s{st}" for st, _ in _direct_run(unit, s, e, spe)]
            assert select_candidates(infos, interval=s, unit=unit, sample_epochs=e) == want, (s, e)


# ----------------------------------------------------------------------------- CLI and outputs


def test_cli_sweep_flags_and_smoke(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "mode": "t",
                "sweep": {"space": {"sample_interval": {"choice": [1, 2, 4]}}, "num_samples": 5},
            }
        )
    )
    args = build_parser().parse_args(
        [
            "sweep",
            "--config",
            str(path),
            "--out",
            "o",
            "--max-concurrent",
            "3",
            "--scheduler",
            "none",
            "--no-reuse",
        ]
    )
    cfg = sweep_config_from_args(args)
    assert (cfg.max_concurrent, cfg.scheduler, cfg.reuse_sampling, cfg.num_samples) == (
        3,
        "none",
        False,
        5,
    )
    smoke = smoke_sweep(cfg)
    assert smoke.num_samples == 2 and smoke.base.data.num_samples == 1500
    assert (
        smoke.base.sampling.sample_epochs == 16 and smoke.base.twa.epochs == 2
    )  # 4 candidates at interval 4


def test_cli_sweep_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep: {space: {lr: {grid: [0.1]}}}\n")
    assert main(["sweep", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "ambiguous" in capsys.readouterr().err
    assert (
        main(["sweep", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")])
        == 2
    )


def test_default_sweep_config_file_loads():
    from pathlib import Path

    from twa_ray.config import load_sweep_config

    path = Path(__file__).resolve().parents[1] / "configs" / "sweep_mnist1d.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# twa-ray sweep --config configs/sweep_mnist1d.yaml")
    cfg = load_sweep_config(str(path))
    assert isinstance(cfg, SweepConfig) and len(cfg.space) >= 6
    plan = plan_sweep(cfg, sampling_dir="/x")
    assert len(plan.groups) < len(plan.trials)


def test_table_and_plot(tmp_path):
    rows = [
        {
            "index": 0,
            "twa.lr": 0.01,
            "mode": "t",
            "status": "completed",
            "val_acc": 0.8,
            "test_acc": 0.7,
        },
        {
            "index": 1,
            "twa.lr": 0.3,
            "mode": "v",
            "status": "stopped",
            "val_acc": 0.5,
            "test_acc": 0.4,
        },
        {
            "index": 2,
            "twa.lr": 0.1,
            "mode": "v",
            "status": "error",
            "val_acc": math.nan,
            "test_acc": math.nan,
        },
    ]
    write_table(tmp_path / "trials", rows)
    assert pd.read_parquet(tmp_path / "trials.parquet")["val_acc"].iloc[0] == 0.8
    assert list(pd.read_csv(tmp_path / "trials.csv")["mode"]) == ["t", "v", "v"]
    plot_sweep(tmp_path / "sweep.png", rows, ["twa.lr", "mode"], best_index=0)
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    config_from_dict({})  # the default run config stays valid for best.yaml's base
