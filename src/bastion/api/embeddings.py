"""POST /v1/embeddings: parse, admit, embed."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from bastion.api.deps import InferenceContext, ServicesDep
from bastion.http.idempotency import answer
from bastion.http.inference import unless_disconnected
from bastion.protocol.embeddings import EmbeddingList, EmbeddingRequest
from bastion.services.embeddings import create_embeddings
from bastion.services.inference import start_embeddings

router = APIRouter()


@router.post("/v1/embeddings", response_model=EmbeddingList)
async def create_embedding(body: EmbeddingRequest, ctx: InferenceContext,
                           services: ServicesDep, request: Request) -> EmbeddingList | Response:
    async def run() -> object:
        prep, ticket = await start_embeddings(services, ctx, body)
        result = await unless_disconnected(request, create_embeddings(prep, ticket))
        if isinstance(result, EmbeddingList):  # serialised once, in Rust, not validated again
            return Response(result.model_dump_json(), media_type="application/json")
        return result

    return await answer(request, services, ctx, run)
