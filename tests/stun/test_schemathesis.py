"""Schemathesis against the live server's /openapi.json: bounded generated requests to every
operation (with the right cluster key and with none), no 5xx, answers that match the schema."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from .server_proc import ADMIN_KEY, ALPHA_KEY, StunProcess

EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[StunProcess]:
    # generous limits, so that the fuzzing reaches the routes, and short long polls
    proc = StunProcess(
        {
            "COMFY_CLUSTER_STUN_RATE_PER_IP": "100000",
            "COMFY_CLUSTER_STUN_RATE_PER_CLUSTER": "100000",
            "COMFY_CLUSTER_STUN_LONGPOLL_MAX_S": "0.05",
        }
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


def _fuzz(operation: schemathesis.APIOperation, headers: dict[str, str], url: str) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def run(case: schemathesis.Case) -> None:
        if headers and case.path_parameters and "cluster_id" in case.path_parameters:
            case.path_parameters["cluster_id"] = "alpha"  # reach past authentication
        case.headers = {**(case.headers or {}), **headers}
        case.call_and_validate(
            base_url=url, checks=[not_a_server_error, response_schema_conformance], timeout=10
        )

    run()


@pytest.mark.slow
def test_the_openapi_schema_holds_for_every_operation(fuzzed: StunProcess) -> None:
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:
        _fuzz(operation, {"X-Cluster-Key": ALPHA_KEY, "X-Admin-Key": ADMIN_KEY}, fuzzed.url)
        _fuzz(operation, {}, fuzzed.url)
