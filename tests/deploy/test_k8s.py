"""deploy/k8s: both overlays render offline (`kubectl kustomize`), every object passes the Kubernetes
JSON schemas offline (`kubernetes-validate --strict`), and the objects say what the deployment
promises: probes on /health, a grace period above the drain, an HPA on the server's own metric,
GPU requests only in the gpu overlay, the ONNX cache on a volume."""

from __future__ import annotations

import json
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


# The CPU overlay per GPT-2 size (`cpu` is the demo and small); each patches memory and the start-up
# probe from the measured table (bench/results/sizes.json, BENCHMARKS.md "Every GPT-2 size").
SIZE_OVERLAYS = {"cpu": "small", "cpu-medium": "medium", "cpu-large": "large", "cpu-xl": "xl"}
SIZES_JSON = REPO / "bench" / "results" / "sizes.json"
GIB = 1 << 30


@pytest.fixture(scope="module", params=["cpu", "gpu", "cpu-medium", "cpu-large", "cpu-xl"])
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
    assert c["image"].endswith(f":{name.split('-')[0]}")
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


def _quantity(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(float(q[:-2]) * units[q[-2:]]) if q[-2:] in units else int(q)


def kv_worst_bytes(size: str, env: dict[str, str]) -> int:
    """The most KV cache the server can reserve with these settings: the slot runner's rows
    double up to MAX_BATCH_SIZE (plus its spare row) and its width grows up to the context
    (MAX_TOTAL_TOKENS), keys and values in fp32 for every layer (`app.engine.ort_runner`)."""
    from bench.sizes import SHAPES

    e, n_layer, _ = SHAPES[size]
    defaults = Settings()
    rows = int(env.get("MAX_BATCH_SIZE", defaults.max_batch_size)) + 1
    width = int(env.get("MAX_TOTAL_TOKENS", defaults.max_total_tokens))
    return rows * width * n_layer * 2 * e * 4


def prefix_budget_bytes(env: dict[str, str]) -> int:
    """The prefix cache's budget (host memory on the CPU), which fills under prompts that differ."""
    return Settings(**{k.lower(): v for k, v in env.items() if k.startswith("PREFIX_CACHE")}).prefix_cache_bytes


@pytest.mark.parametrize(("name", "size"), SIZE_OVERLAYS.items())
def test_cpu_overlay_memory_follows_the_measured_table(name, size, tmp_path) -> None:
    """Each size's limit holds, with 10% to spare, the largest of: the first start's export child
    at any precision (plus the waiting server beside it), the server's measured peak through 1
    and 8 streams, and the fp32 server at rest plus the most KV cache its settings let it
    reserve (a full batch at full context) plus a full prefix cache (PREFIX_CACHE_MB). The request
    holds the server's measured peak. The server's own start check (`memory_fit.export_need`)
    passes under the limit, and the start-up probe waits twice the measured cold start (export included)."""
    from app.loading import memory_fit
    from bench.sizes import SHAPES

    rows = [r for r in json.loads(SIZES_JSON.read_text())["rows"] if r["size"] == f"gpt2-{size}"]
    onnx = {r["precision"]: r for r in rows if r["backend"] != "torch"}
    assert set(onnx) == {"fp32", "int8", "int4"}, f"{size}: every precision measured"
    assert all(r["served_by"] == "onnxruntime" for r in onnx.values()), "every size and precision on ONNX Runtime"
    c = _container(by_kind(render(name)))
    env = _env(c)
    limit, request = (_quantity(c["resources"][k]["memory"]) for k in ("limits", "requests"))
    waiting_server = 0.5  # GiB: the server process while its export child runs (imports, no model yet)
    measured = max(max(r["export_peak_gib"] + waiting_server, r["peak_rss_gib"]) for r in onnx.values()) * GIB
    worst_serving = onnx["fp32"]["idle_rss_gib"] * GIB + kv_worst_bytes(size, env) + prefix_budget_bytes(env)
    assert limit >= 1.1 * max(measured, worst_serving), (name, limit / GIB, measured / GIB, worst_serving / GIB)
    assert onnx["fp32"]["peak_rss_gib"] * GIB <= request <= limit
    e, n_layer, n_head = SHAPES[size]
    (tmp_path / "config.json").write_text(json.dumps({"n_embd": e, "n_layer": n_layer, "n_head": n_head}))
    assert memory_fit.export_need(tmp_path) < limit
    probe = c["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 2 * max(r["cold_s"] for r in onnx.values())
    # the cache volume holds an export in progress: the fp32 trace beside the export it writes
    storage = by_kind(render(name))["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"]
    assert _quantity(storage) >= 2 * memory_fit.fp32_weight_bytes(tmp_path), (name, storage)
    if size != "small":  # the cpu overlay's image and settings, but for the batch that fits
        base = _env(_container(by_kind(render("cpu"))))
        assert {k: v for k, v in env.items() if k != "MAX_BATCH_SIZE"} == base
