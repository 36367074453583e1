"""The example Ray cluster YAML is a valid autoscaler config (Ray's own schema and checks) sized for the
recipe it serves, and a typo in it would be caught."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from rtrain.config import load_recipe

REPO = Path(__file__).resolve().parents[2]


def test_r152_cluster_yaml_is_valid_and_fits_the_recipe():
    config = yaml.safe_load((REPO / "cluster" / "ray" / "r152_256gpu.cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    recipe = load_recipe(REPO / "recipes" / "r152_256gpu.yaml")
    gpu_nodes = config["available_node_types"]["gpu_node"]["min_workers"]
    assert gpu_nodes * 8 == recipe.dist.num_workers  # p4d.24xlarge: 8 GPUs each
    # Token auth on every node, the token copied from the user's machine, never written here.
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all(cmd.startswith("RAY_AUTH_MODE=token ray start") for cmd in starts if "ray start" in cmd)
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "chmod 600 ~/.ray/auth_token" in config["setup_commands"]
    assert "RAY_AUTH_TOKEN=" not in (REPO / "cluster" / "ray" / "r152_256gpu.cluster.yaml").read_text()
    typo = copy.deepcopy(config)
    typo["available_node_types"]["gpu_node"]["min_wokers"] = 3
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(typo))
