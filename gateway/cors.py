"""Cross-origin requests: which web pages' scripts may call the API, under vLLM's flags (--allowed-origins,
--allowed-methods, --allowed-headers, --allow-credentials). No origin is allowed unless named: a server on a desktop
would otherwise answer every web page its user opens."""
from __future__ import annotations

import json
from dataclasses import dataclass

from aiohttp import web

PREFLIGHT_MAX_AGE_S = 600


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    origins: tuple[str, ...] = ()  # "*": any
    methods: tuple[str, ...] = ("*",)
    headers: tuple[str, ...] = ("*",)
    credentials: bool = False

    def __post_init__(self) -> None:
        if self.credentials and "*" in self.origins:
            raise ValueError("--allow-credentials with any origin (\"*\") would let every web page call the API with "
                             "its user's cookies; name the origins")

    def allows(self, origin: str) -> bool:
        return "*" in self.origins or origin in self.origins

    def origin_header(self, origin: str) -> str:
        # With credentials a browser takes only the origin itself, never "*".
        return "*" if "*" in self.origins and not self.credentials else origin


def parse_list(text: str | None, flag: str) -> tuple[str, ...]:
    """A flag's list, as a JSON list (vLLM's form: '["https://a.example"]') or comma-separated."""
    if text is None or not text.strip():
        return ()
    text = text.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            raise ValueError(f"{flag}: cannot read {text!r} as a JSON list of strings") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"{flag}: {text!r} must be a JSON list of strings")
        return tuple(items)
    return tuple(i.strip() for i in text.split(",") if i.strip())


def install(app: web.Application, policy: CorsPolicy) -> None:
    """Preflights answered before anything else runs (they carry no API key), and every answer to an allowed
    origin, streams included, marked as readable by it."""

    @web.middleware
    async def preflight(request: web.Request, handler):
        if request.method != "OPTIONS":
            return await handler(request)
        origin = request.headers.get("Origin")
        wanted = request.headers.get("Access-Control-Request-Method")
        if origin is None or wanted is None:  # a plain OPTIONS: what the path takes
            return web.Response(status=204, headers={"Allow": _allowed_methods(request)})
        if not policy.allows(origin) or not _method_allowed(policy, wanted):
            return web.Response(status=400, text="Disallowed CORS request", headers={"Vary": "Origin"})
        asked = request.headers.get("Access-Control-Request-Headers", "")
        headers = {
            "Access-Control-Allow-Origin": policy.origin_header(origin),
            "Access-Control-Allow-Methods": ", ".join(policy.methods) if "*" not in policy.methods
            else "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT",
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
            "Vary": "Origin",
        }
        allowed_headers = asked if "*" in policy.headers else ", ".join(policy.headers)
        if allowed_headers:
            headers["Access-Control-Allow-Headers"] = allowed_headers
        if policy.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return web.Response(status=200, headers=headers)

    async def mark(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is None or request.method == "OPTIONS" or not policy.origins:
            return
        response.headers.add("Vary", "Origin")  # the answer depends on it, allowed or not (caches keep them apart)
        if not policy.allows(origin):
            return
        response.headers["Access-Control-Allow-Origin"] = policy.origin_header(origin)
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
        if policy.credentials:
            response.headers["Access-Control-Allow-Credentials"] = "true"

    app.middlewares.insert(1, preflight)  # after request_started: a preflight is a request its connection counts
    app.on_response_prepare.append(mark)


def _method_allowed(policy: CorsPolicy, method: str) -> bool:
    return "*" in policy.methods or method.upper() in {m.upper() for m in policy.methods}


def _allowed_methods(request: web.Request) -> str:
    """The methods the request's path is served with."""
    methods = {"OPTIONS"}
    for route in request.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        if info.get("path") == request.path or ("pattern" in info and info["pattern"].fullmatch(request.path)):
            methods.add(route.method)
    return ", ".join(sorted(methods))
