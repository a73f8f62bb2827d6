"""A bounded schemathesis run over the service's own OpenAPI schema: whatever it sends, no 5xx.

Driven through schemathesis's operations and hypothesis directly: its pytest plugin
(`schemathesis.pytest`) does not run under this project's pytest 9.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from service_helpers import running
from test_service_limits import error_of
from tiny import make_store

MAX_EXAMPLES = 20  # per operation and mode: ~18 operations x 2 modes stay under a minute here


def test_no_server_errors_on_generated_requests(tmp_path):
    store = make_store(tmp_path / "store", arch="bert", n_adapters=2)
    with running(store.root, api_key="k", max_inputs=8, max_input_chars=500) as srv:
        schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
        failures: list[str] = []
        calls = 0

        def check(case) -> None:
            nonlocal calls
            if case.method.upper() in ("PUT", "DELETE") and case.path.startswith("/v1/adapters"):
                # keep the store's variants loaded for the other operations: admin calls get names not in it
                case.path_parameters = {"name": f"{case.path_parameters.get('name', 'x')}-absent"}
            response = case.call(base_url=srv.url, headers={"Authorization": "Bearer k"}, timeout=30)
            calls += 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")
            elif response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
                try:
                    error_of(case.formatted_path, response.json())
                except AssertionError:
                    failures.append(f"{case.method} {case.formatted_path}: error body {response.text[:300]}")

        for result in schema.get_all_operations():
            op = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run = settings(
                    max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
                )(given(case=op.as_strategy(generation_mode=mode))(check))
                try:
                    run()
                except Unsatisfiable:  # nothing to make invalid (no parameters, no body): negative mode is empty
                    assert mode == GenerationMode.NEGATIVE
        assert calls >= 100
        assert not failures, "\n".join(failures[:10])
        assert srv.classify("lora-0", "still serving").status_code == 200
