"""Fine-tuning jobs: creation with every check done before anything is written, listing,
cancellation. Scoped to the caller's organisation; another organisation's job is a 404."""

from __future__ import annotations

import secrets
from typing import Any, Callable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from bastion.models.catalog import Catalog, Deployment
from bastion.db.pagination import page
from bastion.db.tables import File, FineTuningJob, utcnow
from bastion.errors import ConflictError, InvalidRequestError, ModelNotFoundError, NotFoundError
from bastion.finetune.states import ACTIVE_JOB_STATES as ACTIVE
from bastion.finetune.states import FINISHED_JOB_STATES as FINISHED
from bastion.files.validate import Summary
from bastion.finetune import billing, events, hyperparams, limits
from bastion.finetune.trainable import base_path, why_not_fine_tunable
from bastion.ids import new_id
from bastion.protocol.fine_tuning import JobCreate
from bastion.tenancy.keys import Principal


def get(session: Session, org_id: str, job_id: str) -> FineTuningJob:
    row = session.get(FineTuningJob, job_id)
    if row is None or row.org_id != org_id:
        raise NotFoundError(f"No fine-tuning job '{job_id}' in this organization.",
                            param="fine_tuning_job_id", code="fine_tuning_job_not_found")
    return row


def base_model(catalog: Catalog, name: str, org_id: str) -> Deployment:
    try:
        dep = catalog.resolve(name, org_id)
    except ModelNotFoundError:
        raise InvalidRequestError(f"The model '{name}' does not exist or you do not have access "
                                  f"to it, so it cannot be fine-tuned.", param="model",
                                  code="model_not_available") from None
    reason = why_not_fine_tunable(dep)
    if reason:
        raise InvalidRequestError(f"The model '{dep.id}' cannot be fine-tuned: {reason}.",
                                  param="model", code="model_not_fine_tunable")
    return dep


def training_input(session: Session, org_id: str, file_id: str, param: str) -> File:
    row = session.get(File, file_id)
    if row is None or row.org_id != org_id:
        raise InvalidRequestError(f"{param} '{file_id}' does not exist or you do not have access "
                                  f"to it; upload it with purpose 'fine-tune' first.",
                                  param=param, code="file_not_found")
    if row.purpose != "fine-tune":
        raise InvalidRequestError(f"{param} '{file_id}' was uploaded with purpose "
                                  f"'{row.purpose}'; training data must be uploaded with purpose "
                                  f"'fine-tune'.", param=param, code="invalid_file_purpose")
    return row


def method_of(body: JobCreate) -> tuple[str, Any, dict[str, Any]]:
    """(trainer method, hyperparameters object, extra options) from hyperparameters/method."""
    method, hp, extra = "lora", body.hyperparameters, {}
    if body.method is not None:
        kind = body.method.type
        method = "full" if kind == "full" else "lora"
        options = getattr(body.method, kind)
        if options is not None and options.hyperparameters is not None:
            if hp is not None:
                raise InvalidRequestError("Give hyperparameters either at the top level or inside "
                                          "method, not both.", param="hyperparameters",
                                          code="invalid_value")
            hp = options.hyperparameters
        if kind == "lora" and options is not None:
            extra = {"rank": options.rank, "alpha": options.alpha}
    return method, hp, extra


def create(session: Session, catalog: Catalog, principal: Principal, body: JobCreate,
           recheck: Callable[[Deployment, File], Summary], *,
           max_base_bytes: int) -> FineTuningJob:
    """Check everything, the cheap things first, then write the job and its first events in
    one transaction. The job is billed to the calling key."""
    org_id = principal.org_id
    dep = base_model(catalog, body.model, org_id)
    limits.check_base_size(dep, max_base_bytes)
    limits.check_active_jobs(session, org_id, principal.limits)
    train = training_input(session, org_id, body.training_file, "training_file")
    valid = (training_input(session, org_id, body.validation_file, "validation_file")
             if body.validation_file else None)
    summaries: dict[str, dict[str, Any]] = {}
    for f, param in ((train, "training_file"), (valid, "validation_file")):
        if f is None:
            continue
        summary = f.summary or {}
        if summary.get("checked_with") != dep.id:
            try:
                summary = recheck(dep, f).as_dict()
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"{param} '{f.id}' cannot train '{dep.id}': "
                                          f"{exc.message}", param=param,
                                          code=exc.code) from None
        summaries[param] = summary
    method, hp, extra = method_of(body)
    resolved = hyperparams.resolve(hp, method=method,
                                   n_examples=summaries["training_file"]["examples"], **extra)
    limits.check_trained_tokens(summaries["training_file"]["tokens"] * resolved["n_epochs"],
                                principal.limits)
    now = utcnow()
    job = FineTuningJob(
        id=new_id("ftjob"), org_id=org_id, key_id=principal.key_id, model=dep.id,
        base_path=str(base_path(dep)), training_file=train.id,
        validation_file=valid.id if valid else None, suffix=body.suffix, method=method,
        hyperparameters=resolved, seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        status="queued", created_at=now, attempts=0, meta=body.metadata,
        trained_tokens=None)
    session.add(job)
    events.add(session, job.id, f"Created fine-tuning job: {job.id}")
    events.add(session, job.id, f"Validating training file: {train.id}"
               + (f" and validation file: {valid.id}" if valid else ""))
    examples = summaries["training_file"]["examples"]
    events.add(session, job.id, f"Files validated ({examples} training examples, "
               f"{summaries['training_file']['tokens']} tokens), moving job to queued state",
               data={"training": summaries["training_file"],
                     "validation": summaries.get("validation_file")})
    session.flush()
    limits.check_active_jobs(session, org_id, principal.limits, written=True)
    return job


def listing(session: Session, org_id: str, *, after: str | None,
            limit: int) -> tuple[list[FineTuningJob], bool]:
    query = select(FineTuningJob).where(FineTuningJob.org_id == org_id)
    return page(session, query, FineTuningJob, after=after, limit=limit)


def cancel(session: Session, org_id: str, job_id: str) -> FineTuningJob:
    """Queued jobs stop at once; a running job's worker sees the status on its next step."""
    job = get(session, org_id, job_id)
    if job.status == "cancelled":
        return job
    if job.status in ("succeeded", "failed"):
        raise ConflictError(f"The job {job_id} has already {job.status}; only a job that has "
                            f"not finished can be cancelled.", param="fine_tuning_job_id",
                            code="job_not_cancellable")
    done = session.execute(update(FineTuningJob).where(
        FineTuningJob.id == job_id, FineTuningJob.status.in_(ACTIVE)).values(
        status="cancelled", finished_at=utcnow())).rowcount
    if done:
        events.add(session, job_id, "Job cancelled")
    session.flush()
    session.refresh(job)
    if done:  # what it trained before the cancel is billed, as on OpenAI
        billing.bill(session, job)
    return job


def model_name(job: FineTuningJob) -> str:
    """ft:<base>:<org>:<suffix>:<id>, OpenAI's shape; the id part is unique per job."""
    short = job.id.split("-", 1)[1][:8]
    return f"ft:{job.model}:{job.org_id}:{job.suffix or ''}:{short}"


def count_by_status(session: Session) -> dict[str, int]:
    """Jobs of every organisation by state, every state present (0 where none): a metric."""
    counts = dict.fromkeys((*ACTIVE, *FINISHED), 0)
    for status, n in session.execute(select(FineTuningJob.status, func.count())
                                     .group_by(FineTuningJob.status)):
        counts[status] = n
    return counts
