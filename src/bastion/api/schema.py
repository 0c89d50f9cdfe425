"""GET /openapi.json: the API's OpenAPI document, for any caller with a valid key (the routes
are no secret, but the server answers an outsider nothing beyond /health and /ready). Every
error a route gives is OpenAI's error body, so the document says so, a `default` response, in
place of FastAPI's 422 (this server answers a validation error with a 400)."""

from __future__ import annotations

import warnings
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from bastion.api.deps import CurrentKey

router = APIRouter()

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "code", "param"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "code": {"type": ["string", "null"]},
                       "param": {"type": ["string", "null"]}}}}}
# Routes that answer `stream: true` with server-sent events instead of their JSON object
STREAMED = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def document(app: FastAPI) -> dict[str, Any]:
    """The document, built once per app (the routes do not change while it runs)."""
    cached: dict[str, Any] | None = getattr(app.state, "openapi_document", None)
    if cached is not None:
        return cached
    with warnings.catch_warnings():  # the aliases (/v1/fine-tuning/...) share operation ids
        warnings.simplefilter("ignore")
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                          description="Bastion's OpenAI-compatible API. Send an API key as "
                                      "'Authorization: Bearer ...'.")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    error = {"description": "An error, as OpenAI's error body.",
             "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    seen: set[str] = set()
    for path, operations in doc.get("paths", {}).items():
        for op in operations.values():
            if op.get("operationId") in seen:  # an alias's: made unique by its path
                op["operationId"] += "_" + "".join(c if c.isalnum() else "_" for c in path)
            seen.add(op.get("operationId", ""))
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            responses["default"] = error
            if path in STREAMED and "200" in responses:
                responses["200"].setdefault("content", {})["text/event-stream"] = {
                    "schema": {"type": "string"}}
    app.state.openapi_document = doc
    return doc


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, key: CurrentKey) -> JSONResponse:
    return JSONResponse(document(request.app))
