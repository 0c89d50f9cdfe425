"""POST /v1/completions (legacy): parse, call, return."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from bastion.api.deps import InferenceContext, ServicesDep
from bastion.http.inference import respond
from bastion.protocol.completions import Completion, CompletionRequest
from bastion.services.completions import complete, open_completion_stream
from bastion.services.inference import start_completion

router = APIRouter()


@router.post("/v1/completions", response_model=Completion)
async def create_completion(body: CompletionRequest, ctx: InferenceContext,
                            services: ServicesDep,
                            request: Request) -> Completion | StreamingResponse:
    return await respond(request, services, ctx, stream=bool(body.stream),
                         start=lambda: start_completion(services, ctx, body), open_stream=open_completion_stream,
                         complete=complete)
