"""How many uploaded models, and how many bytes of them, an organisation may keep: the server's
BASTION_CUSTOM_MODELS_PER_ORG and BASTION_CUSTOM_MODEL_BYTES_PER_ORG, or less where the
organisation's plan says so (tenancy/plans.py).

An upload claims its share before its body is read: one model, and the bytes it may take (its
Content-Length, or every byte left when it sends none), as a reservation row counted like a
model. Claiming is one transaction that writes first and counts after: PostgreSQL locks the
organisation's row before anything else, SQLite takes its single write lock with the first
write, so the count sees every claim committed before and none can slip in between; of two
uploads racing for the last place, the second is refused at once (a 403) rather than both
fitting. Once received, the claim shrinks to the files' real size; it becomes the model's row
in the transaction that records it (counted once more), and is deleted if the upload fails.
A claim left by a process that died lapses after RESERVATION_S."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from bastion.config import Settings
from bastion.db.tables import CustomModel, ModelUploadReservation, Organization, utcnow
from bastion.errors import QuotaExceededError
from bastion.ids import new_id
from bastion.tenancy.plans import Limits

RESERVATION_S = 3600.0  # a claim lapses this long after it was made or last shrunk


@dataclass(frozen=True)
class ModelQuota:
    models: int
    bytes: int

    @classmethod
    def of(cls, limits: Limits, settings: Settings) -> "ModelQuota":
        def least(plan: int | None, server: int) -> int:
            return server if plan is None else min(plan, server)
        return cls(models=least(limits.custom_models, settings.custom_models_per_org),
                   bytes=least(limits.custom_model_bytes, settings.custom_model_bytes_per_org))


@dataclass(frozen=True)
class Reservation:
    """An upload's claim: `bytes` it may take, of the `left` there were when it claimed."""

    id: str
    org_id: str
    bytes: int
    left: int


@dataclass(frozen=True)
class Usage:
    models: int
    bytes: int
    uploading: int  # claims of uploads under way, counted in models and bytes

    def _under_way(self) -> str:
        return f" and {self.uploading} upload(s) under way" if self.uploading else ""

    def full(self, quota: ModelQuota) -> QuotaExceededError:
        return QuotaExceededError(
            f"Your organisation has {self.models - self.uploading} uploaded model(s)"
            f"{self._under_way()}, its quota is {quota.models}; delete one to upload another.",
            param="model_id", code="model_quota_exceeded")

    def no_bytes(self, quota: ModelQuota) -> QuotaExceededError:
        return QuotaExceededError(
            f"Your organisation's uploaded models{self._under_way()} take {self.bytes} bytes, "
            f"its quota is {quota.bytes}; delete one to upload another.", param="file",
            code="model_storage_quota_exceeded")


def _lock_org(session: Session, org_id: str) -> None:
    """Serialise claims per organisation on PostgreSQL (SQLite serialises writers)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Organization.id).where(Organization.id == org_id)
                        .with_for_update())


def usage(session: Session, org_id: str, now: datetime, *, excluding: str = "") -> Usage:
    """The organisation's models and the live claims of its uploads under way (but the claim
    `excluding`)."""
    count, total = session.execute(
        select(func.count(CustomModel.id), func.coalesce(func.sum(CustomModel.bytes), 0))
        .where(CustomModel.org_id == org_id)).one()
    claims, claimed = session.execute(
        select(func.count(ModelUploadReservation.id),
               func.coalesce(func.sum(ModelUploadReservation.bytes), 0))
        .where(ModelUploadReservation.org_id == org_id, ModelUploadReservation.id != excluding,
               ModelUploadReservation.expires_at > now)).one()
    return Usage(models=int(count) + int(claims), bytes=int(total) + int(claimed),
                 uploading=int(claims))


def reserve(session: Session, org_id: str, quota: ModelQuota, want: int) -> Reservation:
    """Claim one model and up to `want` bytes for an upload about to be received (in the
    caller's transaction: QuotaExceededError rolls it back). Refused when no model may be
    added, or no byte."""
    now = utcnow()
    _lock_org(session, org_id)
    session.execute(delete(ModelUploadReservation).where(  # lapsed claims of dead processes
        ModelUploadReservation.org_id == org_id, ModelUploadReservation.expires_at <= now))
    claim = ModelUploadReservation(id=new_id("mres"), org_id=org_id, bytes=0,
                                   expires_at=now + timedelta(seconds=RESERVATION_S),
                                   created_at=now)
    session.add(claim)
    session.flush()  # written before counting: see the module's docstring
    others = usage(session, org_id, now, excluding=claim.id)
    if others.models >= quota.models:
        raise others.full(quota)
    left = quota.bytes - others.bytes
    if left <= 0:
        raise others.no_bytes(quota)
    claim.bytes = min(want, left)
    return Reservation(claim.id, org_id, claim.bytes, left)


def shrink(session: Session, reservation: Reservation, size: int) -> None:
    """The upload is received: it holds its real size from now on (and a fresh lease)."""
    session.execute(update(ModelUploadReservation)
                    .where(ModelUploadReservation.id == reservation.id)
                    .values(bytes=min(size, reservation.bytes),
                            expires_at=utcnow() + timedelta(seconds=RESERVATION_S)))


def record(session: Session, reservation: Reservation, quota: ModelQuota,
           row: CustomModel) -> None:
    """The claim becomes the model's row, counted once more (a claim that lapsed meanwhile
    may have let another upload in)."""
    now = utcnow()
    _lock_org(session, reservation.org_id)
    session.execute(delete(ModelUploadReservation)
                    .where(ModelUploadReservation.id == reservation.id))
    session.add(row)
    session.flush()
    used = usage(session, reservation.org_id, now)
    if used.models > quota.models:
        raise used.full(quota)
    if used.bytes > quota.bytes:
        raise over_bytes(quota, quota.bytes - (used.bytes - row.bytes), row.bytes)


def release(session: Session, reservation: Reservation) -> None:
    """The upload failed: its claim frees at once."""
    session.execute(delete(ModelUploadReservation)
                    .where(ModelUploadReservation.id == reservation.id))


def over_bytes(quota: ModelQuota, left: int, adding: int | None = None) -> QuotaExceededError:
    size = f"This upload is {adding} bytes" if adding is not None else "This upload is larger"
    return QuotaExceededError(
        f"{size}; your organisation has {left} of its {quota.bytes} bytes of uploaded models "
        f"left. Delete a model, or upload a smaller one.", param="file",
        code="model_storage_quota_exceeded")
