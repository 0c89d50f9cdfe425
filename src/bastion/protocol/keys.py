"""API keys on the wire: created with the spec's {"name", "permissions", "rate_limit"}."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from bastion.protocol.common import StrictModel

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
