"""deploy/k8s: both overlays render offline (`kubectl kustomize`), every object passes the Kubernetes
JSON schemas offline (`kubernetes-validate --strict`), and the objects say what the deployment
promises: probes on /health, a grace period above the drain, an HPA on the server's own metric,
GPU requests only in the gpu overlay, the ONNX cache on a volume."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from app.core.config import Settings
from app.core.metrics import Metrics
from tests.conftest import needs
from tests.deploy.dockerfile import parse

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUBE_VERSION = "1.32.0"  # a version the offline schemas carry; the manifests use only GA APIs

pytestmark = needs("kubectl", packages="kubectl (this machine kind has it; Debian's kubernetes-client 1.20 is too old "
                                 "for these kustomizations)")


def render(overlay: str) -> list[dict]:
    r = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def overlay(request: pytest.FixtureRequest) -> tuple[str, dict[str, dict]]:
    docs = render(request.param)
    return request.param, by_kind(docs)


def test_every_object_passes_the_kubernetes_schemas(overlay) -> None:
    _, objs = overlay
    assert set(objs) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                         "PersistentVolumeClaim"}
    for obj in objs.values():
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_the_schema_check_catches_mistakes(overlay) -> None:
    _, objs = overlay
    bad = yaml.safe_load(yaml.safe_dump(objs["Deployment"]))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(objs["Deployment"]))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def _container(objs: dict[str, dict]) -> dict:
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def _env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c["env"]}


def test_probes_drain_and_grace(overlay) -> None:
    _, objs = overlay
    dep = objs["Deployment"]
    c = _container(objs)
    port = c["ports"][0]
    assert port["containerPort"] == 8000 and _env(c)["PORT"] == "8000"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": port["name"]}, probe
    # the readiness probe takes a draining pod (503) out within one period
    assert c["readinessProbe"]["failureThreshold"] == 1
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = float(_env(c)["SHUTDOWN_GRACE_SECONDS"])
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert grace > drain + pre_stop
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert set(_env(c)) <= {f.upper() for f in Settings.model_fields}
    _, stages = parse(REPO / "Dockerfile")
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    assert stages["cpu"].user == "app"


def test_service_pdb_and_selectors_match(overlay) -> None:
    _, objs = overlay
    labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for kind, selector in (("Service", objs["Service"]["spec"]["selector"]),
                           ("PodDisruptionBudget", objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]),
                           ("Deployment", objs["Deployment"]["spec"]["selector"]["matchLabels"])):
        assert selector and selector.items() <= labels.items(), kind
    assert objs["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert objs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_hpa_scales_on_the_servers_own_metric(overlay) -> None:
    _, objs = overlay
    hpa = objs["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gpt2-serve"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"  # not Resource (CPU)
    name = metric["pods"]["metric"]["name"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert name in exported, (name, exported)
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # the adapter rules publish that metric under the same name
    rules = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    published = {r["name"]["as"] for r in rules}
    assert name in published and published <= exported
    for r in rules:
        assert re.match(r"^(\w+)\{", r["seriesQuery"])[1] in exported
    pod_annotations = objs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert pod_annotations["prometheus.io/path"] == "/metrics" and pod_annotations["prometheus.io/port"] == "8000"


def test_gpu_only_in_the_gpu_overlay(overlay) -> None:
    name, objs = overlay
    c = _container(objs)
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    assert c["image"].endswith(f":{name}")
    if name == "gpu":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 == c["resources"]["requests"]["nvidia.com/gpu"]
        assert _env(c)["DEVICE"] == "cuda" and _env(c)["PRECISION"] == "fp16"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert "nvidia.com/gpu" not in str(objs) and _env(c)["DEVICE"] == "cpu"
        assert _env(c)["NUM_THREADS"] == str(c["resources"]["requests"]["cpu"])


def test_onnx_cache_on_a_volume(overlay) -> None:
    _, objs = overlay
    c = _container(objs)
    cache = _env(c)["ONNX_CACHE_DIR"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == cache]
    (vol,) = [v for v in objs["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    claim = vol["persistentVolumeClaim"]["claimName"]
    assert objs["PersistentVolumeClaim"]["metadata"]["name"] == claim
    assert objs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]  # shared by the replicas
