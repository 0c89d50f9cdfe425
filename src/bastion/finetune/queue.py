"""The job queue in the database. Every transition is a compare-and-set on (status,
claim_token), so several workers on several machines never run one job twice; PostgreSQL also
skips rows another worker has locked. A job whose worker stopped sending heartbeats is queued
again and resumes from its last checkpoint."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from bastion.db.tables import FineTuningJob, utcnow
from bastion.finetune import billing, events


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str
    attempt: int


def _mine(claim: Claim) -> Any:
    return ((FineTuningJob.id == claim.job_id) & (FineTuningJob.claim_token == claim.token)
            & (FineTuningJob.status == "running"))


def fair_order() -> Any:
    """Queued jobs in the order workers should take them: round robin across organisations.
    The organisation served longest ago (or never) goes first, with its oldest queued job;
    one organisation's backlog never holds another's first job behind it. "Served" is the
    newest heartbeat of any of the organisation's jobs: a job running now counts as just
    served, so with several workers a second organisation is not made to wait for a first
    one's second job."""
    served = (select(FineTuningJob.org_id, func.max(FineTuningJob.heartbeat_at).label("at"))
              .group_by(FineTuningJob.org_id).subquery())
    return (select(FineTuningJob.id)
            .join(served, served.c.org_id == FineTuningJob.org_id)
            .where(FineTuningJob.status == "queued")
            .order_by(served.c.at.asc().nulls_first(), FineTuningJob.created_at,
                      FineTuningJob.id))


def claim_next(sessions: sessionmaker[Session], worker_id: str) -> Claim | None:
    with sessions.begin() as s:
        query = fair_order().limit(5)
        if s.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True, of=FineTuningJob)
        for job_id in list(s.scalars(query)):
            token = secrets.token_hex(16)
            now = utcnow()
            won = s.execute(update(FineTuningJob).where(
                FineTuningJob.id == job_id, FineTuningJob.status == "queued").values(
                status="running", claim_token=token, worker_id=worker_id, heartbeat_at=now,
                started_at=func.coalesce(FineTuningJob.started_at, now),
                attempts=FineTuningJob.attempts + 1)).rowcount
            if won == 1:
                attempt = s.scalar(select(FineTuningJob.attempts).where(FineTuningJob.id == job_id))
                events.add(s, job_id, f"Fine-tuning job started (worker {worker_id}"
                           + (f", attempt {attempt})" if attempt and attempt > 1 else ")"))
                return Claim(job_id, token, int(attempt or 1))
    return None


def heartbeat(sessions: sessionmaker[Session], claim: Claim, *, trained_tokens: int | None = None,
              estimated_finish: datetime | None = None) -> bool:
    """Renew the lease; False when the job is no longer ours (cancelled or reclaimed)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if trained_tokens is not None:
        values["trained_tokens"] = trained_tokens
    if estimated_finish is not None:
        values["estimated_finish"] = estimated_finish
    with sessions.begin() as s:
        return s.execute(update(FineTuningJob).where(_mine(claim)).values(**values)).rowcount == 1


def finish(sessions: sessionmaker[Session], claim: Claim, status: str, *messages: str,
           level: str = "info", **values: Any) -> bool:
    with sessions.begin() as s:
        done = s.execute(update(FineTuningJob).where(_mine(claim)).values(
            status=status, finished_at=utcnow(), estimated_finish=None, **values)).rowcount == 1
        if done:
            for message in messages:
                events.add(s, claim.job_id, message, level=level)
            job = s.get(FineTuningJob, claim.job_id)
            assert job is not None
            billing.bill(s, job)
        return done


def release(sessions: sessionmaker[Session], claim: Claim, reason: str) -> None:
    """Hand a running job back to the queue (this worker is shutting down)."""
    with sessions.begin() as s:
        if s.execute(update(FineTuningJob).where(_mine(claim)).values(
                status="queued", claim_token=None, worker_id=None)).rowcount:
            events.add(s, claim.job_id, f"{reason}; the job is queued again and will resume "
                       f"from its last checkpoint", level="warn")


def reclaim_stale(sessions: sessionmaker[Session], lease_s: float) -> list[str]:
    """Queue again the running jobs whose worker has not sent a heartbeat within the lease."""
    cutoff = utcnow() - timedelta(seconds=lease_s)
    out = []
    with sessions.begin() as s:
        stale = s.execute(select(FineTuningJob.id, FineTuningJob.claim_token).where(
            FineTuningJob.status == "running", FineTuningJob.heartbeat_at < cutoff)).all()
        for job_id, token in stale:
            if s.execute(update(FineTuningJob).where(
                    FineTuningJob.id == job_id, FineTuningJob.claim_token == token,
                    FineTuningJob.status == "running").values(
                    status="queued", claim_token=None, worker_id=None)).rowcount:
                events.add(s, job_id, f"The worker running this job stopped responding for "
                           f"{lease_s:g}s; the job is queued again and will resume from its last "
                           f"checkpoint", level="warn")
                out.append(job_id)
    return out
