"""Property-based fuzzing of the OpenAPI schema (schemathesis) against the real server: no 5xx,
and every error is the JSON envelope (TGI's, or OpenAI's on /v1/*)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.app.conftest import Server


@pytest.fixture(scope="module")
def api_schema(server: Server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_5xx(case) -> None:
    response = case.call(timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        if case.path.startswith("/v1/"):  # OpenAI's envelope; bad input is 400, never 422
            assert response.status_code != 422 and set(body) == {"error"}, body
            assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], body
        else:
            assert set(body) == {"error", "error_type"} and body["error"], body
