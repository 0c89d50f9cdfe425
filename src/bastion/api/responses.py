"""/v1/responses: create (JSON or typed SSE events), retrieve, delete, list input items."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bastion.api.deps import InferenceContext, ServicesDep, require
from bastion.http.inference import respond, typed_sse
from bastion.protocol.responses import ResponseCreateRequest, deleted
from bastion.services import responses
from bastion.tenancy.keys import Principal

router = APIRouter()
InferenceKey = Annotated[Principal, Depends(require("inference"))]


@router.post("/v1/responses", response_model=None)
async def create_response(body: ResponseCreateRequest, ctx: InferenceContext,
                          services: ServicesDep,
                          request: Request) -> JSONResponse | StreamingResponse:
    async def complete(prep: Any, ticket: Any) -> JSONResponse:
        return JSONResponse(await responses.complete_response(services, prep, ticket))

    async def open_stream(prep: Any, ticket: Any) -> Any:
        return await responses.open_response_stream(services, prep, ticket)

    return await respond(request, services, ctx, stream=body.stream,
                         start=lambda: responses.start_response(services, ctx, body),
                         open_stream=open_stream, complete=complete, frame=typed_sse)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, key: InferenceKey,
                            services: ServicesDep) -> dict[str, Any]:
    return await responses.retrieve(services, key.org_id, response_id)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, key: InferenceKey,
                          services: ServicesDep) -> dict[str, Any]:
    await responses.delete(services, key.org_id, response_id)
    return deleted(response_id)


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, key: InferenceKey, services: ServicesDep,
                           after: str | None = None, before: str | None = None,
                           limit: Annotated[int, Query()] = 20,
                           order: Literal["asc", "desc"] = "desc",
                           include: Annotated[list[str] | None, Query()] = None
                           ) -> dict[str, Any]:
    return await responses.list_input_items(services, key.org_id, response_id, after=after,
                                             before=before, limit=limit, order=order)
