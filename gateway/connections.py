"""Connections: how many may be open, and how long a client may take to send a request or take an answer.

aiohttp bounds none of these. A client that drips a header a byte a second, opens connections and sends
nothing, or stops reading its answer would hold a connection forever. Here a connection has until
`header_timeout_s` after it opens (or after the first byte of its next request) to finish a request head,
a response whose client takes nothing for `write_timeout_s` is dropped, and past `max_connections` an idle
kept-alive connection makes room or, with none idle, the newcomer is answered 503 and closed. Errors aiohttp
answers itself (a malformed request line, headers too long) carry an OpenAI error body like every other
error. The body's own time bound is applied where it is read (gateway.request_body).
"""
from __future__ import annotations

import asyncio
import socket
import json
import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.errors import APIError
from gateway.limits import ServerLimits

log = logging.getLogger("strata.gateway")

KEEPALIVE_TIMEOUT_S = 75.0  # an idle keep-alive connection is closed after this long
REFUSED_LINGER_S = 2.0  # a refused connection is dropped this long after its answer
MAX_LINGERING = 64  # refused connections waiting out their linger; past this, more are dropped unanswered


def raw_error(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response, for a connection that never reaches the app."""
    body = json.dumps(APIError(status, message, code=code).body()).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class ConnectionGuard:
    """The connections of one listening socket: those admitted, and the refused ones still lingering."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.admitted: set[GuardedRequestHandler] = set()
        self.lingering = 0

    def make_room(self) -> bool:
        """At the limit, close one admitted connection that sits idle between requests; False if none does."""
        idle = next((h for h in self.admitted if h.idle), None)
        if idle is None:
            return False
        self.admitted.discard(idle)
        idle.close_idle()
        return True


class GuardedRequestHandler(RequestHandler):
    __slots__ = ("_guard", "_head_timer", "_write_timer", "_in_request", "_last_response", "_refused", "_raw")

    def __init__(self, manager, guard: ConnectionGuard, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._last_response = False  # the response sent closes the connection: what still comes is not a request
        # "new": refused on arrival and answered, never handed to aiohttp; "dropped": the same, unanswered (a flood);
        # "admitted": cut off after it was handed to aiohttp
        self._refused: str | None = None
        self._raw: asyncio.Transport | None = None

    # ---- the connection's life --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if len(guard.admitted) >= guard.limits.max_connections and not guard.make_room():
            self._raw = transport
            if guard.lingering >= MAX_LINGERING:
                self._refused = "dropped"
                transport.abort()  # a flood: no answer, no file descriptor held
                return
            self._refused = "new"
            guard.lingering += 1
            self._answer_and_drop(raw_error(503, f"the server has {len(guard.admitted)} connections open, its "
                                                 "limit; retry later", "too_many_connections"))
            return
        super().connection_made(transport)
        self._raw = transport
        guard.admitted.add(self)
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timers()
        if self._refused in ("new", "dropped"):
            if self._refused == "new":
                self._guard.lingering -= 1
            return  # aiohttp never saw it
        self._guard.admitted.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped, so that closing does not reset the connection over unread bytes
        if data and not self._in_request and not self._last_response and self._head_timer is None:
            self._arm_head_timer()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            loop = asyncio.get_running_loop()
            self._write_timer = loop.call_later(self._guard.limits.write_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    @property
    def idle(self) -> bool:
        """Between requests on a kept-alive connection, with nothing of the next one sent."""
        return (not self._in_request and not self._refused and self._head_timer is None and self._raw is not None
                and not self._raw.is_closing())

    def close_idle(self) -> None:
        self._raw.close()

    # ---- called by the app's middleware around each request (request_started) ----------------------
    def begin_request(self) -> None:
        self._in_request = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def end_request(self, keep_alive: bool) -> None:
        self._in_request = False
        self._last_response = not keep_alive

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's own answer to a request it could not parse, as an OpenAI error. A malformed request is the
        client's (one line in the log at debug level, so that hostile clients cannot flood it)."""
        if request.writer.output_size > 0:
            raise ConnectionError("a response has begun; another one cannot follow it")
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.debug("malformed request from %s: %s", request.remote, message)
        text = f"{HTTPStatus(status).phrase}: {message}" if status < 500 and message else HTTPStatus(status).phrase
        resp = APIError(status, text, code="malformed_request" if status < 500 else "internal_error").response()
        resp.force_close()
        return resp

    # ---- timers ---------------------------------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self._guard.limits.header_timeout_s, self._head_timed_out)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._write_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # A head that did arrive may wait, parsed, behind a response still being written: not a slow client.
        if self._in_request or self._refused or getattr(self, "_messages", None):
            return
        limit = self._guard.limits.header_timeout_s
        self._refused = "admitted"
        self._answer_and_drop(raw_error(408, f"the request head did not arrive within {limit:g} s",
                                        "request_timeout"))

    def _write_stalled(self) -> None:
        self._write_timer = None
        log.info("dropped a connection whose client took nothing for %g s", self._guard.limits.write_timeout_s)
        self._raw.abort()

    def _answer_and_drop(self, response: bytes) -> None:
        """Answer, shut the write side, read and drop what still comes for a moment, then drop the connection
        (abort: a client that does not read would hold a closing one open)."""
        transport = self._raw
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.abort)


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
        # A body left unread is drained by aiohttp and the connection closed: no next request comes.
        keep_alive = resp.keep_alive is not False and request.content.at_eof()
        return resp
    finally:
        protocol.end_request(keep_alive)


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the engine starts: the ports its stages and their links open
    meanwhile (chosen by the system) can then never be this one, and a port in use fails before a model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024)


async def listen(runner: web.AppRunner, sock: socket.socket, limits: ServerLimits) -> asyncio.AbstractServer:
    """Serve runner's app on the bound socket through guarded connections; close the result before
    runner.cleanup()."""
    loop = asyncio.get_running_loop()
    guard = ConnectionGuard(limits)
    manager = runner.server

    def protocol() -> GuardedRequestHandler:
        return GuardedRequestHandler(manager, guard, loop=loop, access_log=None, keepalive_timeout=KEEPALIVE_TIMEOUT_S)

    return await loop.create_server(protocol, sock=sock)
