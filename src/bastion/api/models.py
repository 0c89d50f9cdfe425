"""/v1/models: list and retrieve; upload (multipart, as the spec's POST /v1/models) and delete
an organisation's own models."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from bastion.api.deps import CatalogDep, CurrentKey, SessionsDep, SettingsDep, require, resolve_model
from bastion.models.catalog import Deployment
from bastion.files.store import BlobStore
from bastion.files.upload import receive_upload
from bastion.protocol.models import ModelCard, ModelDeleted, ModelList
from bastion.tenancy.keys import Principal
from bastion.models import custom as lifecycle

router = APIRouter()
ModelsKey = Annotated[Principal, Depends(require("models"))]


def card(dep: Deployment) -> ModelCard:
    info = dep.engine.info
    return ModelCard(id=dep.id, created=info.created, owned_by=dep.owned_by,
                     context_length=info.context_length, parameters=info.parameters,
                     dimensions=info.dimensions,
                     capabilities=[k for k, on in asdict(dep.engine.capabilities).items() if on])


@router.get("/v1/models", response_model=ModelList)
async def list_models(key: CurrentKey, catalog: CatalogDep, request: Request) -> ModelList:
    await request.app.state.org_models.sync()  # a model another replica has just made
    return ModelList(data=[card(d) for d in catalog.visible(key.org_id)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, key: CurrentKey, request: Request) -> ModelCard:
    return card(await resolve_model(request, model_id, key))


@router.post("/v1/models", response_model=ModelCard)
async def upload_model(request: Request, key: ModelsKey, sessions: SessionsDep,
                       settings: SettingsDep, catalog: CatalogDep) -> ModelCard:
    upload = await receive_upload(request, BlobStore(settings.uploads_dir),
                                  settings.max_model_bytes)
    dep = await lifecycle.create(upload, key.org_id, catalog=catalog, sessions=sessions,
                                 settings=settings, org_models=request.app.state.org_models)
    return card(dep)


@router.delete("/v1/models/{model_id:path}", response_model=ModelDeleted)
async def delete_model(model_id: str, request: Request, key: ModelsKey,
                       sessions: SessionsDep) -> ModelDeleted:
    dep = await resolve_model(request, model_id, key)
    await lifecycle.delete(dep, key.org_id, sessions=sessions,
                           org_models=request.app.state.org_models)
    return ModelDeleted(id=dep.id)
