"""The admin API fuzzed against its own OpenAPI description with schemathesis.

    schemathesis (requests) ──HTTP──▶ postillon's admin server (a real `postillon serve`)

Valid requests (positive mode) must get a documented status and a body that
matches the described schema; invalid ones (negative mode) a 4xx. Nothing
may answer 500. The number of examples is bounded so the test stays quick.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from admin_fixtures import AdminSetup

pytestmark = pytest.mark.integration

EXAMPLES = 300


def test_api_matches_its_openapi_description_and_never_fails(admin_setup: AdminSetup) -> None:
    setup = admin_setup
    # Something in the queue, so listings and the summary have content.
    queue_id = setup.send(["bob@remote.test"])
    setup.wait_log(f"{queue_id}: deferred:")
    request = urllib.request.Request(setup.base + "/api/openapi.json", headers=setup.auth)
    with urllib.request.urlopen(request, timeout=10) as response:
        spec: dict[str, Any] = json.load(response)
    schema = schemathesis.openapi.from_dict(spec)
    valid = schema.as_strategy(generation_mode=GenerationMode.POSITIVE)
    invalid = schema.as_strategy(generation_mode=GenerationMode.NEGATIVE)
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        positive = data.draw(st.booleans())
        case = data.draw(valid if positive else invalid)
        response = case.call(base_url=setup.base, headers=setup.auth, timeout=10)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        checks = (
            [
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ]
            if positive
            else [not_a_server_error]
        )
        case.validate_response(response, checks=checks)

    check()
    assert 500 not in seen
    assert seen.get(200, 0) > 0 and sum(v for k, v in seen.items() if 400 <= k < 500) > 0
