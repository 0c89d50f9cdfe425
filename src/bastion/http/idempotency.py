"""An inference route's answer under an Idempotency-Key (services/idempotency.py): replayed
when stored, recorded when it completes (a JSON body, or a whole SSE stream that ended without
an error event), abandoned otherwise."""

from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from bastion.admission.gate import RequestContext
from bastion.services import idempotency
from bastion.services.context import Services

REPLAYED = "idempotent-replayed"


async def answer(request: Request, services: Services, ctx: RequestContext,
                 run: Callable[[], Awaitable[Any]]) -> Any:
    key = request.headers.get("idempotency-key")
    if not key:
        return await run()
    org = ctx.principal.org_id
    digest = idempotency.digest(key, request.url.path, await request.body())
    stored = await idempotency.claim(services, org, digest)
    if stored is not None:
        return Response(stored.body, status_code=stored.status_code,
                        media_type=stored.content_type, headers={REPLAYED: "true"})

    async def give_up() -> None:
        with anyio.CancelScope(shield=True):
            await idempotency.abandon(services, org, digest)

    try:
        result = await run()
    except BaseException:
        await give_up()
        raise
    if isinstance(result, StreamingResponse):
        result.body_iterator = _recorded(result.body_iterator, services, org, digest, give_up)
        return result
    if isinstance(result, Response):
        if result.status_code != 200:  # the client went away (499): nothing to replay
            await give_up()
            return result
        body = bytes(result.body)
    elif isinstance(result, BaseModel):
        body = result.model_dump_json().encode()
    else:
        await give_up()
        return result
    await idempotency.finish(services, org, digest,
                             idempotency.Stored(200, "application/json", body))
    return Response(body, media_type="application/json")


async def _recorded(chunks: AsyncIterator[Any], services: Services, org: str, digest: str,
                    give_up: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
    sent: list[bytes] = []
    complete = False
    try:
        async for chunk in chunks:
            data = chunk if isinstance(chunk, bytes) else str(chunk).encode()
            sent.append(data)
            yield data
        complete = not any(c.startswith((b'data: {"error"', b"event: error")) for c in sent)
    finally:
        with anyio.CancelScope(shield=True):
            if complete:
                await idempotency.finish(services, org, digest, idempotency.Stored(
                    200, "text/event-stream; charset=utf-8", b"".join(sent)))
            else:
                await give_up()
