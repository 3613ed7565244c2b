"""The fault-injection hook (no Ray): a planned fault fires once, on its rank and step only."""

from __future__ import annotations

import json

import pytest

from twa_ray.ray.faults import FAULTS_ENV, inject, record_start


def test_a_planned_raise_fires_once_on_the_last_rank(tmp_path, monkeypatch):
    plan = tmp_path / "faults.json"
    marker = tmp_path / "raised"
    plan.write_text(
        json.dumps([{"phase": "coefficients", "kind": "raise", "step": 3, "marker": str(marker)}])
    )
    monkeypatch.setenv(FAULTS_ENV, str(plan))
    inject("coefficients", 3, 0, 2)  # rank 0 is not the victim
    inject("coefficients", 2, 1, 2)  # another step
    inject("sampling", 3, 1, 2)  # another phase
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="injected worker failure in coefficients at step 3"):
        inject("coefficients", 3, 1, 2)
    assert marker.read_text().startswith("raise coefficients 3 (rank 1, pid ")
    inject("coefficients", 3, 1, 2)  # the restarted attempt passes


def test_no_plan_no_fault_and_a_bad_plan_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    inject("sampling", 1, 0, 1)
    plan = tmp_path / "faults.json"
    plan.write_text(
        json.dumps([{"phase": "sample", "kind": "raise", "step": 1, "marker": str(tmp_path / "m")}])
    )
    monkeypatch.setenv(FAULTS_ENV, str(plan))
    with pytest.raises(ValueError, match="phase must be one of"):
        inject("sampling", 1, 0, 1)


def test_worker_group_starts_are_counted_next_to_the_plan(tmp_path, monkeypatch):
    """Each start appends the group's name to ``<plan>.starts`` (the tests count retries)."""
    plan = tmp_path / "faults.json"
    monkeypatch.setenv(FAULTS_ENV, str(plan))
    record_start("sampling_a")
    record_start("sampling_a")
    record_start("coefficients_a")
    assert (tmp_path / "faults.json.starts").read_text().splitlines() == [
        "sampling_a",
        "sampling_a",
        "coefficients_a",
    ]
    monkeypatch.delenv(FAULTS_ENV)
    record_start("sampling_b")  # no plan: nothing written
    assert len((tmp_path / "faults.json.starts").read_text().splitlines()) == 3
