"""The admission gate's HTTP binding (pure ASGI, one per app): the request's RequestContext is
kept in its scope, and at the edges of the response the gate runs its transport-side steps:
before the first byte a GET counted meanwhile may become its 429, a deferred count is made and
the rate-limit headers are added; after the last byte (Redis) releases are written, before the
server can read the client's next request; and whatever happened, `Gate.close` settles what
the route could not."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi import Request

from bastion.admission.gate import Counting, Gate, RequestContext
from bastion.errors import error_response
from bastion.services.context import Services
from bastion.tenancy.keys import Principal

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
SCOPE_KEY = "bastion.admission"


def bind(scope: Scope, ctx: RequestContext) -> None:
    """Attach a request's context where its binding finds it (at most one per request)."""
    scope[SCOPE_KEY] = ctx


async def enter(request: Request, services: Services, principal: Principal, *,
                inference: bool) -> RequestContext:
    """The request through the gate's first step, bound to the request for its binding. A GET
    or HEAD (no side effects) runs while its count is on its way (with Redis, the round trip
    overlaps the route); its response waits for it and becomes the 429 if the key was over its
    rate. Everything else is counted before the route runs, so that a key over its limits is
    refused before any expensive work."""
    counting: Counting = "meanwhile" if request.method in ("GET", "HEAD") else "now"
    ctx = await services.gate.enter(principal, endpoint=request.url.path, counting=counting,
                                    inference=inference,
                                    after_response=services.limiter.remote)
    bind(request.scope, ctx)
    return ctx


class AdmissionBinding:
    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = False  # the route's response was replaced by the count's refusal

        async def send_with_limits(message: Message) -> None:
            nonlocal refused
            if refused:
                return  # the rest of the route's response, which its refusal replaced
            ctx: RequestContext | None = scope.get(SCOPE_KEY)
            if ctx is not None and message["type"] == "http.response.start":
                gate: Gate = scope["app"].state.services.gate
                if (err := await gate.response_starts(ctx)) is not None:
                    refused = True
                    await error_response(err)(scope, receive, send)
                    return
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in gate.headers(ctx).items()
                         if k.lower().encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)
            if ctx is not None and message["type"] == "http.response.body" \
                    and not message.get("more_body"):
                await scope["app"].state.services.gate.release(ctx)  # after the last byte

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            ctx = scope.get(SCOPE_KEY)
            if ctx is not None:
                await scope["app"].state.services.gate.close(ctx)
