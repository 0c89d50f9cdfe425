"""The door of the HTTP API: request-size limit, in-flight accounting and graceful draining."""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable


from bastion.admission.draining import Lifecycle
from bastion.http.json_text import json_problem
from bastion.errors import (APIError, InvalidRequestError, PayloadTooLargeError,
                            ServiceUnavailableError)

log = logging.getLogger("bastion.gatekeeper")
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# The API, and the dashboard's playground endpoint that serves through the same path.
GUARDED = ("/v1", "/dashboard/api/")


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
        if body and (problem := json_problem(bytes(body), dict(scope["headers"]), scope["path"])):
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
