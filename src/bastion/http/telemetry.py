"""Every HTTP request counted and timed by method, route template and status, and (with JSON
logs) one log line about it (pure ASGI, the outermost middleware, so that the gatekeeper's own
answers count too). The route is the template (`/v1/files/{file_id}`), never the path, so the
series stay few; a path no route matched is `unmatched`."""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

from bastion.admission.gate import RequestContext
from bastion.http.admission import SCOPE_KEY
from bastion.telemetry.metrics import Metrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
access = logging.getLogger("bastion.access")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def request_fields(scope: Scope, method: str, route: str, status: int, seconds: float,
                   request_id: str | None) -> dict[str, Any]:
    """What one request's log line says: who (key and organisation ids, never the key), what,
    how it ended, what it cost and how long it took."""
    fields: dict[str, Any] = {"request_id": request_id, "method": method, "route": route,
                              "path": scope["path"], "status": status,
                              "duration_ms": _ms(seconds)}
    ctx: RequestContext | None = scope.get(SCOPE_KEY)
    if ctx is None:
        return fields
    fields.update(key_id=ctx.principal.key_id, org_id=ctx.principal.org_id)
    tickets = [t for t in ctx.tickets if t.timeline is not None]
    if tickets:
        first = tickets[0].timeline
        assert first is not None
        fields.update(model=first.model, outcome=tickets[0].status,
                      prompt_tokens=sum(t.prompt_tokens for t in tickets),
                      completion_tokens=sum(t.completion_tokens for t in tickets),
                      queue_and_prefill_ms=_ms(first.first_token - first.submitted)
                      if first.first_token is not None and first.submitted else None,
                      ttft_ms=_ms(first.first_token - first.arrived)
                      if first.first_token is not None else None)
    return fields


class RequestTelemetry:
    def __init__(self, app: Callable[..., Awaitable[None]], metrics: Metrics,
                 log_requests: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception before the response started
        request_id: str | None = None

        async def send_status(message: Message) -> None:
            nonlocal status, request_id
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-request-id":
                        request_id = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.http(method, route, status, seconds)
            if self.log_requests:
                fields = request_fields(scope, method, route, status, seconds, request_id)
                access.info("%s %s %d", method, scope["path"], status, extra=fields)
