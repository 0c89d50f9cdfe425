"""How many uploaded models, and how many bytes of them, an organisation may keep: the server's
BASTION_CUSTOM_MODELS_PER_ORG and BASTION_CUSTOM_MODEL_BYTES_PER_ORG, or less where the
organisation's plan says so (tenancy/plans.py). Checked before an upload is received (a full
quota refuses at once, and the body is cut off where the bytes left run out) and again, with
the real sizes, in the transaction that records it."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bastion.config import Settings
from bastion.db.tables import CustomModel
from bastion.errors import QuotaExceededError
from bastion.tenancy.plans import Limits


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


def used(session: Session, org_id: str) -> tuple[int, int]:
    """(models, bytes) the organisation keeps now."""
    count, total = session.execute(
        select(func.count(CustomModel.id), func.coalesce(func.sum(CustomModel.bytes), 0))
        .where(CustomModel.org_id == org_id)).one()
    return int(count), int(total)


def bytes_left(session: Session, org_id: str, quota: ModelQuota) -> int:
    """What one more upload may take; QuotaExceededError when none may be added at all."""
    count, total = used(session, org_id)
    if count >= quota.models:
        raise QuotaExceededError(
            f"Your organisation has {count} uploaded model(s), its quota is {quota.models}; "
            f"delete one to upload another.", param="model_id", code="model_quota_exceeded")
    if total >= quota.bytes:
        raise QuotaExceededError(
            f"Your organisation's uploaded models take {total} bytes, its quota is "
            f"{quota.bytes}; delete one to upload another.", param="file",
            code="model_storage_quota_exceeded")
    return quota.bytes - total


def check(session: Session, org_id: str, quota: ModelQuota, adding: int) -> None:
    """Whether a model of `adding` bytes still fits."""
    left = bytes_left(session, org_id, quota)
    if adding > left:
        raise over_bytes(quota, left, adding)


def over_bytes(quota: ModelQuota, left: int, adding: int | None = None) -> QuotaExceededError:
    size = f"This upload is {adding} bytes" if adding is not None else "This upload is larger"
    return QuotaExceededError(
        f"{size}; your organisation has {left} of its {quota.bytes} bytes of uploaded models "
        f"left. Delete a model, or upload a smaller one.", param="file",
        code="model_storage_quota_exceeded")
