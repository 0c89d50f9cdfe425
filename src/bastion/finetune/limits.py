"""What an organisation may ask of the fine-tuning workers, checked when a job is created,
before anything is written or dequantised: a base model whose float32 weights fit a worker's
memory, at most its plan's number of jobs queued or running at once, and no job that trains
more tokens than its plan allows in an hour."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bastion.db.tables import FineTuningJob, Organization
from bastion.errors import InvalidRequestError, RateLimitError
from bastion.finetune.states import ACTIVE_JOB_STATES
from bastion.models.catalog import Deployment
from bastion.tenancy.plans import Limits

# A full queue frees when a job ends, minutes to hours away: the SDKs should not retry.
QUEUE_FULL_RETRY_S = 600
GB = 1e9


def float32_bytes(dep: Deployment) -> tuple[int, bool] | None:
    """(bytes, exact): the base model's weights as the trainer holds them (float32). Exact
    from the parameter count llama.cpp read from the loaded GGUF; else, for a GGUF not loaded
    (yet), its file size: a lower bound, as float32 is the widest type a GGUF holds, so
    dequantising never makes the weights smaller than the file."""
    n = getattr(getattr(dep.engine, "model", None), "n_params", None)
    if isinstance(n, int) and n > 0:
        return n * 4, True
    path = getattr(dep.engine, "path", None)
    try:
        return (Path(path).stat().st_size, False) if path is not None else None
    except OSError:
        return None


def check_base_size(dep: Deployment, max_bytes: int) -> None:
    found = float32_bytes(dep)
    if found is not None and found[0] > max_bytes:
        size, exact = found
        raise InvalidRequestError(
            f"The model '{dep.id}' is too large to fine-tune here: its weights take "
            f"{'' if exact else 'at least '}{size / GB:.2f} GB as float32, which the trainer "
            f"works in, and this server's workers take base models of at most "
            f"{max_bytes / GB:.2f} GB (BASTION_FINE_TUNE_MAX_BASE_BYTES). Choose a smaller "
            f"base model.", param="model", code="model_too_large")


def _lock_org(session: Session, org_id: str) -> None:
    """Serialise job creation per organisation on PostgreSQL (SQLite serialises writers)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Organization.id).where(Organization.id == org_id)
                        .with_for_update())


def active_jobs(session: Session, org_id: str) -> int:
    return int(session.scalar(select(func.count()).select_from(FineTuningJob).where(
        FineTuningJob.org_id == org_id, FineTuningJob.status.in_(ACTIVE_JOB_STATES))) or 0)


def check_active_jobs(session: Session, org_id: str, limits: Limits, *,
                      written: bool = False) -> None:
    """Before the job is written (a cheap early refusal) and again once it is (`written`: the
    count includes it). The second look is what holds under concurrent creation: PostgreSQL
    locks the organisation's row first; SQLite takes its single write lock with the INSERT,
    so the count after it sees every other job committed before."""
    cap = limits.fine_tuning_jobs
    if cap is None:
        return
    if not written:
        _lock_org(session, org_id)
    active = active_jobs(session, org_id) - (1 if written else 0)
    if active >= cap:
        raise RateLimitError(
            f"Your organization already has {active} fine-tuning job"
            f"{'' if active == 1 else 's'} queued or running, the most its plan allows "
            f"({cap}). Wait for one to finish or cancel one, then create this job again.",
            code="fine_tuning_jobs_limit_exceeded", retry_after=QUEUE_FULL_RETRY_S)


def check_trained_tokens(tokens: int, limits: Limits) -> None:
    """A job is one request: like a request's tokens, what it trains must fit the plan's
    tokens per hour (the training file's tokens times the epochs), else it could never be
    within the plan's budget."""
    budget = limits.tokens_per_hour
    if budget is not None and tokens > budget:
        raise InvalidRequestError(
            f"This job would train {tokens:,} tokens (the training file's tokens times "
            f"n_epochs), more than your organization's plan allows in an hour "
            f"({budget:,}). Use fewer epochs or a smaller training file.",
            param="training_file", code="tokens_per_hour_exceeded")
