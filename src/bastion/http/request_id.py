"""x-request-id on every response, and in every log line written while the request runs.

A client's own id is echoed when it is sane (printable ASCII without spaces, at most 128
characters: it ends up in log lines, so nothing that could forge one); otherwise the server
makes one, `req_` and 32 hex digits, as OpenAI's look. Pure ASGI, so streams pass through
unbuffered; the id lives in a contextvar that the tasks a request starts inherit."""

from __future__ import annotations

import logging
import re
import secrets
import time
from contextvars import ContextVar
from typing import Any, Awaitable, Callable

from bastion.errors import APIError, error_response
from bastion.telemetry.logs import configure

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HEADER = b"x-request-id"
MAX_LENGTH = 128
_SANE = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_LENGTH)

current: ContextVar[str] = ContextVar("bastion_request_id", default="-")
access = logging.getLogger("bastion.access")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(16)


def choose(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's x-request-id if it is sane, else a new one."""
    for name, value in headers:
        if name == HEADER:  # ASGI servers give header names in lower case
            return value.decode("ascii") if _SANE.fullmatch(value) else new_request_id()
    return new_request_id()


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` (`-` outside a request) for the formatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current.get()
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str, fmt: str = "text") -> None:
    """The root handler (text or JSON: telemetry/logs.py), each line naming its request."""
    configure(level, fmt, text_format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


class RequestId:
    """The outermost middleware: sets the id, adds the header to the response (HTTP) or to
    the handshake's acceptance (WebSocket), and writes one access line per request when it
    ends: method, path, status, seconds."""

    def __init__(self, app: Callable[..., Awaitable[None]], access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rid = choose(scope["headers"])
        token = current.set(rid)
        header = (HEADER, rid.encode())
        status = 0
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] in ("http.response.start", "websocket.accept"):
                status = message.get("status", 101)
                headers = [h for h in message.get("headers", []) if h[0].lower() != HEADER]
                message = {**message, "headers": [*headers, header]}
            elif message["type"] == "websocket.close" and not status:
                status = 403  # refused before the handshake completed
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Starlette's last-resort 500 is sent outside this middleware, without the id
            if status or scope["type"] != "http":
                raise
            logging.getLogger("bastion").exception("unhandled error")
            await error_response(APIError("The server had an error while processing your "
                                          "request."))(scope, receive, send_with_id)
        finally:
            if self.access_log:
                access.info("%s %s %d %.3fs", scope.get("method", "WS"), scope["path"],
                            status, time.perf_counter() - started)
            current.reset(token)
