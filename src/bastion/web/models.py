"""Models: what this organisation can use, from the catalog, as GET /v1/models lists them."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from bastion.api.models import card
from bastion.web.deps import CurrentViewer
from bastion.web.render import PageRoute, render

router = APIRouter(route_class=PageRoute)


@router.get("/dashboard/models", include_in_schema=False)
def models_page(request: Request, viewer: CurrentViewer) -> Response:
    catalog = request.app.state.catalog
    models = [(card(d), catalog.aliases_of(d.id)) for d in catalog.all()]
    return render(request, "models.html", page="models", models=models)
