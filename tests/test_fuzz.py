"""Schema fuzzing (issue 15): the OpenAPI document a real server serves at /openapi.json
describes every API route, and schemathesis generates requests for every operation in it, with
the server administrator's key and with an organisation's non-admin key: no answer is a 5xx,
every answer whose status the document declares conforms to its schema (every error to
OpenAI's error body: the document declares it as each operation's `default`), and the server
logs no traceback.

Bounded to fit CI: FUZZ_EXAMPLES cases per operation and key (hypothesis, derandomised so a
run is reproducible). Generation stays cheap however the fuzzer fills a request: the server runs
with BASTION_DEFAULT_MAX_TOKENS=4, and before a generated case is sent its `max_tokens`,
`max_completion_tokens` and `max_output_tokens` are clamped to at most 4 and `n` to at most 2;
half of the generation cases get a real model's name (the fuzzer's own strings name no model,
so without that every one would stop at a 404)."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest

from conftest import ADMIN_KEY, MODEL, RunningServer, bearer, make_tenant

schemathesis = pytest.importorskip("schemathesis", reason="pip install '.[test]' (schemathesis)")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("BASTION_FUZZ_EXAMPLES", "6"))
GENERATION = {"/v1/chat/completions": MODEL, "/v1/completions": MODEL,
              "/v1/responses": MODEL, "/v1/embeddings": "all-minilm-l6-v2"}
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@pytest.fixture
def srv(bounded_server: RunningServer) -> RunningServer:
    """The bounded server (conftest.py), shared with test_hostile_inputs.py."""
    return bounded_server


def api_routes() -> set[tuple[str, str]]:
    """(method, path) of every HTTP route of the app, as its routers declare them (the
    dashboard's HTML pages and the WebSocket aside: OpenAPI describes neither)."""
    from fastapi.routing import APIRoute

    from bastion.app import API_MODULES

    out = set()
    for route in (r for module in API_MODULES for r in module.router.routes):
        if not isinstance(route, APIRoute):
            continue  # the WebSocket
        if route.path == "/openapi.json":
            continue
        path = route.path.replace(":path}", "}")
        out.update((m.lower(), path) for m in route.methods if m not in ("HEAD", "OPTIONS"))
    return out


def test_openapi_document_lists_every_route(srv: RunningServer) -> None:
    assert httpx.get(f"{srv.base_url}/openapi.json").status_code == 401  # a key is needed
    r = httpx.get(f"{srv.base_url}/openapi.json", headers=bearer(ADMIN_KEY))
    assert r.status_code == 200, r.text
    doc = r.json()
    served = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    routes = api_routes()
    assert len(routes) > 30
    assert routes - served == set(), "routes missing from /openapi.json"
    assert served - routes == set()
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert "default" in op["responses"] and "422" not in op["responses"], path


def clamp(case: Any, real_model: bool) -> None:
    """Keep generation cheap: bounded tokens and choices, and now and then a real model."""
    body = case.body
    if case.path not in GENERATION or not isinstance(body, dict):
        return
    if real_model:
        body["model"] = GENERATION[case.path]
    for key in TOKEN_LIMITS:
        if isinstance(body.get(key), int) and not isinstance(body[key], bool):
            body[key] = min(body[key], 4)
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool):
        body["n"] = min(body["n"], 2)
    if isinstance(body.get("best_of"), int) and not isinstance(body["best_of"], bool):
        body["best_of"] = min(body["best_of"], 2)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 2:
        body["prompt"] = prompt[:2]


@pytest.mark.timeout(900)
def test_fuzz_every_operation(srv: RunningServer) -> None:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    log_start = len(srv.log())  # the shared server's log: only what the fuzzing caused
    doc = httpx.get(f"{srv.base_url}/openapi.json", headers=bearer(ADMIN_KEY)).json()
    _, tenant = make_tenant(srv.api, plan="scale", name="fuzz",
                            permissions=("inference", "training", "models"))
    keys = {"server admin": ADMIN_KEY, "non-admin": tenant["key"]}
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.update(base_url=srv.base_url)
    failures: list[str] = []
    counts: dict[str, int] = {}
    for label, key in keys.items():
        for result in schema.get_all_operations():
            operation = result.ok()
            name = f"{operation.method.upper()} {operation.path}"

            @given(case=operation.as_strategy(), real=st.booleans())
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case: Any, real: bool) -> None:
                clamp(case, real)
                counts[label] = counts.get(label, 0) + 1
                response = case.call(headers={"Authorization": f"Bearer {key}"}, timeout=120)
                case.validate_response(response, checks=[not_a_server_error,
                                                         response_schema_conformance])

            try:
                run()
            except Exception as exc:  # one operation's failure must not hide the others'
                failures.append(f"{label} {name}: {type(exc).__name__}: {str(exc)[:1500]}")
    total = sum(counts.values())
    print(f"\nschema fuzzing: {total} cases run "
          f"({', '.join(f'{k}: {v}' for k, v in counts.items())}), "
          f"{FUZZ_EXAMPLES} per operation and key at most")
    assert httpx.get(f"{srv.base_url}/health").status_code == 200
    log = srv.log()[log_start:]
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-4000:]
    assert not failures, f"{len(failures)} operations failed:\n" + "\n\n".join(failures)
