"""The door of the HTTP API: request-size limit, in-flight accounting and graceful draining."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Awaitable, Callable


from bastion.admission.draining import Lifecycle
from bastion.errors import (APIError, InvalidRequestError, PayloadTooLargeError,
                            ServiceUnavailableError)

log = logging.getLogger("bastion.gatekeeper")
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# The API, and the dashboard's playground endpoint that serves through the same path.
GUARDED = ("/v1", "/dashboard/api/")
# A JSON \\uXXXX escape of a UTF-16 surrogate, with the backslashes before it (an even run
# of them is escaped backslashes, not an escape)
_SURROGATE = re.compile(rb"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})")


def lone_surrogate(body: bytes) -> bool:
    """Whether a JSON body escapes a UTF-16 surrogate that is not half of a pair: such text
    is not Unicode (it cannot be encoded as UTF-8, so no tokenizer, database or response can
    hold it). Raw bytes cannot carry one: they would not decode as UTF-8 at all."""
    if b"\\u" not in body:
        return False
    pending_high = -1  # the end of a high surrogate escape still waiting for its low half
    for m in _SURROGATE.finditer(body):
        if len(m.group(1)) % 2 == 0:
            continue  # "\\\\ud800": an escaped backslash, then plain text
        high = m.group(2)[1:2].lower() in b"89ab"
        if pending_high >= 0:
            if high or m.start(1) != pending_high or len(m.group(1)) != 1:
                return True  # a high one not followed at once by its low half
            pending_high = -1
            continue
        if not high:
            return True  # a low half with no high one before it
        pending_high = m.end()
    return pending_high >= 0


def _json_problem(body: bytes, headers: dict[bytes, bytes]) -> str | None:
    """What makes a body that FastAPI would parse as JSON (a JSON content type, or none) not
    JSON text of Unicode, which Python's parser would otherwise let through: another encoding
    than UTF-8 (it guesses UTF-16 and UTF-32 from NUL bytes, and then no check on the raw
    bytes holds), or a lone surrogate escape."""
    content_type = headers.get(b"content-type", b"application/json").lower()
    if b"json" not in content_type:
        return None
    if b"\x00" in body:
        return "JSON text is UTF-8 and holds no NUL byte (escape it as \\u0000 in a string)."
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"it is not UTF-8 (an invalid byte at offset {exc.start})."
    if lone_surrogate(body):
        return ("it holds a lone UTF-16 surrogate escape (such as \\ud800), which is not "
                "valid Unicode text.")
    return None


async def _reject(send: Send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(err, ServiceUnavailableError):
        headers += [(b"retry-after", b"5"), (b"retry-after-ms", b"5000")]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gatekeeper:
    """Pure ASGI middleware: refuses new API work while draining and bodies over the limit,
    before any JSON is parsed or any model time is spent."""

    def __init__(self, app: Callable[..., Awaitable[None]], lifecycle: Lifecycle,
                 max_body: int, upload_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.max_body = max_body
        self.upload_paths = upload_paths  # POSTs that stream to disk under their own limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED):
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            # no id or parameter holds a NUL, and PostgreSQL refuses one in any query
            await _reject(send, InvalidRequestError(
                "The URL holds a NUL character (%00), which no id or parameter may contain.",
                code="invalid_url"))
            return
        if self.lifecycle.draining:
            await _reject(send, ServiceUnavailableError(
                "The server is shutting down and accepts no new requests; retry on another replica."))
            return
        if scope["method"] == "POST" and scope["path"] in self.upload_paths:
            self.lifecycle.enter()
            try:
                await self.app(scope, receive, send)
            finally:
                self.lifecycle.leave()
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _reject(send, InvalidRequestError("Content-Length header is not a number."))
                return
            if int(length) > self.max_body:
                await _reject(send, self._too_large(int(length)))
                return
        body = bytearray()
        if scope["method"] in ("POST", "PUT", "PATCH"):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > self.max_body:
                    await _reject(send, self._too_large(len(body)))
                    return
                if not message.get("more_body"):
                    break
        if body and (problem := _json_problem(bytes(body), dict(scope["headers"]))):
            await _reject(send, InvalidRequestError(
                f"The request body could not be parsed as JSON: {problem}", code="invalid_json"))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        self.lifecycle.enter()
        try:
            await self.app(scope, replay, send)
        finally:
            self.lifecycle.leave()

    def _too_large(self, size: int) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"The request body is {size} bytes; the limit is {self.max_body} bytes.")
