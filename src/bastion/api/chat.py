"""POST /v1/chat/completions: parse, call, return."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from bastion.api.deps import InferenceContext, ServicesDep
from bastion.http.inference import respond
from bastion.protocol.chat import ChatCompletion, ChatCompletionRequest
from bastion.services.chat import complete_chat, open_chat_stream
from bastion.services.inference import start_chat

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(body: ChatCompletionRequest, ctx: InferenceContext,
                                 services: ServicesDep,
                                 request: Request) -> ChatCompletion | StreamingResponse:
    return await respond(request, services, ctx, stream=bool(body.stream),
                         start=lambda: start_chat(services, ctx, body), open_stream=open_chat_stream,
                         complete=complete_chat)
