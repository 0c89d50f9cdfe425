"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request

from bastion.api.deps import CatalogDep, CurrentKey, resolve_model
from bastion.catalog.registry import Deployment
from bastion.protocol.models import ModelCard, ModelList

router = APIRouter()


def card(dep: Deployment) -> ModelCard:
    info = dep.engine.info
    return ModelCard(id=dep.id, created=info.created, owned_by=dep.owned_by,
                     context_length=info.context_length, parameters=info.parameters,
                     dimensions=info.dimensions,
                     capabilities=[k for k, on in asdict(dep.engine.capabilities).items() if on])


@router.get("/v1/models", response_model=ModelList)
async def list_models(key: CurrentKey, catalog: CatalogDep, request: Request) -> ModelList:
    await request.app.state.finetuned.sync()  # a model another worker has just finished
    return ModelList(data=[card(d) for d in catalog.visible(key.org_id)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, key: CurrentKey, request: Request) -> ModelCard:
    return card(await resolve_model(request, model_id, key))
