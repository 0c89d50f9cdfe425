"""Where a request comes from, for the audit log: the client's address (as uvicorn reports it:
behind a trusted proxy, the address the proxy forwarded), its User-Agent, the request id, and
whether it came through the dashboard (a session) or the API (a key). Pure ASGI; the value
lives in tenancy.audit's contextvar for as long as the request runs."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from bastion.http import request_id
from bastion.tenancy.audit import Origin, origin

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
DASHBOARD = "/dashboard"


def origin_of(scope: Scope) -> Origin:
    client = scope.get("client")
    agent = next((v.decode("latin-1") for k, v in scope.get("headers", [])
                  if k == b"user-agent"), None)
    path = scope.get("path", "")
    via = "session" if path == DASHBOARD or path.startswith(DASHBOARD + "/") else "api_key"
    return Origin(via=via, ip_address=client[0] if client else None, user_agent=agent,
                  request_id=request_id.current.get())


class ClientOrigin:
    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = origin.set(origin_of(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            origin.reset(token)
