"""POST /v1/completions (legacy): parse, call, return."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from bastion.api.deps import (CatalogDep, InferenceKey, LimiterDep, SettingsDep, admit,
                              resolve_model)
from bastion.protocol.completions import Completion, CompletionRequest
from bastion.services.common import sse, unless_disconnected
from bastion.services.completions import complete, open_completion_stream, prepare_completion

router = APIRouter()


@router.post("/v1/completions", response_model=Completion)
async def create_completion(body: CompletionRequest, key: InferenceKey, catalog: CatalogDep,
                            settings: SettingsDep, limiter: LimiterDep,
                            request: Request) -> Completion | StreamingResponse:
    deployment = await resolve_model(request, body.model, key)
    prep = await prepare_completion(body, deployment, settings, key, limiter)
    ticket = await admit(request, key, prep.estimate, model=prep.deployment.id, response_id=prep.id)
    if body.stream:
        return StreamingResponse(sse(await open_completion_stream(prep, ticket)),
                                 media_type="text/event-stream")
    return await unless_disconnected(request, complete(prep, ticket))
