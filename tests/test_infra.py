"""infra/: the AWS cluster launcher config validates against Ray's own schema; the KubeRay manifests have what KubeRay
and this pipeline need; the local scripts are valid shell. (infra/local/start.sh and stop.sh run for real in
tests/test_submit.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

INFRA = Path(__file__).resolve().parent.parent / "infra"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_aws_cluster_validates_against_rays_schema():
    cluster = load(INFRA / "aws" / "cluster.yaml")
    jsonschema.validate(cluster, json.loads(RAY_SCHEMA.read_text()))
    # ...and against Ray's own check once its defaults are filled in, as `ray up` does
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(cluster))


def test_aws_cluster_shape():
    cluster = load(INFRA / "aws" / "cluster.yaml")
    assert cluster["provider"]["type"] == "aws"
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("p", "g"))  # a CPU head
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"] in ("p4d.24xlarge", "p5.48xlarge")]
    assert gpu, "a worker group of 8-GPU nodes"
    for node_type in types.values():  # S3 by instance role on every node, no keys anywhere
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    text = (INFRA / "aws" / "cluster.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text
    assert any("pip install" in c and "-e ." in c for c in cluster["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in cluster[key]), key
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _secret_refs(container: dict) -> dict[str, dict]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e}


def _check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head
    groups = spec["workerGroupSpecs"]
    assert groups
    for container in _containers(head["template"]) + [c for g in groups for c in _containers(g["template"])]:
        refs = _secret_refs(container)
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"} <= set(refs), container["name"]
        assert all(ref["name"] and ref["key"] for ref in refs.values())
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
    gpu_groups = [g for g in groups if any("nvidia.com/gpu" in c["resources"].get("limits", {})
                                           for c in _containers(g["template"]))]
    assert gpu_groups, "a worker group with GPU limits"
    for group in gpu_groups:
        for container in _containers(group["template"]):
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 8
        assert group["groupName"] and group["maxReplicas"] >= group["minReplicas"] >= 0


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests(name, kind):
    manifest = load(INFRA / "kuberay" / name)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    if kind == "RayJob":
        assert "mixer train /app/jobs/" in spec["entrypoint"]
        assert "RAY_AUTH_TOKEN" in _secret_refs(_containers(spec["submitterPodTemplate"])[0])
        spec = spec["rayClusterSpec"]
    _check_cluster_spec(spec)


def test_local_scripts_are_valid_bash():
    for script in ("start.sh", "stop.sh"):
        path = INFRA / "local" / script
        assert path.stat().st_mode & 0o111, f"{script} is executable"
        subprocess.run(["bash", "-n", str(path)], check=True)
