"""infra/: the AWS cluster launcher config validates against Ray's own schema; the KubeRay manifests have what KubeRay
and this pipeline need; the local scripts are valid shell. (infra/local/start.sh and stop.sh run for real in
tests/test_submit.py, which also watches every process's command line for the token while they run.)

And the exposure rules: no dashboard reachable from the network without a fence (127.0.0.1 on AWS; on Kubernetes
NetworkPolicies that admit only this Ray cluster's pods, its submitter and the KubeRay operator, evaluated here as
Kubernetes would), no static AWS keys in any manifest (instance roles on AWS, IRSA on EKS), the token only from a
Secret or a 600 file and never on a command line, and every `--address` the comments teach one `mixer` accepts.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from pipeline import jobs

INFRA = Path(__file__).resolve().parent.parent / "infra"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
KUBERAY = [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")]
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
IRSA = "eks.amazonaws.com/role-arn"
DASHBOARD, GCS = 8265, 6379


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


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
    assert any("pip install" in c and "-e ." in c for c in cluster["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in cluster[key]), key
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("chmod 600 ~/.ray/auth_token" in c for c in cluster["setup_commands"])


def test_aws_dashboard_listens_on_the_heads_loopback_only():
    cluster = load(INFRA / "aws" / "cluster.yaml")
    starts = [c for c in cluster["head_start_ray_commands"] if "ray start --head" in c]
    assert len(starts) == 1
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1(\s|$)", starts[0]), starts[0]
    for command in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        assert "0.0.0.0" not in command, command
    # The comments teach the SSH forward and the loopback address that `mixer` then accepts.
    text = (INFRA / "aws" / "cluster.yaml").read_text()
    assert "ray dashboard infra/aws/cluster.yaml" in text
    assert "--address http://127.0.0.1:8265" in text


def test_aws_s3_by_instance_role_without_keys():
    cluster = load(INFRA / "aws" / "cluster.yaml")
    for name, node_type in cluster["available_node_types"].items():
        config = node_type["node_config"]
        assert config["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
        assert config["MetadataOptions"]["HttpTokens"] == "required", name  # IMDSv2: no credentials by plain GET
        assert config["MetadataOptions"]["HttpPutResponseHopLimit"] == 1, name
    text = (INFRA / "aws" / "cluster.yaml").read_text()
    assert not any(key in text for key in AWS_KEYS)
    assert "checkpoint.staging_dir" in text  # where to stage checkpoints: the node's NVMe


# --- KubeRay -----------------------------------------------------------------------------------------------------


def _manifest(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"one {kind}"
    return found[0]


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def _ray_pod_templates(spec: dict) -> dict[str, dict]:
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]})
    return templates


def _all_containers(manifest: dict) -> list[dict]:
    templates = list(_ray_pod_templates(_cluster_spec(manifest)).values())
    if manifest["kind"] == "RayJob":
        templates.append(manifest["spec"]["submitterPodTemplate"])
    return [c for t in templates for c in t["spec"]["containers"]]


def _secret_refs(container: dict) -> dict[str, dict]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e}


def _check_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head
    groups = spec["workerGroupSpecs"]
    assert groups
    gpu_groups = [g for g in groups if any("nvidia.com/gpu" in c["resources"].get("limits", {})
                                           for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "a worker group with GPU limits"
    for group in gpu_groups:
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 8
        assert group["groupName"] and group["maxReplicas"] >= group["minReplicas"] >= 0


@pytest.mark.parametrize("name,kind", KUBERAY)
def test_kuberay_manifests(name, kind):
    manifest = _manifest(load_all(INFRA / "kuberay" / name), kind)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["metadata"]["name"]
    if kind == "RayJob":
        assert "mixer train /app/jobs/" in manifest["spec"]["entrypoint"]
    _check_cluster_spec(_cluster_spec(manifest))


@pytest.mark.parametrize("name,kind", KUBERAY)
def test_kuberay_token_from_a_secret_and_no_static_aws_keys(name, kind):
    docs = load_all(INFRA / "kuberay" / name)
    manifest = _manifest(docs, kind)
    for container in _all_containers(manifest):
        refs = _secret_refs(container)
        assert refs["RAY_AUTH_TOKEN"] == {"name": "mixer-ray-auth", "key": "token"}, container["name"]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
        names = {e["name"] for e in container.get("env", [])}
        assert not names & set(AWS_KEYS), container["name"]
        assert not any("secretRef" in source for source in container.get("envFrom", [])), container["name"]
    # Not in any document either (the commented alternative for other S3 endpoints is no document).
    assert not any(key in json.dumps(docs) for key in AWS_KEYS)
    # No token on a command line in what the comments teach (kubectl create secret --from-literal would be one).
    assert "--from-literal=token" not in (INFRA / "kuberay" / name).read_text()


@pytest.mark.parametrize("name,kind", KUBERAY)
def test_kuberay_pods_use_an_irsa_service_account(name, kind):
    docs = load_all(INFRA / "kuberay" / name)
    account = _manifest(docs, "ServiceAccount")
    assert account["metadata"]["annotations"][IRSA].startswith("arn:aws:iam::")
    for group, template in _ray_pod_templates(_cluster_spec(_manifest(docs, kind))).items():
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], group


# A small model of NetworkPolicy ingress (matchLabels selectors, pod/namespace peers, TCP ports), enough to ask of
# these manifests what Kubernetes would answer: may a pod with these labels, in this namespace, reach that port?
OWN_NAMESPACE = {"kubernetes.io/metadata.name": "training"}
OTHER_NAMESPACE = {"kubernetes.io/metadata.name": "elsewhere"}


@dataclass
class Pod:
    labels: dict[str, str]
    namespace: dict[str, str] = field(default_factory=lambda: OWN_NAMESPACE)


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the model knows matchLabels only: {selector}"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _peer_admits(peer: dict, source: Pod) -> bool:
    assert set(peer) <= {"podSelector", "namespaceSelector"}, f"the model knows no {peer}"
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], source.namespace):
            return False
    elif source.namespace != OWN_NAMESPACE:  # a bare podSelector means pods of the policy's own namespace
        return False
    return _selects(peer.get("podSelector", {}), source.labels)


def admitted(policies: list[dict], source: Pod, dest: Pod, port: int) -> bool:
    isolating = [p["spec"] for p in policies if _selects(p["spec"]["podSelector"], dest.labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not isolating:
        return True  # a pod no policy selects takes everything
    for rule in (r for spec in isolating for r in spec.get("ingress", [])):
        ports = rule.get("ports")
        if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        if not rule.get("from") or any(_peer_admits(peer, source) for peer in rule["from"]):
            return True
    return False


def _pods(manifest: dict) -> tuple[Pod, Pod, Pod]:
    """The head, a worker and the submitter of this manifest, with the labels they run with (the template's, plus
    the node type KubeRay adds). A RayCluster's submitter is a pod labelled as its comments say."""
    templates = _ray_pod_templates(_cluster_spec(manifest))
    labels = {group: dict(t.get("metadata", {}).get("labels", {})) for group, t in templates.items()}
    head = Pod({**labels.pop("head"), "ray.io/node-type": "head"})
    worker = Pod({**next(iter(labels.values())), "ray.io/node-type": "worker"})
    if manifest["kind"] == "RayJob":
        submitter = Pod(dict(manifest["spec"]["submitterPodTemplate"]["metadata"]["labels"]))
    else:
        submitter = Pod({"mixer-pretrain/submitter-of": manifest["metadata"]["name"]})
    return head, worker, submitter


