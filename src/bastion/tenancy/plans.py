"""Plans of the spec's table and per-organisation overrides; None means unlimited."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Limits:
    concurrent_requests: int | None
    tokens_per_request: int | None
    tokens_per_hour: int | None
    # Uploaded models the organisation may keep, and their bytes together: the server's
    # BASTION_CUSTOM_MODELS_PER_ORG / _BYTES_PER_ORG apply to every plan, a plan may allow less.
    custom_models: int | None = None
    custom_model_bytes: int | None = None
    # fine-tuning jobs queued or running at once, per organisation: the worker's time is the
    # scarcest thing a tenant can ask for, and fair scheduling alone does not bound a backlog
    fine_tuning_jobs: int | None = None


GIB = 1024 ** 3
PLANS: dict[str, Limits] = {
    "spark": Limits(concurrent_requests=5, tokens_per_request=2048, tokens_per_hour=10_000,
                    custom_models=2, custom_model_bytes=2 * GIB, fine_tuning_jobs=1),
    "seed": Limits(concurrent_requests=20, tokens_per_request=4096, tokens_per_hour=100_000,
                   custom_models=5, custom_model_bytes=10 * GIB, fine_tuning_jobs=3),
    "scale": Limits(concurrent_requests=100, tokens_per_request=8192, tokens_per_hour=None,
                    fine_tuning_jobs=10),
    "dedicated": Limits(concurrent_requests=None, tokens_per_request=16384, tokens_per_hour=None,
                        fine_tuning_jobs=None),
}
PLAN_ORDER = ["spark", "seed", "scale", "dedicated"]
LIMIT_FIELDS = ("concurrent_requests", "tokens_per_request", "tokens_per_hour", "fine_tuning_jobs")


def effective_limits(plan: str, overrides: dict[str, Any] | None) -> Limits:
    """The plan's limits with the organisation's overrides applied on top."""
    base = PLANS.get(plan, PLANS["spark"])
    return replace(base, **{k: v for k, v in (overrides or {}).items() if k in LIMIT_FIELDS})


def is_upgrade(old: str, new: str) -> bool:
    return PLAN_ORDER.index(new) > PLAN_ORDER.index(old)
