"""Organisations on the wire (the Achiral document's account API), and the presenter from a
stored row plus its effective limits (computed by tenancy, which sits above this layer; rows
typed loosely: the wire layer imports nothing from db/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bastion.protocol.common import StrictModel, epoch

PlanName = Literal["spark", "seed", "scale", "dedicated"]
Limit = int | None  # None: unlimited


class LimitsOverride(BaseModel):
    """Overrides of a plan's limits; an explicit null means unlimited."""

    model_config = ConfigDict(extra="forbid", strict=True)
    concurrent_requests: Limit = Field(None, ge=1, le=100_000)
    tokens_per_request: Limit = Field(None, ge=1, le=10_000_000)
    tokens_per_hour: Limit = Field(None, ge=1, le=10**12)
    fine_tuning_jobs: Limit = Field(None, ge=0, le=100_000)  # queued + running; 0: none


class OrganizationCreate(StrictModel):
    name: str = Field(min_length=1, max_length=256)
    plan: PlanName = "spark"


class OrganizationUpdate(StrictModel):
    name: str | None = Field(None, min_length=1, max_length=256)
    plan: PlanName | None = None
    limits: LimitsOverride | None = None


class LimitsView(BaseModel):
    concurrent_requests: Limit
    tokens_per_request: Limit
    tokens_per_hour: Limit
    fine_tuning_jobs: Limit


class OrganizationView(BaseModel):
    id: str
    object: Literal["organization"] = "organization"
    name: str
    plan: PlanName
    limits: LimitsView
    created_at: int


class OrganizationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OrganizationView]


class OrganizationDeleted(BaseModel):
    id: str
    object: Literal["organization"] = "organization"
    deleted: bool = True


def organization_view(org: Any, limits: Any) -> OrganizationView:
    """`org`: a db.tables.Organization; `limits`: its effective limits (tenancy.plans.Limits,
    or any object with the four limit attributes)."""
    return OrganizationView(id=org.id, name=org.name, plan=org.plan,
                            limits=LimitsView(concurrent_requests=limits.concurrent_requests,
                                              tokens_per_request=limits.tokens_per_request,
                                              tokens_per_hour=limits.tokens_per_hour,
                                              fine_tuning_jobs=limits.fine_tuning_jobs),
                            created_at=epoch(org.created_at) or 0)
