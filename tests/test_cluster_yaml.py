"""cluster.yaml: Ray's own offline checks, and the security properties we promise in it.

`ray up` runs ``prepare_config`` (merge with the provider's defaults) and ``validate_config``
(the autoscaler's JSON schema + cross-field rules) before it talks to AWS; both run offline
here (no boto3, no credentials).
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
RAY_PORTS = {"dashboard": 8265, "gcs": 6379, "ray client": 10001}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return prepare_config(copy.deepcopy(raw))


def _ray_start_calls(commands: list[str]) -> list[list[str]]:
    """The argv of every `ray start` in a list of shell commands."""
    calls = []
    for command in commands:
        for part in re.split(r";|&&|\|\|", command):
            argv = shlex.split(part)
            while argv and "=" in argv[0] and not argv[0].startswith("-"):
                argv = argv[1:]  # leading VAR=value assignments
            if argv[:2] == ["ray", "start"]:
                calls.append(argv)
    return calls


def _env_assignments(command: str) -> set[str]:
    return {
        tok for tok in shlex.split(command.replace(";", " ; ")) if re.fullmatch(r"\w+=\S*", tok)
    }


def _option(argv: list[str], name: str) -> str | None:
    for i, tok in enumerate(argv):
        if tok == name and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return None


def test_passes_rays_validation(raw, prepared):
    validate_config(copy.deepcopy(raw))
    validate_config(prepared)  # what `ray up` validates
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert types[head]["max_workers"] == 0
    workers = {name: t for name, t in types.items() if name != head}
    assert len(workers) == 2
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1, "exactly one GPU worker type"
    assert re.search(r"-(gpu|cu\d+)$", gpu[0]["docker"]["worker_image"]), "a CUDA image"
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"]
    assert sum(t["max_workers"] for t in workers.values()) <= prepared["max_workers"]


def test_validation_is_strict(raw):
    """The check above means something: a typo or a wrong type is rejected."""
    typo = copy.deepcopy(raw)
    typo["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(typo)
    bad = copy.deepcopy(raw)
    bad["available_node_types"][raw["head_node_type"]]["resources"] = {"GPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_dashboard_listens_on_localhost_only(prepared):
    head_calls = _ray_start_calls(prepared["head_start_ray_commands"])
    assert len(head_calls) == 1 and "--head" in head_calls[0]
    assert _option(head_calls[0], "--dashboard-host") == "127.0.0.1"
    for argv in head_calls + _ray_start_calls(prepared["worker_start_ray_commands"]):
        assert _option(argv, "--dashboard-host") in (None, "127.0.0.1"), argv
    # The container shares the host's network (Ray adds --net=host): publishing a port would
    # bypass the loopback binding.
    docker = prepared.get("docker", {})
    options = " ".join(docker.get("run_options", []) + docker.get("head_run_options", []))
    assert not re.search(r"(^|\s)(-p|--publish)(\s|=)", options), options


def _covers(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return lo == -1 or lo <= port <= hi


def test_no_security_group_rule_opens_ray_ports(prepared):
    rules = prepared["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        for name, port in RAY_PORTS.items():
            assert not _covers(rule, port), f"rule opens the {name} port {port}: {rule}"
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])]
        cidrs += [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        for cidr in cidrs:
            assert ipaddress.ip_network(cidr).prefixlen > 0, f"rule open to the world: {rule}"
    for node_type in prepared["available_node_types"].values():
        # A group given by id is not ours to check: it must be reviewed by hand.
        assert "SecurityGroupIds" not in node_type["node_config"]


def test_token_auth_on_every_node(prepared):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if _ray_start_calls([c])]
        assert starts and all("RAY_AUTH_MODE=token" in _env_assignments(c) for c in starts), key
    # The same token everywhere: the laptop's, shipped by the launcher.
    assert prepared["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    run_options = prepared.get("docker", {}).get("run_options", [])
    assert "-e RAY_AUTH_MODE=token" in run_options  # ray exec / attach shells, job drivers


def test_every_node_keeps_idle_workers_as_a_local_ray_does(prepared):
    """Streamed epochs reuse their read tasks' processes on the cluster too (twa_ray.connect)."""
    from twa_ray.connect import IDLE_WORKER_MS

    want = f"RAY_idle_worker_killing_time_threshold_ms={IDLE_WORKER_MS}"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if _ray_start_calls([c])]
        assert starts and all(want in _env_assignments(c) for c in starts), key


def test_installs_this_checkout_with_the_pinned_ray(prepared):
    assert prepared["file_mounts"]["~/twa_ray"] == "."
    assert any("pip install" in c and "~/twa_ray" in c for c in prepared["setup_commands"])
    pin = re.search(r'"ray\[[^\]]*\]==([\w.]+)"', (REPO / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins ray[...]==X"
    images = [prepared["docker"]["image"]]
    images += [
        t["docker"]["worker_image"]
        for t in prepared["available_node_types"].values()
        if "worker_image" in t.get("docker", {})
    ]
    for image in images:
        assert image.startswith(f"rayproject/ray:{pin.group(1)}-"), (image, pin.group(1))


def test_shared_storage_is_one_s3_bucket_every_node_can_reach(raw, prepared):
    """One bucket, named once (the jobs' default --storage), and an instance profile on every
    worker type (the head gets Ray's ray-autoscaler-v1 profile, which has S3 access)."""
    from twa_ray.storage import STORAGE_ENV, job_argv

    text = (Path(__file__).resolve().parents[1] / "cluster.yaml").read_text()
    options = [o for o in prepared["docker"]["run_options"] if STORAGE_ENV in o]
    assert len(options) == 1, options
    uri = options[0].split("=", 1)[1].split()[0]
    assert uri.startswith("s3://")
    bucket = uri.removeprefix("s3://").split("/")[0]
    assert len(re.findall(rf"\b{re.escape(bucket)}\b", text.split("available_node_types:")[1])) == 0
    for name, t in prepared["available_node_types"].items():
        if name != prepared["head_node_type"]:
            assert "instance-profile/" in t["node_config"]["IamInstanceProfile"]["Arn"], name
    argv = job_argv("run", ["--smoke-test", "--out", "runs/exp1"])
    assert argv[:4] == ["run", "--smoke-test", "--out", "runs/exp1"] and len(argv) == 4  # unset
    import os

    os.environ[STORAGE_ENV] = uri
    try:
        assert job_argv("run", ["--out", "runs/exp1"])[-2:] == ["--storage", f"{uri}/run/exp1"]
        assert job_argv("run", ["--storage", "s3://b/x"]) == ["run", "--storage", "s3://b/x"]
    finally:
        del os.environ[STORAGE_ENV]
