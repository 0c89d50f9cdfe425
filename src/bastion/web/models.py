"""Models: what this organisation can use, from the catalog, as GET /v1/models lists them."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from bastion.api.models import card
from bastion.catalog.registry import Deployment
from bastion.web.deps import CurrentViewer
from bastion.web.render import PageRoute, render

router = APIRouter(route_class=PageRoute)


@router.get("/dashboard/models", include_in_schema=False)
def models_page(request: Request, viewer: CurrentViewer) -> Response:
    catalog = request.app.state.catalog
    models = [(card(d), catalog.aliases_of(d.id), uses(d))
              for d in catalog.visible(viewer.principal.org_id)]
    return render(request, "models.html", page="models", models=models)


def uses(dep: Deployment) -> list[str]:
    """What a model can be called for, from its engine's capability flags."""
    caps = dep.engine.capabilities
    return [name for name, on in (("chat", caps.chat), ("completions", caps.completion),
                                  ("embeddings", caps.embeddings), ("vision", caps.vision))
            if on]
