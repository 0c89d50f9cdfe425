"""POST /v1/embeddings: parse, admit, embed."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from bastion.api.deps import CatalogDep, InferenceKey, LimiterDep, admit
from bastion.protocol.embeddings import EmbeddingList, EmbeddingRequest
from bastion.services.common import unless_disconnected
from bastion.services.embeddings import create_embeddings, prepare_embeddings

router = APIRouter()


@router.post("/v1/embeddings", response_model=EmbeddingList)
async def create_embedding(body: EmbeddingRequest, key: InferenceKey, catalog: CatalogDep,
                           limiter: LimiterDep, request: Request) -> EmbeddingList | Response:
    prep = await prepare_embeddings(body, catalog.resolve(body.model, key.org_id), key, limiter)
    ticket = await admit(request, key, prep.prompt_tokens, model=prep.deployment.id,
                         response_id=prep.id)
    result = await unless_disconnected(request, create_embeddings(prep, ticket))
    if isinstance(result, EmbeddingList):  # serialised once, in Rust, and not validated again
        return Response(result.model_dump_json(), media_type="application/json")
    return result
