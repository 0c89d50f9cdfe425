"""The API at the root as well as under /v1 (`base_url="http://host"`, `POST /chat/completions`,
as LiteLLM and llama.cpp's server accept): a path whose first segment names an API resource
is handed on as `/v1` + path, before anything else sees it.

A rewrite rather than each router mounted twice: one route table (a second copy would double
the routes every request is matched against, and every route in the OpenAPI schema), and the
rate limits, the ledger's endpoint and the errors see one path whichever spelling was used.
The resources are read from the API routers' own `/v1/...` routes, so a new one is served at
the root with no change here. The dashboard lives under /dashboard and /health is not under /v1: no
root API path can shadow them, and an API resource would win over a root page of the same
name, were one ever added."""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Iterable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
PREFIX = "/v1"


def api_resources(paths: Iterable[str]) -> frozenset[str]:
    """'/v1/chat/completions', '/v1/ws', ... -> {'chat', 'ws', ...}."""
    out = set()
    for path in paths:
        if path.startswith(PREFIX + "/"):
            first = path[len(PREFIX) + 1:].split("/", 1)[0]
            if first and "{" not in first:
                out.add(first)
    return frozenset(out)


class RootPaths:
    def __init__(self, app: Callable[..., Awaitable[None]], resources: frozenset[str]) -> None:
        self.app = app
        self.resources = resources  # api_resources() of the API's routers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            first = path[1:].split("/", 1)[0]
            if first and not path.startswith(PREFIX + "/") and first in self.resources:
                raw = scope.get("raw_path")
                scope = {**scope, "path": PREFIX + path,
                         "raw_path": PREFIX.encode() + raw if raw else None}
        await self.app(scope, receive, send)
