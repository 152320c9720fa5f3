"""cluster.yaml is validated offline with Ray's own schema and validator (no SSH, no cluster)."""

import copy
import json
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _validate(cfg: dict) -> None:
    """Ray's shipped JSON schema first (clean messages), then Ray's own fill-out + validator."""
    from ray.autoscaler._private.util import validate_config
    from ray.autoscaler.sdk import fillout_defaults

    schema = json.loads(files("ray").joinpath("autoscaler/ray-schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(cfg)
    validate_config(fillout_defaults(copy.deepcopy(cfg)))


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid(cluster):
    _validate(cluster)
    assert cluster["provider"]["type"] == "local" and len(cluster["provider"]["worker_ips"]) == 2
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--dashboard-port=8265" in head
    assert "--metrics-export-port=8090" in head and "RAY_AUTH_MODE=token" in head
    assert any("scripts/setup.sh" in c for c in cluster["setup_commands"])
    assert {".venv", "data", "runs"} <= set(cluster["rsync_exclude"])


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(max_workers="two"),
    lambda c: c.update(min_workers=1),                      # legacy top-level key, rejected
    lambda c: c["provider"].update(worker_ips="10.0.0.11"),
])
def test_validator_rejects_broken_configs(cluster, mutate):
    broken = copy.deepcopy(cluster)
    mutate(broken)
    with pytest.raises(Exception):
        _validate(broken)
