"""/v1/models: list and retrieve; upload (multipart, as the spec's POST /v1/models) and delete
an organisation's own models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from bastion.api.deps import CurrentKey, ServicesDep, require
from bastion.protocol.models import ModelCard, ModelDeleted, ModelList
from bastion.services import models
from bastion.tenancy.keys import Principal

router = APIRouter()
ModelsKey = Annotated[Principal, Depends(require("models"))]


@router.get("/v1/models", response_model=ModelList)
async def list_models(key: CurrentKey, services: ServicesDep) -> ModelList:
    return await models.listing(services, key)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, key: CurrentKey, services: ServicesDep) -> ModelCard:
    return await models.retrieve(services, key, model_id)


@router.post("/v1/models", response_model=ModelCard)
async def upload_model(request: Request, key: ModelsKey, services: ServicesDep) -> ModelCard:
    received = await models.receive(services, key, request)
    return await models.upload(services, key, received)


@router.delete("/v1/models/{model_id:path}", response_model=ModelDeleted)
async def delete_model(model_id: str, key: ModelsKey, services: ServicesDep) -> ModelDeleted:
    return await models.delete(services, key, model_id)
