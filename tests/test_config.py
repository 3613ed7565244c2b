"""Typed configs: what YAML and flags may hold, and the config loaders under random YAML trees."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twa_ray.config import (
    MNIST1D_SAMPLES,
    DataConfig,
    RunConfig,
    SamplingConfig,
    SweepConfig,
    config_from_dict,
    sweep_config_from_dict,
)
from twa_ray.core.twa import TWAConfig


@pytest.mark.parametrize(
    "d,check",
    [
        ({"twa": {"lr": "1e-3"}}, lambda c: c.twa.lr == 0.001),
        ({"sampling": {"epochs": "40"}}, lambda c: c.sampling.epochs == 40),
        (
            {"sampling": {"epochs": 40.0}},
            lambda c: c.sampling.epochs == 40 and isinstance(c.sampling.epochs, int),
        ),
        ({"sampling": {"cpus_per_worker": "0.5"}}, lambda c: c.sampling.cpus_per_worker == 0.5),
        (
            {"twa": {"bits": "8", "basis_placement": "shard"}},
            lambda c: c.twa.bits == 8 and c.twa.basis_placement == "shard",
        ),
        (
            {"sampling": {"use_gpu": False}, "shared_fs": True},
            lambda c: not c.sampling.use_gpu and c.shared_fs,
        ),
        (  # null: the default, MNIST-1D's main-job size; other datasets keep every row
            {"twa": None, "data": {"num_samples": None}},
            lambda c: c.twa == TWAConfig() and c.data.num_samples == MNIST1D_SAMPLES == 4000,
        ),
        (
            {"data": {"dataset": "parquet", "num_samples": None}},
            lambda c: c.data.num_samples is None,
        ),
        (
            {"storage": "s3://b/p?endpoint_override=127.0.0.1:9000"},
            lambda c: c.storage.startswith("s3://"),
        ),
    ],
)
def test_unambiguous_values_are_coerced(d, check):
    assert check(config_from_dict(d))


@pytest.mark.parametrize(
    "d,needle",
    [
        ({"sampling": {"use_gpu": "no"}}, "'sampling.use_gpu': expected true or false, got 'no'"),
        ({"sampling": {"use_gpu": 0}}, "'sampling.use_gpu': expected true or false"),
        ({"greedy_soup": "false"}, "'greedy_soup': expected true or false"),
        ({"twa": {"bits": True}}, "'twa.bits': expected an integer, got True"),
        ({"twa": {"lr": False}}, "'twa.lr': expected a number"),
        ({"sampling": {"epochs": 4.5}}, "'sampling.epochs': expected an integer"),
        ({"data": []}, "'data': expected a mapping"),
        ({"twa": {"basis_placement": "everywhere"}}, "'twa.basis_placement': expected one of"),
        ({"sampling": {"cpus_per_worker": float("nan")}}, "cpus_per_worker=nan"),
        ({"sampling": {"cpus_per_worker": "inf"}}, "cpus_per_worker=inf"),
        ({"sampling": {"weight_decay": float("inf")}}, "weight_decay=inf"),
        ({"out": ""}, "out is empty"),
    ],
)
def test_type_errors_name_the_key_and_the_expected_type(d, needle):
    with pytest.raises(ValueError) as e:
        config_from_dict(d)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_flags_are_named_in_errors():
    with pytest.raises(
        ValueError,
        match=r"'sampling.epochs' \(--epochs\): expected an integer, got 'x'; fix --epochs",
    ):
        config_from_dict({"sampling": {"epochs": "x"}}, flags={"sampling.epochs": "--epochs"})


def test_the_dataclass_api_stays():
    cfg = config_from_dict({"twa": {"lr": "0.5"}})
    assert (
        isinstance(cfg, RunConfig)
        and isinstance(cfg.twa, TWAConfig)
        and isinstance(cfg.data, DataConfig)
    )
    assert dataclasses.replace(cfg, out="x").store_uri == "x/candidates"
    assert config_from_dict(cfg.to_dict()) == cfg  # round trip
    assert dataclasses.asdict(cfg)["twa"]["lr"] == 0.5
    assert TWAConfig(bits=2).basis_placement == "auto"
    with pytest.raises(ValueError, match="cpus_per_worker=nan"):
        SamplingConfig(cpus_per_worker=math.nan)  # the Python API refuses it too
    with pytest.raises(ValueError, match="basis_placement"):
        TWAConfig(basis_placement="both")  # type: ignore[arg-type]
    sweep = sweep_config_from_dict(
        {"sweep": {"space": {"twa.lr": {"grid": [0.1, 0.2]}}, "num_samples": "3"}}
    )
    assert (
        isinstance(sweep, SweepConfig)
        and sweep.num_samples == 3
        and isinstance(sweep.base, RunConfig)
    )


# --------------------------------------------------------------------------- fuzzing

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1e-3", "40", "no", "yes", "nan", "-inf", "affine", "t", "size:16", ""]),
)
_keys = st.one_of(
    st.sampled_from(
        [
            "data",
            "sampling",
            "twa",
            "mode",
            "out",
            "store",
            "storage",
            "shared_fs",
            "greedy_soup",
            "compare_full",
            "sweep",
            "space",
            "num_samples",
            "lr",
            "epochs",
            "bits",
            "use_gpu",
            "cpus_per_worker",
            "dataset",
            "model",
            "val_frac",
            "twa.lr",
            "grid",
            "uniform",
            "scheduler",
        ]
    ),
    st.text(max_size=8),
)
_trees = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_keys, children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.dictionaries(_keys, _trees, max_size=6))
def test_random_yaml_trees_load_or_give_one_clean_line(tree):
    """Any YAML mapping: a valid RunConfig / SweepConfig, or a ValueError of one line."""
    text = yaml.safe_dump(tree)
    d = yaml.safe_load(text)
    for load in (config_from_dict, sweep_config_from_dict):
        try:
            cfg = load(d)
        except ValueError as e:
            assert str(e) and "\n" not in str(e), str(e)
        else:
            assert isinstance(cfg, (RunConfig, SweepConfig))


def test_the_coefficient_phase_config_reports_every_bad_field_in_one_line():
    """The declared bounds (one validation style with the run config), all problems at once."""
    from twa_ray.ray.coeff_group import CoeffGroupConfig

    with pytest.raises(ValueError) as e:
        CoeffGroupConfig(
            modes=("x",), num_workers=0, checkpoint_interval_s=-1.0, bn_batches=0, max_failures=-1
        )
    msg = str(e.value)
    assert msg.startswith("invalid coefficient-phase config: ") and "\n" not in msg
    for part in (
        "num_workers=0: must be >= 1",
        "checkpoint_interval_s=-1.0: must be >= 0",
        "bn_batches=0: must be >= 1",
        "max_failures=-1: must be >= 0",
        "modes=('x',): use a non-empty subset of ('t', 'v')",
    ):
        assert part in msg, msg
    with pytest.raises(ValueError, match="batch_size=2: must be >= num_workers=4"):
        CoeffGroupConfig(num_workers=4, batch_size=2)
    assert CoeffGroupConfig(bn_batches=None, checkpoint_interval_s=0.0).bn_batches is None
