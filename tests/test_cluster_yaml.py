"""cluster.yaml against the cluster-launcher schema that the installed Ray ships."""

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml
from tests.helpers import ROOT



def test_cluster_yaml_is_valid_against_rays_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)


def test_cluster_yaml_has_gpu_workers_and_installs_the_gpu_extra():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) > 0 for t in workers)
    assert any('".[gpu]"' in c for c in config["setup_commands"])


def test_an_invalid_cluster_yaml_is_caught_by_the_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["head"]["resources"] = {"CPU": "many"}
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError:
        return
    raise AssertionError("the schema accepted a string CPU count")
