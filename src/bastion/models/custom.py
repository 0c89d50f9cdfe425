"""Creating and deleting an organisation's own models, for the API and the dashboard alike:
checked, placed, loaded, then recorded, so whatever fails leaves nothing behind. The caller's
`audit` runs in the transaction that records the change (services/models.py writes the audit
event there)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from bastion.engines.base import ModelUnavailable
from bastion.models.org_models import OrgModels, fine_tuned_profile
from bastion.models.catalog import Catalog, Deployment
from bastion.models import quotas
from bastion.models.quotas import ModelQuota, Reservation
from bastion.config import Settings
from bastion.db.tables import CustomModel
from bastion.errors import (AuthorizationError, ConflictError, InvalidRequestError,
                            ServiceUnavailableError)
from bastion.files.upload import Upload
from bastion.models import uploads as service


async def create(upload: Upload, org_id: str, *, catalog: Catalog,
                 sessions: sessionmaker[Session], settings: Settings, org_models: OrgModels,
                 quota: ModelQuota, reservation: Reservation,
                 audit: Callable[[Session, CustomModel], None] | None = None) -> Deployment:
    """A received multipart upload (its temporary files are always discarded) to a served
    model of `org_id`, within the organisation's `quota`, of which the upload holds
    `reservation` (quotas.py): recorded as the model here, the caller's to release if this
    fails."""
    try:
        model_id, model_type = service.fields(upload)
        taken = catalog.taken(model_id) or catalog.has(model_id, org_id)
        if not taken:
            with sessions() as s:
                taken = service.find(s, org_id, model_id) is not None
        if taken:
            raise ConflictError(f"A model named '{model_id}' already exists; choose another "
                                f"model_id or delete that model first.", param="model_id",
                                code="model_exists")
        target = service.new_directory(settings.uploads_dir, org_id)
        placed = await run_in_threadpool(service.place, upload, target, settings)
    finally:
        upload.discard()
    lazy = None
    try:
        row = service.record(org_id, model_id, model_type, placed)
        lazy = org_models.uploaded(row, placed.cost)
        try:  # loaded before it is recorded, so a record is always servable (and its profile
            # saved: other replicas list it unloaded)
            await run_in_threadpool(org_models.residency.load_now, lazy)
        except ModelUnavailable as exc:  # the memory for uploads is all serving requests
            raise ServiceUnavailableError(exc.message, code=exc.code) from None
        except Exception as exc:
            raise InvalidRequestError(f"The model passed its checks but failed to load: {exc}",
                                      param="file", code="invalid_model") from None
        dep = Deployment(model_id, lazy, owned_by=org_id, org_id=org_id, source="uploaded")
        try:
            with sessions.begin() as s:
                quotas.record(s, reservation, quota, row)  # the claim becomes the model
                if audit is not None:
                    audit(s, row)
        except IntegrityError:
            raise ConflictError(f"A model named '{model_id}' was uploaded at the same time.",
                                param="model_id", code="model_exists") from None
    except BaseException:
        if lazy is not None:
            await run_in_threadpool(lazy.close)
        await run_in_threadpool(shutil.rmtree, placed.directory, True)
        raise
    await org_models.adopt(dep)
    return dep


async def delete(dep: Deployment, org_id: str, *, sessions: sessionmaker[Session],
                 org_models: OrgModels,
                 audit: Callable[[Session], None] | None = None) -> None:
    """An uploaded or fine-tuned model of the caller's organisation; the server's own models
    are configuration, not the organisation's to delete."""
    if dep.source == "configured":
        raise AuthorizationError(f"The model '{dep.id}' is configured by the server "
                                 f"administrator and cannot be deleted through the API.",
                                 code="model_not_deletable")
    remove = service.delete_uploaded if dep.source == "uploaded" else service.delete_fine_tuned
    with sessions.begin() as s:
        path = remove(s, org_id, dep.id)
        if audit is not None:
            audit(s)
    await org_models.sync()  # out of the catalog now; closed when idle
    if path is not None:  # served from memory or a mapping, so the files can go at once
        await run_in_threadpool(_remove, path)
        if dep.source == "fine-tuned":
            await run_in_threadpool(_remove, fine_tuned_profile(path))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
