"""The model use cases, for /v1/models and the dashboard's Models page alike: what an
organisation can use (a model made on another replica is looked up before a 404), upload and
delete of its own models (the checks and placing live in models.custom), each audited in the
transaction that records it."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from bastion.db.tables import CustomModel
from bastion.errors import ModelNotFoundError, PayloadTooLargeError
from bastion.files.store import BlobStore
from bastion.files.upload import Upload, receive_upload
from bastion.models import custom, quotas
from bastion.models.catalog import Deployment
from bastion.protocol.models import ModelCard, ModelDeleted, ModelList, card
from bastion.services.context import Services
from bastion.tenancy import audit
from bastion.tenancy.keys import Principal


@dataclass(frozen=True)
class ModelEntry:
    """A model as a person choosing one sees it: its card, its other names, what it can be
    called for, and whether the organisation may delete it."""

    card: ModelCard
    aliases: list[str]
    uses: list[str]
    deletable: bool


async def refresh(services: Services) -> None:
    """Pick up models another replica has just uploaded or a worker has just fine-tuned."""
    await services.org_models.sync("listing")


async def resolve(services: Services, name: str, principal: Principal) -> Deployment:
    """The model `name` as this caller's organisation sees it; never another model. One made
    elsewhere a moment ago is looked up in the database before the 404 (rate-limited, and a
    full sync only when the database has it: see OrgModels.sync_for_miss)."""
    try:
        return services.catalog.resolve(name, principal.org_id)
    except ModelNotFoundError:
        pass
    await services.org_models.sync_for_miss(principal.org_id, name)
    return services.catalog.resolve(name, principal.org_id)


async def listing(services: Services, principal: Principal) -> ModelList:
    await refresh(services)
    return ModelList(data=[card(d) for d in services.catalog.visible(principal.org_id)])


async def retrieve(services: Services, principal: Principal, model_id: str) -> ModelCard:
    return card(await resolve(services, model_id, principal))


def upload_store(services: Services) -> BlobStore:
    """Where an upload's parts are streamed to: beside the models' final place, so that
    placing one is a rename."""
    return BlobStore(services.settings.uploads_dir)


def quota(services: Services, principal: Principal) -> quotas.ModelQuota:
    return quotas.ModelQuota.of(principal.limits, services.settings)


@dataclass
class Received:
    """A model upload whose body is on disk, holding its share of the organisation's model
    quota until it is recorded or discarded."""

    upload: Upload
    reservation: quotas.Reservation

    @property
    def fields(self) -> dict[str, str]:
        return self.upload.fields


def _reserve(services: Services, principal: Principal, want: int) -> quotas.Reservation:
    with services.sessions.begin() as s:
        return quotas.reserve(s, principal.org_id, quota(services, principal), want)


def _shrink(services: Services, reservation: quotas.Reservation, size: int) -> None:
    with services.sessions.begin() as s:
        quotas.shrink(s, reservation, size)


def _release_now(services: Services, reservation: quotas.Reservation) -> None:
    with services.sessions.begin() as s:
        quotas.release(s, reservation)


async def _release(services: Services, reservation: quotas.Reservation) -> None:
    """Even while the request is being cancelled: a claim left behind would hold a place in
    the quota until it lapses."""
    with anyio.CancelScope(shield=True):
        await run_in_threadpool(_release_now, services, reservation)


async def receive(services: Services, principal: Principal, request: Request) -> Received:
    """The multipart body of an upload, streamed to disk, once it has claimed one model and
    its Content-Length (or every byte left) of the organisation's quota: refused before a
    byte is read when the quota is full (also when another upload under way holds its last
    place), and cut off where its bytes run out (a 403 that says so) or at
    BASTION_MAX_MODEL_BYTES (a 413)."""
    limit = services.settings.max_model_bytes
    length = request.headers.get("content-length", "")
    want = min(int(length), limit) if length.isdigit() else limit
    reservation = await run_in_threadpool(_reserve, services, principal, want)
    try:
        try:
            upload = await receive_upload(request, upload_store(services),
                                          min(limit, reservation.bytes))
        except PayloadTooLargeError:
            if reservation.left < limit:
                raise quotas.over_bytes(quota(services, principal), reservation.left) from None
            raise
        try:
            await run_in_threadpool(_shrink, services, reservation,
                                    sum(f.size for f in upload.files.values()))
        except BaseException:
            upload.discard()
            raise
    except BaseException:
        await _release(services, reservation)
        raise
    return Received(upload, reservation)


async def discard(services: Services, received: Received) -> None:
    """An upload refused before it reached upload(): its files and its claim go."""
    received.upload.discard()
    await _release(services, received.reservation)


async def upload(services: Services, principal: Principal, received: Received) -> ModelCard:
    """A received multipart upload (its temporary files are always discarded, its claim on
    the quota recorded as the model or released) to a model served to the caller's
    organisation."""
    def audited(s: Session, row: CustomModel) -> None:
        audit.record(s, principal, "model.uploaded", principal.org_id, target_id=row.model_id,
                     details={"model_type": row.model_type, "format": row.format,
                              "bytes": row.bytes})

    try:
        dep = await custom.create(received.upload, principal.org_id, catalog=services.catalog,
                                  sessions=services.sessions, settings=services.settings,
                                  org_models=services.org_models,
                                  quota=quota(services, principal),
                                  reservation=received.reservation, audit=audited)
    except BaseException:
        await _release(services, received.reservation)
        raise
    return card(dep)


async def delete(services: Services, principal: Principal, model_id: str) -> ModelDeleted:
    """An uploaded or fine-tuned model of the caller's organisation; refused while a
    fine-tuning job still needs it, and for the server's configured models."""
    dep = await resolve(services, model_id, principal)

    def audited(s: Session) -> None:
        audit.record(s, principal, "model.deleted", principal.org_id, target_id=dep.id,
                     details={"source": dep.source})

    await custom.delete(dep, principal.org_id, sessions=services.sessions,
                        org_models=services.org_models, audit=audited)
    return ModelDeleted(id=dep.id)


def uses(dep: Deployment) -> list[str]:
    """What a model can be called for, from its engine's capability flags."""
    caps = dep.engine.capabilities
    return [name for name, on in (("chat", caps.chat), ("completions", caps.completion),
                                  ("embeddings", caps.embeddings), ("vision", caps.vision))
            if on]


def catalogue(services: Services, principal: Principal) -> list[ModelEntry]:
    """Every model the organisation can use, as the dashboard lists them."""
    catalog = services.catalog
    return [ModelEntry(card(d), catalog.aliases_of(d.id), uses(d), d.source != "configured")
            for d in catalog.visible(principal.org_id)]


def served(services: Services, principal: Principal, model_id: str) -> bool:
    """Whether `model_id` is in the catalogue for this organisation right now (by id)."""
    return any(d.id == model_id for d in services.catalog.visible(principal.org_id))
