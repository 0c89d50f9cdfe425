"""An inference request's HTTP answer, the same for /v1 and the playground: admitted through
the gate (services/inference.py), then a JSON body (cancelled if the client goes away first)
or an SSE stream whose errors, once the first byte is out, travel inside it."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from bastion.admission.gate import RequestContext
from bastion.admission.limiter import Ticket
from bastion.http.idempotency import answer
from bastion.services.common import error_payload
from bastion.services.context import Services

T = TypeVar("T")


async def respond(request: Request, services: Services, ctx: RequestContext, *, stream: bool,
                  start: Callable[[], Awaitable[tuple[Any, Ticket]]],
                  open_stream: Callable[[Any, Ticket], Awaitable[AsyncIterator[dict[str, Any]]]],
                  complete: Callable[[Any, Ticket], Awaitable[Any]],
                  frame: Callable[[AsyncIterator[Any]], AsyncIterator[bytes]] | None = None
                  ) -> Any:
    """`frame` turns the stream's chunks into bytes: `sse` unless given (`typed_sse`)."""
    async def run() -> Any:
        prep, ticket = await start()
        if stream:
            return StreamingResponse((frame or sse)(await open_stream(prep, ticket)),
                                     media_type="text/event-stream")
        return await unless_disconnected(request, complete(prep, ticket))

    return await answer(request, services, ctx, run)


async def sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Frame chunks as server-sent events; once bytes are out, errors travel in the stream."""
    try:
        async for chunk in chunks:
            yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
    except Exception as exc:  # once the first byte is out, every error travels in the stream
        yield b"data: " + json.dumps(error_payload(exc)).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


async def typed_sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Frame typed events (the Responses API's) as server-sent events with `event:` lines and
    no [DONE]; the events carry their own errors, so only the unforeseen is caught here."""
    seq = 0
    try:
        async for ev in events:
            seq = ev.get("sequence_number", seq) + 1
            yield (f"event: {ev['type']}\ndata: ".encode()
                   + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n")
    except Exception as exc:
        err = error_payload(exc)["error"]
        ev = {"type": "error", "sequence_number": seq, "code": err.get("code"),
              "message": err.get("message"), "param": err.get("param")}
        yield b"event: error\ndata: " + json.dumps(ev).encode() + b"\n\n"


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Run work, but cancel it (and so its generation) if the client goes away first; the
    client is gone then, so the 499 it gets is for the access log only."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        # let the cancelled work unwind first, so its usage is settled as "cancelled"
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=499)
    return task.result()


