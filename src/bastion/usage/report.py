"""Usage per day, model and key for one organisation, from the ledger."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from bastion.db.tables import UsageRecord
from bastion.tenancy import orgs
from bastion.tenancy.keys import Principal
from bastion.usage.ledger import FINE_TUNING_ENDPOINT


def usage_by_day(session: Session, org_id: str, start: datetime, end: datetime,
                 key_id: str | None = None) -> list[dict]:
    """Per day, model and key: inference requests and their tokens, and the fine-tuning jobs
    that ended that day with the tokens they trained (billed on their base model).
    `total_tokens` is every billed token: prompt, completion and trained."""
    day = func.date(UsageRecord.created_at)
    job = UsageRecord.endpoint == FINE_TUNING_ENDPOINT
    query = (select(day, UsageRecord.model, UsageRecord.key_id,
                    func.sum(case((job, 0), else_=1)), func.sum(case((job, 1), else_=0)),
                    func.sum(UsageRecord.prompt_tokens), func.sum(UsageRecord.completion_tokens),
                    func.sum(UsageRecord.trained_tokens))
             .where(UsageRecord.org_id == org_id, UsageRecord.created_at >= start,
                    UsageRecord.created_at < end)
             .group_by(day, UsageRecord.model, UsageRecord.key_id)
             .order_by(day, UsageRecord.model, UsageRecord.key_id))
    if key_id is not None:
        query = query.where(UsageRecord.key_id == key_id)
    return [{"date": str(d), "model": model, "key_id": key, "requests": int(n or 0),
             "prompt_tokens": int(p or 0), "completion_tokens": int(c or 0),
             "trained_tokens": int(t or 0), "fine_tuning_jobs": int(jobs or 0),
             "total_tokens": int(p or 0) + int(c or 0) + int(t or 0)}
            for d, model, key, n, jobs, p, c, t in session.execute(query)]


def visible_usage(session: Session, principal: Principal, org_id: str, start: datetime,
                  end: datetime) -> list[dict]:
    """What `principal` may see of an organisation's usage: admins all keys, any other key its
    own requests only; an organisation it cannot see is a 404. The API and the dashboard both
    read usage through here."""
    orgs.get(session, principal, org_id)
    own_only = None if principal.can("admin") else principal.key_id
    return usage_by_day(session, org_id, start, end, key_id=own_only)
