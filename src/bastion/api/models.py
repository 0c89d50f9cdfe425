"""/v1/models: list and retrieve; upload (multipart, as the spec's POST /v1/models) and delete
an organisation's own models."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from bastion.api.deps import CatalogDep, CurrentKey, SessionsDep, SettingsDep, require, resolve_model
from bastion.catalog.registry import Deployment
from bastion.errors import AuthorizationError, ConflictError, InvalidRequestError
from bastion.files.store import BlobStore
from bastion.files.upload import receive_upload
from bastion.protocol.models import ModelCard, ModelDeleted, ModelList
from bastion.tenancy.keys import Principal
from bastion.uploads import service

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
    """Checked, placed, loaded, then recorded: whatever fails, nothing is left behind."""
    store = BlobStore(settings.uploads_dir)
    upload = await receive_upload(request, store, settings.max_model_bytes)
    try:
        model_id, model_type = service.fields(upload)
        taken = catalog.taken(model_id) or catalog.has(model_id, key.org_id)
        if not taken:
            with sessions() as s:
                taken = service.find(s, key.org_id, model_id) is not None
        if taken:
            raise ConflictError(f"A model named '{model_id}' already exists; choose another "
                                f"model_id or delete that model first.", param="model_id",
                                code="model_exists")
        target = service.new_directory(settings.uploads_dir, key.org_id)
        placed = await run_in_threadpool(service.place, upload, target)
    finally:
        upload.discard()
    try:
        row = service.record(key.org_id, model_id, model_type, placed)
        try:  # loaded before it is recorded, so a record is always servable
            dep = await run_in_threadpool(request.app.state.org_models.load, row)
        except Exception as exc:
            raise InvalidRequestError(f"The model passed its checks but failed to load: {exc}",
                                      param="file", code="invalid_model") from None
        try:
            with sessions.begin() as s:
                s.add(row)
        except IntegrityError:
            await run_in_threadpool(dep.engine.close)
            raise ConflictError(f"A model named '{model_id}' was uploaded at the same time.",
                                param="model_id", code="model_exists") from None
    except BaseException:
        await run_in_threadpool(shutil.rmtree, placed.directory, True)
        raise
    await request.app.state.org_models.adopt(dep)
    return card(dep)


@router.delete("/v1/models/{model_id:path}", response_model=ModelDeleted)
async def delete_model(model_id: str, request: Request, key: ModelsKey,
                       sessions: SessionsDep) -> ModelDeleted:
    """An uploaded or fine-tuned model of the caller's organisation; the server's own models
    are configuration, not the organisation's to delete."""
    dep = await resolve_model(request, model_id, key)
    if dep.source == "configured":
        raise AuthorizationError(f"The model '{dep.id}' is configured by the server "
                                 f"administrator and cannot be deleted through the API.",
                                 code="model_not_deletable")
    remove = service.delete_uploaded if dep.source == "uploaded" else service.delete_fine_tuned
    with sessions.begin() as s:
        path = remove(s, key.org_id, dep.id)
    await request.app.state.org_models.sync()  # out of the catalog now; closed when idle
    if path is not None:  # served from memory or a mapping, so the files can go at once
        await run_in_threadpool(_remove, path)
    return ModelDeleted(id=dep.id)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
