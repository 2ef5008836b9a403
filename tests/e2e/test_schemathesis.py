"""API fuzzing with schemathesis over every route of a real server (SmolLM2): the server's OpenAPI schema,
with the request bodies of the generation routes added from their pydantic models (the routes read raw
JSON, so FastAPI does not list them), must never yield a 5xx or a response that breaks its schema.
Bounded for CI (EMBER_FUZZ_EXAMPLES per operation, default 12); a long run by hand:
EMBER_FUZZ_EXAMPLES=500 pytest tests/e2e/test_schemathesis.py."""
from __future__ import annotations

import os

import requests
import schemathesis  # the `test` extra: a missing one fails here, it does not skip
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

EXAMPLES = int(os.environ.get("EMBER_FUZZ_EXAMPLES", "12"))
MAX_TOKENS = 4  # generated bodies may ask for thousands of tokens: cap what the model really generates


def _bodies() -> dict[str, type]:
    from ember.api.anthropic_routes import CountTokensRequest, MessagesRequest
    from ember.api.protocol import (
        AbortRequest, ChatCompletionRequest, CompletionRequest, GenerateRequest, ParseFunctionCallRequest,
        SeparateReasoningRequest,
    )
    return {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
            "/generate": GenerateRequest, "/v1/messages": MessagesRequest,
            "/v1/messages/count_tokens": CountTokensRequest, "/abort_request": AbortRequest,
            "/separate_reasoning": SeparateReasoningRequest, "/parse_function_call": ParseFunctionCallRequest}


def _with_bodies(raw: dict) -> dict:
    components = raw.setdefault("components", {}).setdefault("schemas", {})
    for path, model in _bodies().items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        op = raw["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    return raw


def _over(value, limit: int) -> bool:
    """Whether the server would read `value` as a count above `limit`: pydantic's lax mode takes 6415.0 and
    "6415" for an int field as well as 6415 (a float max_tokens once made a fuzz request run for minutes)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        return float(value) > limit
    except ValueError:
        return False


def _cap(case) -> None:
    """Keep generation short whatever the fuzzer asked for (the fuzzing is about shapes, not length)."""
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        if _over(body.get(key), MAX_TOKENS):
            body[key] = MAX_TOKENS
    if case.path in ("/v1/completions", "/v1/chat/completions") and body.get("max_tokens") is None \
            and body.get("max_completion_tokens") is None:  # (null: the server's default, up to the context)
        body["max_tokens"] = MAX_TOKENS
    if _over(body.get("n"), 4):
        body["n"] = 4
    sps = body.get("sampling_params")
    for sp in sps if isinstance(sps, list) else [sps]:
        if isinstance(sp, dict):
            if sp.get("max_new_tokens") is None or _over(sp["max_new_tokens"], MAX_TOKENS):
                sp["max_new_tokens"] = MAX_TOKENS
            if _over(sp.get("n"), 4):
                sp["n"] = 4


def test_fuzz_every_route(smollm2_server):
    from hypothesis import given

    raw = requests.get(f"{smollm2_server.base_url}/openapi.json", timeout=60).json()
    schema = schemathesis.openapi.from_dict(_with_bodies(raw))
    failures, labels = [], []
    for result in schema.get_all_operations():
        op = result.ok()
        labels.append(op.label)

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            _cap(case)
            response = case.call(base_url=smollm2_server.base_url, timeout=120)
            case.validate_response(response, checks=(not_a_server_error, response_schema_conformance))

        try:
            fuzz()
        except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - collected: one report for every route
            failures.append(f"{op.label}: {type(e).__name__}: {str(e)[:1500]}")
    assert len(labels) >= 20 and "POST /v1/chat/completions" in labels, labels
    assert failures == [], "\n\n".join(failures)
    smollm2_server.assert_alive()
