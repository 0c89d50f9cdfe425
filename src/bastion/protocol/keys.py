"""API keys on the wire: created with the spec's {"name", "permissions", "rate_limit"}; the
presenter from a stored row (never its hash; typed loosely: the wire layer imports nothing
from db/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from bastion.protocol.common import StrictModel, epoch

Permission = Literal["inference", "training", "models", "admin"]


class ApiKeyCreate(StrictModel):
    name: str = Field(min_length=1, max_length=256)
    permissions: list[Permission] = Field(min_length=1, max_length=4)
    rate_limit: int | None = Field(None, ge=1, le=1_000_000, description="requests per minute")

    @field_validator("permissions")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return sorted(set(v), key=v.index)


class ApiKeyView(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    name: str
    prefix: str
    org_id: str
    permissions: list[str]
    rate_limit: int | None
    created_at: int
    last_used_at: int | None
    revoked_at: int | None


class ApiKeyCreated(ApiKeyView):
    key: str  # shown once, never again


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKeyView]


def key_view(row: Any) -> ApiKeyView:
    """`row`: a db.tables.ApiKey."""
    return ApiKeyView(id=row.id, name=row.name, prefix=row.prefix, org_id=row.org_id,
                      permissions=list(row.permissions), rate_limit=row.rate_limit,
                      created_at=epoch(row.created_at) or 0, last_used_at=epoch(row.last_used_at),
                      revoked_at=epoch(row.revoked_at))
