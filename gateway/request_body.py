"""Reading a request body into its pydantic model, bounded in size and time, every failure a 4xx."""
from __future__ import annotations

import asyncio

from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.errors import APIError, bad_request
from gateway.limits import ServerLimits


async def read_model(request: web.Request, model: type[BaseModel], limits: ServerLimits):
    """The body as `model`. A body over the limit gets 413: at once where Content-Length announces it, else from
    aiohttp as it reads (the app's client_max_size). What is left unread aiohttp drains before it closes."""
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise APIError(413, f"the request body is {request.content_length} bytes; this server takes at most "
                            f"{limits.max_body_bytes}", code="request_too_large")
    timeout_s = limits.body_timeout_s
    ctype = request.headers.get("Content-Type", "")
    if not ctype.split(";")[0].strip().lower() == "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                       code="unsupported_media_type")
    try:
        raw = await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s",
                       code="request_timeout") from None
    try:
        # pydantic's own JSON parser: bounded nesting, and a lone UTF-16 surrogate is invalid JSON, not a string
        # that fails later inside the tokenizer.
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> APIError:
    err = _most_relevant(e.errors(include_url=False))
    if err["type"] == "json_invalid":
        why = err["ctx"]["error"] if "ctx" in err else err["msg"]
        if "hex escape" in why or "surrogate" in why:
            why += " (a lone UTF-16 surrogate such as \\ud800 is not a character)"
        return bad_request(f"the request body is not valid JSON: {why}", code="invalid_json")
    if err["type"] == "model_type" and not err["loc"]:
        return bad_request("the request body must be a JSON object", code="invalid_json")
    if err["type"] == "extra_forbidden":
        param = ".".join(str(x) for x in err["loc"])  # the client's own name for it, whatever it looks like
        return bad_request(f"unsupported field '{param}': this server does not implement it", param, "unsupported_field")
    loc = [x for x in err["loc"] if not (isinstance(x, str) and _is_union_tag(x))]
    param = str(loc[0]) if loc else None  # the request's own field; the message says where inside it
    where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
    return bad_request(f"invalid value for '{where}': {err['msg']}", param)


def _is_union_tag(part: str) -> bool:
    """pydantic names the member of a union an error is about by its type: str, list[str], constrained-int..."""
    return "[" in part or "-" in part or part in {"str", "int", "float", "bool", "list", "dict", "none"}


def _most_relevant(errors: list[dict]) -> dict:
    """Of a value that matches no member of its union, the error of the member that got furthest into it (the
    list whose first bad item comes latest), since that is the form the client meant."""
    first = errors[0]["loc"]
    k = next((i for i, x in enumerate(first) if isinstance(x, str) and _is_union_tag(x)), None)
    if k is None:
        return errors[0]
    branches: dict[str, list[dict]] = {}
    for err in errors:
        loc = err["loc"]
        if len(loc) > k and loc[:k] == first[:k] and isinstance(loc[k], str) and _is_union_tag(loc[k]):
            branches.setdefault(loc[k], []).append(err)

    def reach(errs: list[dict]) -> tuple[int, int]:
        idx = [err["loc"][k + 1] for err in errs if len(err["loc"]) > k + 1 and isinstance(err["loc"][k + 1], int)]
        type_only = all(err["type"].endswith("_type") for err in errs)
        return (min(idx) if idx else -1, 0 if type_only else 1)

    return max(branches.values(), key=reach)[0]
