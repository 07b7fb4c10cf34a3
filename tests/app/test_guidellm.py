"""guidellm (vLLM's benchmark tool), unchanged, against the real server over /v1/completions and
/v1/chat/completions: a short run with zero failed requests. It sends `ignore_eos` and
`stream_options.continuous_usage_stats` and counts the tokens from the usage it gets back.

guidellm lives in its own venv (its dependencies are not ours): `make guidellm-venv`, which
`make test` runs first. Without it this test fails and says so; it does not skip."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.app.conftest import REPO, Server, base_env, start_server, stop_server

GUIDELLM = REPO / "tests" / ".venv-guidellm" / "bin" / "guidellm"
DEMO_TEMPLATE = REPO / "model" / "demo" / "chat_template.jinja"


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_lm_dir, tiny_classifier_dir, onnx_cache):
    s = start_server(tmp_path_factory.mktemp("guidellm"), base_env(
        tiny_lm_dir, tiny_classifier_dir, onnx_cache, CHAT_TEMPLATE=str(DEMO_TEMPLATE), MAX_CONCURRENT_REQUESTS="16"))
    yield s
    stop_server(s)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_guidellm_run_has_no_failed_request(srv: Server, tmp_path, tiny_lm_dir, route) -> None:
    assert GUIDELLM.exists(), f"{GUIDELLM} is missing: run `make guidellm-venv` (make test does)"
    out = tmp_path / "report.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GUIDELLM__LOGGING__CONSOLE_LOG_LEVEL": "WARNING"}
    cmd = [str(GUIDELLM), "run", "--backend", f"kind=openai_http,target={srv.url},request_format={route}",
           "--profile", "kind=concurrent,streams=4", "--constraint", "kind=max_requests,count=16",
           "--data", "kind=synthetic_text,prompt_tokens=24,output_tokens=12",
           "--tokenizer", f"kind=huggingface_auto,model={tiny_lm_dir}",  # the checkpoint's files, not the hub
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    bench = json.loads(out.read_text())["benchmarks"][0]
    totals = bench["metrics"]["request_totals"]
    assert totals["successful"] == 16 and totals["errored"] == 0 and totals["incomplete"] == 0, totals
    # ignore_eos was honoured and the usage read back: every request made exactly its 12 tokens
    output = bench["metrics"]["output_token_count"]["successful"]
    assert output["min"] == output["max"] == 12, output
