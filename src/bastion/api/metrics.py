"""GET /metrics: Prometheus's text format, for the server administrator's key or the metrics
token (services/metrics.py says why)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from bastion.api.deps import ServicesDep, bearer_token
from bastion.services.metrics import authorize_scrape, scrape

router = APIRouter()


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus's text exposition format.",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request, services: ServicesDep) -> Response:
    await authorize_scrape(services, bearer_token(request))
    body, content_type = await scrape(services)
    return Response(body, media_type=content_type)
