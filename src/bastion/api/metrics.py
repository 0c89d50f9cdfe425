"""GET /metrics: Prometheus's text format, for the server administrator's key or the metrics
token (services/metrics.py says why)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from bastion.api.deps import ServicesDep, bearer_token
from bastion.services.metrics import authorize_scrape, scrape

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, services: ServicesDep) -> Response:
    await authorize_scrape(services, bearer_token(request))
    body, content_type = await scrape(services)
    return Response(body, media_type=content_type)
