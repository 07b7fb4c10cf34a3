"""The app in-process, lifespan entered (`with TestClient(app)`)."""

from __future__ import annotations

import inspect
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.core.config import Settings
from app.main import create_app


def wait_ready(client: TestClient, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("not ready: " + client.get("/health").text)


@pytest.fixture(scope="module")
def settings(tiny_lm_dir, tiny_classifier_dir, onnx_cache) -> Settings:
    return Settings(model_path=tiny_lm_dir, classifier_path=tiny_classifier_dir, onnx_cache_dir=onnx_cache,
                    max_input_tokens=64, max_total_tokens=120)


def test_lifespan_loads_warms_and_serves(settings) -> None:
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        assert client.get("/health").json() == {"status": "ok"}
        r = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200 and r.json()["generated_text"]
        assert client.app.state.service.in_flight == 0
    assert client.app.state.service.ready is False  # shut down with the lifespan


def test_no_route_dependency_runs_in_the_thread_pool(settings) -> None:
    """FastAPI runs a plain `def` dependency in its thread pool: one thread hop and GIL hand-over
    per request. Every dependency of every route is async."""
    app = create_app(settings)
    seen = []

    def walk(dependant) -> None:  # noqa: ANN001
        for dep in dependant.dependencies:
            seen.append(dep.call)
            walk(dep)

    def routes(items):  # noqa: ANN001, ANN202 - FastAPI nests included routers
        for r in items:
            inner = getattr(r, "original_router", None)
            yield from routes(inner.routes) if inner is not None else [r]

    for route in routes(app.routes):
        if getattr(route, "dependant", None) is not None:
            walk(route.dependant)
    assert seen, "no dependencies found: the check would prove nothing"
    assert [c.__name__ for c in seen if not inspect.iscoroutinefunction(c)] == []


def test_uvicorn_auto_serves_with_uvloop_and_httptools(settings) -> None:
    """`python -m app` leaves uvicorn's loop and http on "auto": the C event loop and HTTP parser are
    dependencies, so auto picks them (one stream on the serving path: +17% tokens/s, BENCHMARKS.md)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    config = uvicorn.Config(create_app(settings))
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    import uvloop

    loop = config.get_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_failed_load_is_503_with_the_reason(tmp_path, onnx_cache) -> None:
    app = create_app(Settings(model_path=tmp_path / "nope", classifier_path=None, onnx_cache_dir=onnx_cache))
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while app.state.service.load_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        r = client.get("/health")
        assert r.status_code == 503 and "model failed to load" in r.json()["error"]
        assert "does not exist" in r.json()["error"]
        g = client.post("/generate", json={"inputs": "x"})
        assert g.status_code == 503 and g.json()["error_type"] == "unavailable"


def test_internal_error_is_500_without_traceback_and_serving_goes_on(settings) -> None:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        engine = client.app.state.service.engine
        original = engine.prepare

        def boom(*a, **k):
            raise RuntimeError("secret internal detail")

        engine.prepare = boom
        try:
            r = client.post("/generate", json={"inputs": "x"}, headers={"X-Request-ID": "req-42"})
        finally:
            engine.prepare = original
        assert r.status_code == 500
        assert r.json() == {"error": "internal error (request id req-42)", "error_type": "generation"}
        assert "secret" not in r.text and "Traceback" not in r.text
        assert client.app.state.service.in_flight == 0
        assert client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_api_key_guards_all_but_health_metrics_and_the_playground_page(settings) -> None:
    app = create_app(settings.model_copy(update={"api_key": "k"}))
    with TestClient(app) as client:
        wait_ready(client)
        assert client.get("/metrics").status_code == 200
        for method, path in (("post", "/generate"), ("post", "/classify"), ("get", "/info"), ("post", "/"),
                             ("post", "/tokenize"), ("get", "/openapi.json")):
            r = client.post(path, json={"inputs": "x"}) if method == "post" else client.get(path)
            assert r.status_code == 401 and r.json()["error_type"] == "unauthorized", path
        r = client.get("/v1/models")  # OpenAI's envelope on /v1/*
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/").status_code == 200  # the playground page asks for the key itself
        ok = client.post("/tokenize", json={"inputs": "x"}, headers={"Authorization": "bearer k"})
        assert ok.status_code == 200


def test_settings_from_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MODEL_PATH", str(tmp_path))
    monkeypatch.setenv("CLASSIFIER_PATH", "")
    monkeypatch.setenv("MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("BACKEND", "torch")
    s = Settings()
    assert s.model_path == tmp_path and s.classifier_path is None and s.max_batch_size == 3 and s.backend == "torch"
    monkeypatch.setenv("BACKEND", "tensorrt")
    with pytest.raises(ValidationError, match="backend"):
        Settings()
    monkeypatch.setenv("BACKEND", "auto")
    monkeypatch.setenv("MAX_INPUT_TOKENS", "900")
    monkeypatch.setenv("MAX_TOTAL_TOKENS", "800")
    with pytest.raises(ValidationError, match="MAX_INPUT_TOKENS"):
        Settings()


def test_openai_cuts_the_stop_sequence_that_ended_the_text() -> None:
    from app.engine.scheduler import Finish
    from app.protocol.openai import text_and_reason

    # The engine records what stopped it: the stop string ("ab" for stops ["b", "ab"] on "xxab",
    # the earliest-starting match) or a stop token's text; OpenAI cuts it unless asked to keep it.
    stopped = Finish("stop_sequence", "xxab", 3, None, [], stop_reason="ab", stop_text="ab")
    assert text_and_reason(stopped, include_stop=False) == ("xx", "stop")
    assert text_and_reason(stopped, include_stop=True) == ("xxab", "stop")
    assert text_and_reason(Finish("eos_token", "xx", 3, None, []), False) == ("xx", "stop")
    assert text_and_reason(Finish("eos_token", "xx<t>", 3, None, [], stop_reason=7, stop_text="<t>"), False) == (
        "xx", "stop")
    assert text_and_reason(Finish("length", "xxb", 3, None, []), False) == ("xxb", "length")


def test_info_shows_the_served_precision_and_a_one_line_fallback_reason(nan_lm_dir, tmp_path) -> None:
    """PRECISION=auto (the default) resolves to fp32 on CPU; a failed export's fallback is one line
    in /info, naming the report file that holds the rest."""
    app = create_app(Settings(model_path=nan_lm_dir, classifier_path=None, onnx_cache_dir=tmp_path))
    with TestClient(app) as client:
        wait_ready(client, timeout=300)
        info = client.get("/info").json()
    gen = info["generation"]
    assert info["settings"]["precision"] == "auto"
    assert (gen["backend"], gen["device"], gen["precision"]) == ("torch", "cpu", "fp32")
    reason = gen["fallback_reason"]
    assert "\n" not in reason and len(reason) <= 400
    assert "export parity failed on CPUExecutionProvider (fp32)" in reason and "failed checks" in reason
    report = reason.rsplit("full report: ", 1)[1]
    assert report.startswith(str(tmp_path)) and report.endswith(".failed.json")