@pytest.mark.parametrize("name,kind", KUBERAY)
def test_kuberay_dashboard_is_fenced_by_network_policies(name, kind):
    docs = load_all(INFRA / "kuberay" / name)
    manifest = _manifest(docs, kind)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    # KubeRay binds the dashboard to 0.0.0.0 unless told otherwise: either way, only the policies fence it.
    host = _cluster_spec(manifest)["headGroupSpec"]["rayStartParams"].get("dashboard-host", "0.0.0.0")
    if host == "0.0.0.0":
        assert policies, "a dashboard on 0.0.0.0 without a NetworkPolicy"
    head, worker, submitter = _pods(manifest)
    assert submitter.labels.get("mixer-pretrain/submitter-of") == manifest["metadata"]["name"]
    if kind == "RayCluster":
        assert "mixer-pretrain/submitter-of: mixer-pretrain" in (INFRA / "kuberay" / name).read_text()
    operator = Pod({"app.kubernetes.io/name": "kuberay-operator"}, OTHER_NAMESPACE)
    neighbour = Pod({"app": "some-other-app"})
    outsider = Pod(dict(worker.labels), OTHER_NAMESPACE)  # the right labels, in a namespace of someone else
    for port in (DASHBOARD, GCS):
        assert admitted(policies, worker, head, port) and admitted(policies, head, head, port)
        assert not admitted(policies, neighbour, head, port), port
        assert not admitted(policies, outsider, head, port), port
    assert admitted(policies, submitter, head, DASHBOARD) and admitted(policies, operator, head, DASHBOARD)
    assert not admitted(policies, submitter, head, GCS) and not admitted(policies, operator, head, GCS)
    # The workers' own ports (raylet, object manager, dashboard agent) are fenced the same way.
    for port in (8076, 52365, 10002):
        assert admitted(policies, head, worker, port)
        assert not admitted(policies, neighbour, worker, port) and not admitted(policies, submitter, worker, port)


# --- what the comments teach, and the local stack -----------------------------------------------------------------


def test_every_address_the_infra_teaches_is_one_mixer_accepts():
    taught = {m for path in INFRA.rglob("*") if path.is_file()
              for m in re.findall(r"--address[= ](\S+)", path.read_text())}
    assert "http://127.0.0.1:8265" in taught
    for address in taught:
        if "$" not in address:  # start.sh's own, built from its port settings, is on 127.0.0.1 too
            jobs.check_transport(address)


def test_local_scripts_are_valid_bash():
    for script in ("start.sh", "stop.sh", "cluster.sh", "common.sh"):
        path = INFRA / "local" / script
        if script != "common.sh":  # sourced, not run
            assert path.stat().st_mode & 0o111, f"{script} is executable"
        subprocess.run(["bash", "-n", str(path)], check=True)


TOKEN_VARS = r"\$\{?(TOKEN|RAY_AUTH_TOKEN|WAIT_TOKEN)\b"


@pytest.mark.parametrize("script", ["start.sh", "cluster.sh"])
def test_local_scripts_put_the_token_on_no_command_line(script):
    """Statically: the token's variables are only ever assigned (to a variable, an exported one or a line of the
    env file), never expanded as a command's argument. tests/test_submit.py checks the running processes."""
    text = (INFRA / "local" / script).read_text()
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        for use in re.finditer(TOKEN_VARS, code):
            before = code[:use.start()]
            assert re.search(r"[A-Za-z_][A-Za-z0-9_]*=\"?$", before), f"{script}:{number}: {line.strip()}"
    if script == "start.sh":  # the readiness check takes its token from the environment
        assert 'os.environ.get("WAIT_TOKEN"' in text and "sys.argv[5]" not in text
    # The env file that holds the token is created under umask 077, afresh.
    env_write = text.index('cat >"$STATE_DIR/env"')
    assert "umask 077" in text[:env_write] and 'rm -f "$STATE_DIR/env"' in text[:env_write]
