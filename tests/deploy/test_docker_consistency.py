"""The Dockerfile and docker-compose.yml agree with each other and with the app (no Docker engine
here, so the files are checked as data, and what they run is run for real elsewhere)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from app.core.config import Settings
from tests.conftest import require
from tests.deploy.dockerfile import parse

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dockerfile():
    return parse(REPO / "Dockerfile")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_bases_are_pinned(dockerfile) -> None:
    args, stages = dockerfile
    for stage in stages.values():
        if stage.base in stages:
            continue
        image, _, tag = stage.base.rpartition(":")
        assert image and tag and tag != "latest" and re.search(r"\d+\.\d+", tag), stage.base


def test_runtime_stages_are_not_root_and_check_health(dockerfile) -> None:
    _, stages = dockerfile
    for name in ("cpu", "gpu"):
        st = stages[name]
        assert st.user and st.user not in ("root", "0"), name
        assert st.expose == [8000] and st.env["PORT"] == "8000"
        assert st.cmd == ["python", "-m", "app"]
        assert any("/health" in part for part in st.healthcheck), st.healthcheck


def test_env_defaults_are_real_settings(dockerfile) -> None:
    _, stages = dockerfile
    fields = {name.upper() for name in Settings.model_fields}
    for name in ("cpu", "gpu"):
        app_env = {k for k in stages[name].env if k not in {"PATH", "PYTHONUNBUFFERED", "DEBIAN_FRONTEND",
                                                               "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}}
        assert app_env <= fields, app_env - fields
        assert {"MODEL_PATH", "CLASSIFIER_PATH", "BACKEND", "DEVICE", "PRECISION", "ONNX_CACHE_DIR"} <= app_env


def test_compose_agrees_with_the_dockerfile(dockerfile, compose) -> None:
    _, stages = dockerfile
    fields = {name.upper() for name in Settings.model_fields}
    api = compose["services"]["api"]
    assert api["build"]["target"] == "cpu" and "gpu" in stages
    assert api["ports"][0].endswith(":8000")
    assert any(v.endswith(":/cache") for v in api["volumes"]) and any(":/models" in v for v in api["volumes"])
    assert api["environment"]["ONNX_CACHE_DIR"] == stages["cpu"].env["ONNX_CACHE_DIR"] == "/cache"
    assert api["restart"] in ("unless-stopped", "always", "on-failure")
    assert "/health" in " ".join(api["healthcheck"]["test"])
    assert set(api["environment"]) <= fields
    gpu = compose["services"]["api-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    lt = compose["services"]["loadtest"]
    assert lt["profiles"] == ["loadtest"] and lt["depends_on"]["api"]["condition"] == "service_healthy"
    assert "http://api:8000" in lt["command"]
    # Compose stops with SIGTERM; its grace must outlast the app's drain.
    grace = float(stages["cpu"].env["SHUTDOWN_GRACE_SECONDS"])
    assert float(api["stop_grace_period"].rstrip("s")) > grace


def test_demo_exports_are_baked_at_build_time(dockerfile) -> None:
    _, stages = dockerfile
    assert "python -m app.prepare" in stages["cpu"].run
    assert any("model/demo" in c for c in stages["cpu"].copies)


# onnxruntime-gpu release -> the CUDA major its PyPI wheel is built for. Add a row only after
# checking the new wheel (`ldd .../capi/libonnxruntime_providers_cuda.so` names libcublas.so.<major>):
# 1.31.1 was checked on an H100 on 2026-11-22 (libcublas.so.13, libcudart.so.13).
ORT_GPU_CUDA_MAJOR = {"1.31": 13}


def test_one_cuda_major_everywhere(dockerfile, compose) -> None:
    """CUDA_MAJOR in the Dockerfile is the source of truth: the onnxruntime-gpu pin is built for it,
    the base image, torch's CUDA index and the build-time library check follow it, and DEPLOY.md
    names it with the driver it needs."""
    args, stages = dockerfile
    major = int(args["CUDA_MAJOR"])
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    ort_gpu = pins["onnxruntime-gpu"]
    assert ort_gpu == pins["onnxruntime"], "the CPU and GPU builds of ONNX Runtime are tested as one version"
    assert ORT_GPU_CUDA_MAJOR[".".join(ort_gpu.split(".")[:2])] == major, ort_gpu
    image, _, tag = stages["gpu"].base.rpartition(":")
    assert image == "nvidia/cuda" and tag.startswith(f"{major}.") and "cudnn" in tag, stages["gpu"].base
    assert re.fullmatch(rf"https://download\.pytorch\.org/whl/cu{major}\d", args["TORCH_CUDA_INDEX_URL"])
    assert any("--index-url ${TORCH_CUDA_INDEX_URL}" in r for r in stages["gpu"].run)
    assert any("libcublas.so.${CUDA_MAJOR}" in r and "not found" in r for r in stages["gpu"].run)
    deploy = (REPO / "docs" / "DEPLOY.md").read_text()
    assert f"CUDA {major}" in deploy and re.search(r"driver (R|version )?5[89]\d", deploy), "DEPLOY.md: CUDA/driver"


def test_gpu_image_defaults_to_auto_precision(dockerfile, compose) -> None:
    _, stages = dockerfile
    assert stages["gpu"].env["PRECISION"] == "auto" and stages["gpu"].env["DEVICE"] == "auto"
    assert compose["services"]["api-gpu"]["environment"]["PRECISION"] == "${PRECISION:-auto}"


def test_compose_scale_profile(dockerfile, compose) -> None:
    _, stages = dockerfile
    fields = {name.upper() for name in Settings.model_fields}
    api, replica, lb = compose["services"]["api"], compose["services"]["api-replica"], compose["services"]["lb"]
    assert replica["profiles"] == lb["profiles"] == ["scale"]
    assert replica["image"] == api["image"] and replica["build"] == api["build"]
    assert "ports" not in replica  # only the balancer is published
    assert set(replica["environment"]) <= fields
    assert "onnx-cache:/cache" in replica["volumes"]
    assert replica["healthcheck"] == api["healthcheck"]
    assert float(replica["stop_grace_period"].rstrip("s")) > float(stages["cpu"].env["SHUTDOWN_GRACE_SECONDS"])
    assert re.fullmatch(r"\$\{REPLICAS:-\d+\}", str(replica["deploy"]["replicas"]))
    # the balancer finds the replicas by the service name, with the same count
    assert lb["environment"]["API_HOST"] == "api-replica"
    assert lb["environment"]["REPLICAS"] == replica["deploy"]["replicas"]
    assert lb["ports"][0].endswith(":" + lb["environment"]["LB_PORT"])
    src, _, dst = lb["volumes"][0].partition(":")
    assert (REPO / src).is_file() and dst.startswith("/etc/haproxy/haproxy.cfg")
    assert (REPO / lb["build"]["context"] / "Dockerfile").is_file()


def test_haproxy_config_is_valid_and_checks_health() -> None:
    cfg = REPO / "deploy" / "haproxy" / "haproxy.cfg"
    text = cfg.read_text()
    assert "option httpchk GET /health" in text and "http-check expect status 200" in text
    assert re.search(r"^\s*retry-on .*\bempty-response\b.*\b503\b", text, re.M)
    assert "option http-buffer-request" in text  # without it, requests in flight on a dead replica are not replayed
    require("haproxy", packages="haproxy")  # haproxy -c
    r = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_podman_compose_override_names_real_services(compose) -> None:
    override = yaml.safe_load((REPO / "deploy" / "podman" / "compose.podman.yml").read_text())
    assert set(override["services"]) <= set(compose["services"])
    for svc in override["services"].values():
        assert svc["ulimits"]["nofile"] == {"soft": 1024, "hard": 1024}
