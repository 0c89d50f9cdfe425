"""POST /v1/chat/completions: parse, call, return."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from bastion.api.deps import (CatalogDep, InferenceKey, LimiterDep, SettingsDep, admit,
                              resolve_model)
from bastion.protocol.chat import ChatCompletion, ChatCompletionRequest
from bastion.services.chat import complete_chat, open_chat_stream, prepare_chat
from bastion.services.common import sse, unless_disconnected

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(body: ChatCompletionRequest, key: InferenceKey,
                                 catalog: CatalogDep, settings: SettingsDep, limiter: LimiterDep,
                                 request: Request) -> ChatCompletion | StreamingResponse:
    deployment = await resolve_model(request, body.model, key)
    prep = await prepare_chat(body, deployment, settings, key, limiter)
    ticket = await admit(request, key, prep.estimate, model=prep.deployment.id, response_id=prep.id)
    if body.stream:
        return StreamingResponse(sse(await open_chat_stream(prep, ticket)),
                                 media_type="text/event-stream")
    return await unless_disconnected(request, complete_chat(prep, ticket))
