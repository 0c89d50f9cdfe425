"""A fine-tuning job's trained tokens in the usage ledger: one row per job (its id is the row's
request id), written in the transaction that ends the job, so it commits exactly when the job's
final state does, whichever process ends it, however often a worker restarts it.

What is billed follows OpenAI: the tokens trained, which is the training file's tokens times
the epochs run (steps re-run after a worker died are not billed twice: a resumed job counts
from its checkpoint). A job that succeeded is billed in full, a cancelled one for what it had
trained; a failed job is not billed."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy.orm import Session

from bastion.db.tables import FineTuningJob, utcnow
from bastion.usage.ledger import FINE_TUNING_ENDPOINT, UsageRow, record_in

BILLED_STATES = ("succeeded", "cancelled")
MAX_MS = 2**31 - 1  # the ledger's latency column is a 32-bit integer (24 days)


def _utc(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without their zone; they were written in UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


def bill(session: Session, job: FineTuningJob) -> bool:
    """Record the job's trained tokens if it has ended in a billed state having trained any;
    a second call for the same job writes nothing. True when a row was due."""
    tokens = job.trained_tokens or 0
    if job.status not in BILLED_STATES or tokens <= 0:
        return False
    ended = _utc(job.finished_at) or utcnow()
    started = _utc(job.started_at)
    ran_ms = int((ended - started).total_seconds() * 1000) if started else 0
    record_in(session, UsageRow(
        request_id=job.id, org_id=job.org_id, key_id=job.key_id or "", model=job.model,
        endpoint=FINE_TUNING_ENDPOINT, prompt_tokens=0, completion_tokens=0,
        trained_tokens=tokens, status=job.status, latency_ms=min(max(0, ran_ms), MAX_MS),
        created_at=ended))
    return True
