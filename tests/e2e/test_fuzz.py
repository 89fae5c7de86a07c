"""Schemathesis against a real ``rexec serve``: every operation of its OpenAPI document, with
valid and invalid inputs generated from the document, sent with the bootstrap admin key (so
they reach the handlers); no answer may be a 5xx. Bounded to keep it under a minute."""

from __future__ import annotations

import time

import hypothesis
import hypothesis.errors
import schemathesis
from hypothesis import HealthCheck
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.api.test_openapi_schemathesis import shorten_long_polls
from tests.conftest import ADMIN_HEADERS
from tests.e2e.conftest import Plane

MAX_EXAMPLES = 40
"""Per operation and generation mode: ~25 operations x 2 modes x 40 examples, about 20 s."""
BUDGET = 90.0


def test_schemathesis_finds_no_server_error(plane: Plane) -> None:
    url = plane.settings.api_url
    schema = schemathesis.openapi.from_url(f"{url}/schema/openapi.json")
    failures: list[str] = []
    operations = calls = 0
    began = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                nonlocal calls
                calls += 1
                shorten_long_polls(case)  # the change feed would hold a request up to 60 s
                case.call_and_validate(
                    base_url=url, headers=ADMIN_HEADERS, checks=[not_a_server_error], timeout=30
                )

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                continue  # nothing to make invalid (no parameters, no body): GET /healthz
            except Exception as exc:  # one report per operation and mode, then go on
                failures.append(f"{operation.label} ({mode.value}): {exc}"[:2000])
    elapsed = time.monotonic() - began
    assert operations >= 20, f"only {operations} operations in the document"
    assert calls >= operations * MAX_EXAMPLES, f"only {calls} requests"
    assert not failures, "\n\n".join(failures)
    assert elapsed < BUDGET, f"the fuzz run took {elapsed:.0f}s"
