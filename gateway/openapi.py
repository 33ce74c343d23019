"""The OpenAPI document of every route, built from the pydantic models."""
from __future__ import annotations

import re

from pydantic.json_schema import models_json_schema

from gateway import protocol as p

ROUTES = [
    ("post", "/v1/completions", "Create a completion", p.CompletionRequest, p.CompletionResponse),
    ("post", "/v1/chat/completions", "Create a chat completion", p.ChatCompletionRequest, p.ChatCompletionResponse),
    ("post", "/v1/responses", "Create a response", p.ResponsesRequest, p.ResponseObject),
    ("get", "/v1/models", "List the served models", None, p.ModelList),
    ("get", "/v1/models/{model}", "One served model", None, p.ModelCard),
    ("post", "/tokenize", "Tokenize a prompt or chat", p.TokenizeRequest, p.TokenizeResponse),
    ("post", "/detokenize", "Turn token ids into text", p.DetokenizeRequest, p.DetokenizeResponse),
    ("get", "/health", "Liveness and readiness", None, None),
    ("get", "/version", "Server version", None, None),
    ("get", "/metrics", "Prometheus metrics (text format)", None, None),
    ("get", "/openapi.json", "This document", None, None),
    ("get", "/docs", "This document, rendered for people", None, None),
]


SSE_BODY = ("Server-sent events: each `data: {chunk}` line holds one chunk object, a stream ends with "
            "`data: [DONE]`, and an error mid-stream arrives as `data: {\"error\": {...}}` before it. /v1/responses "
            "streams typed events instead (`event: response.output_text.delta` and its `data: {...}`), from "
            "response.created to response.completed (or response.incomplete), and an error as `event: error`.")
ERRORS = {
    400: "Bad request: the body, a field or a value the server cannot take",
    401: "Missing or wrong API key",
    404: "Unknown model",
    408: "The request's head or body did not arrive in time",
    413: "The request body is larger than the server takes",
    415: "The body is not application/json",
    429: "Queue full; retry after Retry-After seconds",
    503: "The server is shutting down, or its engine has failed",
}


def openapi_document(version: str) -> dict:
    models = {m for _, _, _, req, resp in ROUTES for m in (req, resp) if m is not None} | {p.ErrorResponse}
    _, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                 ref_template="#/components/schemas/{model}")
    paths: dict = {}
    error_body = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for method, path, summary, req, resp in ROUTES:
        op: dict = {"summary": summary, "responses": {}}
        if req is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{req.__name__}"}}}}
        ok: dict = {"description": "OK"}
        if resp is not None:
            ok["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{resp.__name__}"}}}
            if "completions" in path or "responses" in path:
                # With "stream": true: server-sent events, `data: {chunk JSON}` each, then `data: [DONE]`.
                ok["content"]["text/event-stream"] = {"schema": {"type": "string", "description": SSE_BODY}}
        op["responses"]["200"] = ok
        names = re.findall(r"{(\w+)}", path)
        if names:
            op["parameters"] = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]
        if req is not None or path.startswith("/v1"):
            generates = "completions" in path or "responses" in path
            for status, why in ERRORS.items():
                if status == 404 and not (generates or names) or status in (429, 503) and not generates:
                    continue
                if status in (408, 413, 415) and req is None:
                    continue
                op["responses"][str(status)] = {"description": why, **error_body}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Strata", "version": version, "description": "OpenAI-compatible LLM serving."},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
