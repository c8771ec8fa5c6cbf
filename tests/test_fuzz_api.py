"""schemathesis fuzzes every operation of the service's own OpenAPI document over real HTTP
(a real server, sessions in a real redis-server): no 5xx, and every status, content type, header
and body is one the document declares. The budget is bounded (max_examples per operation).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from pytest_redis.executor import RedisExecutor
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.main import create_app
from service.settings import Settings
from tests.service_support import ServerThread

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def fuzz_server(tiny_artifact: Path, redis_proc: RedisExecutor) -> Iterator[ServerThread]:
    settings_ = dict(
        model=str(tiny_artifact),
        state_url=f"redis://{redis_proc.host}:{redis_proc.port}/0",
        redis_prefix="fuzz:",
        max_new_chars=64,  # small caps keep every generated request quick
        max_prompt_chars=256,
    )
    with ServerThread(**settings_) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerThread) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


def documented_operations() -> list[tuple[str, str]]:
    """(method, path) of every operation, from the app's document (no server needed to collect)."""
    document = create_app(Settings()).openapi()
    return [(method.upper(), path) for path, item in document["paths"].items() for method in item]


# schemathesis's own pytest plugin (from_fixture) does not run under pytest 9 yet, so each
# operation is a parametrized test that draws cases from schemathesis's strategy with hypothesis.
@pytest.mark.parametrize(("method", "path"), documented_operations())
def test_api_matches_its_openapi_document(
    api_schema: schemathesis.BaseSchema, method: str, path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # schemathesis keeps its files (.schemathesis/) under the working directory
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS)

    fuzz()
