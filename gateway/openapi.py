"""The OpenAPI document of every route, built from the pydantic models."""
from __future__ import annotations

from pydantic.json_schema import models_json_schema

from gateway import protocol as p

ROUTES = [
    ("post", "/v1/completions", "Create a completion", p.CompletionRequest, p.CompletionResponse),
    ("post", "/v1/chat/completions", "Create a chat completion", p.ChatCompletionRequest, p.ChatCompletionResponse),
    ("get", "/v1/models", "List the served models", None, p.ModelList),
    ("post", "/tokenize", "Tokenize a prompt or chat", p.TokenizeRequest, p.TokenizeResponse),
    ("post", "/detokenize", "Turn token ids into text", p.DetokenizeRequest, p.DetokenizeResponse),
    ("get", "/health", "Liveness and readiness", None, None),
    ("get", "/version", "Server version", None, None),
    ("get", "/metrics", "Prometheus metrics (text format)", None, None),
    ("get", "/openapi.json", "This document", None, None),
]


def openapi_document(version: str) -> dict:
    models = {m for _, _, _, req, resp in ROUTES for m in (req, resp) if m is not None} | {p.ErrorResponse}
    _, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                 ref_template="#/components/schemas/{model}")
    paths: dict = {}
    for method, path, summary, req, resp in ROUTES:
        op: dict = {"summary": summary, "responses": {}}
        if req is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{req.__name__}"}}}}
        ok: dict = {"description": "OK"}
        if resp is not None:
            ok["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{resp.__name__}"}}}
            if "completions" in path:
                ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
        op["responses"]["200"] = ok
        if req is not None or path.startswith("/v1"):
            err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            op["responses"]["400"] = {"description": "Bad request", **err}
            op["responses"]["401"] = {"description": "Missing or wrong API key", **err}
            if req is not None and "completions" in path:
                op["responses"]["404"] = {"description": "Unknown model", **err}
                op["responses"]["429"] = {"description": "Queue full; retry after Retry-After seconds", **err}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Strata", "version": version, "description": "OpenAI-compatible LLM serving."},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
