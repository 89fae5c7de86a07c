"""Schemathesis against the app's own OpenAPI document: every operation, with valid and
invalid inputs generated from the document, with an admin key and with a viewer key. Every
answer must be one the document declares (status, content type, body schema, headers), no
invalid input may be accepted, and none may be a 5xx: clients generated from the document
rely on all of that.

The app runs in this test's event loop (it shares the runtime's connections); Hypothesis
runs in a worker thread and sends each request back into the loop."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from hypothesis import HealthCheck
from schemathesis.checks import (
    CheckFunction,
    content_type_conformance,
    missing_required_header,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

from rexec.dispatcher.api import create_app
from rexec.dispatcher.runtime import Runtime
from rexec.schemas.api import Role
from tests.conftest import ADMIN_HEADERS

pytestmark = pytest.mark.anyio

MAX_EXAMPLES = 20
"""Per operation, mode and key: 25 operations x 2 modes x 2 keys x 20, about 1,800 requests
(fewer where an operation has little to vary), some 20 s per database."""
BUDGET = 90.0
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    missing_required_header,
]
"""Every check of a single response (the stateful ones need schemathesis's own runner)."""
BASE_URL = "http://rexec.test"


async def test_the_document_describes_every_answer(runtime: Runtime) -> None:
    app = create_app(runtime)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=30) as client:
        document = (await client.get("/schema/openapi.json")).json()
        created = await client.post(
            "/v1/apikeys", json={"role": "viewer", "name": "fuzz"}, headers=ADMIN_HEADERS
        )
        assert created.status_code == 201, created.text
        assert created.json()["key"]["role"] == Role.VIEWER
        viewer = {"authorization": f"Bearer {created.json()['secret']}"}
        schema = schemathesis.openapi.from_dict(document)
        schema.config.update(base_url=BASE_URL)
        began = time.monotonic()
        report = await anyio.to_thread.run_sync(
            fuzz, schema, client, {"admin": ADMIN_HEADERS, "viewer": viewer}
        )
        elapsed = time.monotonic() - began
    operations, calls, statuses, failures = report
    print(f"schemathesis: {operations} operations, {calls} requests in {elapsed:.1f}s")
    print({who: sorted(counts.items()) for who, counts in statuses.items()})
    assert operations >= 25, f"only {operations} operations in the document"
    assert not failures, "\n\n".join(failures)
    assert calls >= operations * MAX_EXAMPLES, f"only {calls} requests"
    # The keys were used: the admin reached the handlers, the viewer was refused admin work.
    assert statuses["admin"][200] + statuses["admin"][201] > 0, statuses
    assert statuses["viewer"][403] > 0 and statuses["viewer"][200] > 0, statuses
    assert elapsed < BUDGET, f"the run took {elapsed:.0f}s"


def fuzz(
    schema: Any, client: httpx.AsyncClient, keys: dict[str, dict[str, str]]
) -> tuple[int, int, dict[str, Counter[int]], list[str]]:
    """Every operation, mode and key (in a worker thread): how many operations and requests,
    and one report per operation, mode and key that failed."""
    failures: list[str] = []
    operations = 0
    calls = [0]
    statuses: dict[str, Counter[int]] = {who: Counter() for who in keys}
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for who, headers in keys.items():
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    run_operation(operation, mode, client, headers, calls, statuses[who])
                except hypothesis.errors.Unsatisfiable:
                    continue  # nothing to make invalid (no parameters, no body): GET /healthz
                except (
                    Exception,
                    BaseExceptionGroup,
                ) as exc:  # one report per operation, key and mode, then go on
                    failures.append(f"{operation.label} as {who} ({mode.value}): {exc}"[:3000])
    return operations, calls[0], statuses, failures


def run_operation(
    operation: Any,
    mode: GenerationMode,
    client: httpx.AsyncClient,
    headers: dict[str, str],
    calls: list[int],
    statuses: Counter[int],
) -> None:
    """Hypothesis over one operation in one mode with one key; raises on the first failure."""

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        calls[0] += 1
        shorten_long_polls(case)
        kwargs = case.as_transport_kwargs(base_url=BASE_URL, headers=headers)
        response = anyio.from_thread.run(send, client, kwargs)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS, headers=headers, transport_kwargs=kwargs)

    run()


LONGEST_POLL = 0.05
"""Seconds a generated long-poll may hold its request: the fuzzer checks answers, and a
feed with no change would otherwise hold every one for the whole wait it asks (up to 60 s)."""


def shorten_long_polls(case: schemathesis.Case) -> None:
    """Cap a valid ``wait`` query parameter (0 to 60 s): an invalid one stays, so it is still
    refused."""
    wait = (case.query or {}).get("wait")
    if isinstance(wait, int | float) and not isinstance(wait, bool) and 0 < wait <= 60:
        case.query["wait"] = min(wait, LONGEST_POLL)


async def send(client: httpx.AsyncClient, kwargs: dict[str, Any]) -> httpx.Response:
    """Send a case's request (serialized for ``requests``) with httpx."""
    body: dict[str, Any] = {}
    if "json" in kwargs:
        body["json"] = kwargs["json"]
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        body["content"] = data if isinstance(data, bytes | str) else str(data)
    return await client.request(
        kwargs["method"],
        kwargs["url"],
        params=kwargs.get("params"),
        headers=kwargs.get("headers"),
        **body,
    )


# --- what the runs above found, pinned down (generated examples vary with the data) --------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?stat=running", "unknown query parameter 'stat'"),
        ("?pool=a&pool=b", "query parameter 'pool' is given 2 times"),
    ],
)
async def test_unknown_or_repeated_query_parameters_are_refused(
    api: httpx.AsyncClient, query: str, message: str
) -> None:
    for path in ("/v1/tasks", "/v1/agents", "/v1/tokens"):
        response = await api.get(path + query)
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]


async def test_the_document_keeps_bounds_and_refuses_unknown_fields(
    api: httpx.AsyncClient,
) -> None:
    document = (await api.get("/schema/openapi.json")).json()
    paths, schemas = document["paths"], document["components"]["schemas"]
    for name in ("SubmitTask", "SubmitBatch", "WaitTasks", "PoolCreate", "AgentRegister"):
        assert schemas[name]["additionalProperties"] is False, name
    assert "additionalProperties" not in schemas["TaskView"]  # responses may grow fields
    wait = {p["name"]: p for p in paths["/v1/tasks/{task_id}"]["get"]["parameters"]}["wait"]
    assert {"type": "number", "minimum": 0} in wait["schema"]["oneOf"]
    grant = paths["/v1/tasks/{task_id}/log-grant"]["post"]["parameters"]
    attempt = {p["name"]: p for p in grant}["attempt"]
    assert {"type": "integer", "minimum": 1} in attempt["schema"]["oneOf"]
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for path, operations in paths.items():
        for operation in operations.values():
            for status, answer in operation["responses"].items():
                if status >= "400" and path != "/readyz":  # its 503 is {status, reason}
                    assert answer["content"]["application/json"]["schema"] == error, path
    assert paths["/v1/tasks"]["get"]["responses"].keys() >= {"400", "401", "403", "404", "422"}
    assert "400" not in paths["/v1/tasks/{task_id}/cancel"]["post"]["responses"]
    assert (await api.get("/v1/tasks/x?wait=-1")).status_code == 400
