"""Connections: how many may be open, and how long a client may take to send a request's head.

aiohttp bounds neither. A client that drips a header a byte a second, or opens connections and
sends nothing, would hold them forever; here each connection has until `header_timeout_s` after
it opens (or after the first byte of its next request) to finish a request head, and connections
past `max_connections` are answered 503 and closed. Errors aiohttp answers itself (a malformed
request line, headers too long) carry an OpenAI error body like every other error. The body's
own time bound is applied where it is read (gateway.request_body).
"""
from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.errors import APIError
from gateway.limits import ServerLimits

KEEPALIVE_TIMEOUT_S = 75.0  # an idle keep-alive connection is closed after this long
REFUSED_LINGER_S = 2.0  # a refused connection is closed this long after its answer


def raw_error(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response, for a connection that never reaches the app."""
    body = json.dumps(APIError(status, message, code=code).body()).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class ConnectionGuard:
    """Counts the open connections of one listening socket."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.open = 0
        self.refused = 0
        self.timed_out = 0


class GuardedRequestHandler(RequestHandler):
    __slots__ = ("_guard", "_head_timer", "_in_request", "_counted", "_last_response", "_refused")

    def __init__(self, manager, guard: ConnectionGuard, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._counted = False
        self._last_response = False  # the response sent closes the connection: what still comes is not a request
        self._refused = False  # answered by the guard itself; what the client sends is discarded

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        guard = self._guard
        if guard.open >= guard.limits.max_connections:
            guard.refused += 1
            self._refuse(raw_error(503, f"the server has {guard.open} connections open, its limit; retry later",
                                   "too_many_connections"))
            return
        guard.open += 1
        self._counted = True
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._guard.open -= 1
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if data and not self._in_request and not self._last_response and self._head_timer is None:
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)

    # ---- called by the app's middleware around each request (request_started) ----------------
    def begin_request(self) -> None:
        self._in_request = True
        self._disarm()

    def end_request(self, keep_alive: bool) -> None:
        self._in_request = False
        self._last_response = not keep_alive

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's own answer to a request it could not parse, as an OpenAI error."""
        super().handle_error(request, status, exc, message)  # logs, and raises once a response has begun
        text = f"{HTTPStatus(status).phrase}: {message}" if status < 500 and message else HTTPStatus(status).phrase
        resp = APIError(status, text, code="malformed_request" if status < 500 else "internal_error").response()
        resp.force_close()
        return resp

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self._guard.limits.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if self._in_request or transport is None or transport.is_closing():
            return
        self._guard.timed_out += 1
        limit = self._guard.limits.header_timeout_s
        self._refuse(raw_error(408, f"the request head did not arrive within {limit:g} s", "request_timeout"))

    def _refuse(self, response: bytes) -> None:
        """Answer and close. Closing over unread bytes would reset the connection before the client reads the
        answer, so the write side is shut first and what still arrives is read and dropped for a moment."""
        transport = self.transport
        self._refused = True
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)


@web.middleware
async def request_started(request: web.Request, handler):
    """Stops the connection's head timer while its request is handled (a long stream is no slow client)."""
    protocol = request.protocol
    if not isinstance(protocol, GuardedRequestHandler):
        return await handler(request)
    protocol.begin_request()
    keep_alive = False
    try:
        resp = await handler(request)
        keep_alive = resp.keep_alive is not False
        return resp
    finally:
        protocol.end_request(keep_alive)


async def listen(runner: web.AppRunner, host: str, port: int, limits: ServerLimits) -> asyncio.AbstractServer:
    """Serve runner's app on host:port through guarded connections; close the result before runner.cleanup()."""
    loop = asyncio.get_running_loop()
    guard = ConnectionGuard(limits)
    manager = runner.server

    def protocol() -> GuardedRequestHandler:
        return GuardedRequestHandler(manager, guard, loop=loop, access_log=None, keepalive_timeout=KEEPALIVE_TIMEOUT_S)

    return await loop.create_server(protocol, host, port)
