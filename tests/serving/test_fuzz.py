"""Schema-based fuzzing (schemathesis) against a running server: no 5xx, status codes and bodies as
documented, and every error JSON. Bounded: 50 examples per operation, about a minute in all."""

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serving.conftest import Server


def errors_are_json(ctx, response, case):
    if response.status_code >= 400:
        ctype = response.headers.get("content-type", [""])
        ctype = ctype[0] if isinstance(ctype, list) else ctype
        assert ctype.startswith("application/json"), f"a {response.status_code} came back as {ctype!r}"
        body = response.json()
        assert isinstance(body.get("error"), str) and isinstance(body.get("code"), str), body


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_fuzz_every_operation(model_path):
    # schemathesis' own pytest plugin does not run under this pytest; its strategies and checks do
    server = Server({"WARN_MODEL_PATH": str(model_path), "WARN_STORE": "memory"})
    try:
        server.wait_ready()
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 10
        for op in operations:

            @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy())
            def fuzz(case):
                case.call_and_validate(checks=[*CHECKS, errors_are_json], timeout=30)

            fuzz()
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200, "the server went down under fuzzing"
    finally:
        server.stop()
