"""The Dockerfile and docker-compose.yml agree with each other and with the app (no Docker engine
here, so the files are checked as data, and what they run is run for real elsewhere)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from app.core.config import Settings
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
