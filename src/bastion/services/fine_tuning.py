"""The fine-tuning use cases, for /v1/fine_tuning/jobs and the dashboard's Fine-tuning pages
alike: create (every check before anything is written), list, retrieve, cancel, events,
checkpoints, and the base models a job may start from; creating and cancelling are audited.
Blocking (database, tokenizer): the callers run these in a worker thread."""

from __future__ import annotations

from typing import Callable

from sqlalchemy import select

from bastion.db.tables import File, FineTuningCheckpoint
from bastion.files.validate import Summary
from bastion.finetune import events, jobs
from bastion.finetune.encode import deployment_checker
from bastion.finetune.trainable import why_not_fine_tunable
from bastion.models.catalog import Deployment
from bastion.protocol.fine_tuning import (CheckpointList, Job, JobCreate, JobEventList, JobList,
                                          checkpoint_view, event_view, job_view)
from bastion.services.context import Services
from bastion.tenancy import audit
from bastion.tenancy.keys import Principal


def rechecker(services: Services) -> Callable[[Deployment, File], Summary]:
    """Validate a stored file against a chosen base model's tokenizer and context."""
    settings, blobs = services.settings, services.blobs

    def recheck(dep: Deployment, f: File) -> Summary:
        return deployment_checker(dep, settings)(blobs.path(f.storage_key))
    return recheck


def create(services: Services, principal: Principal, body: JobCreate) -> Job:
    recheck = rechecker(services)
    with services.sessions.begin() as s:
        job = jobs.create(s, services.catalog, principal, body, recheck,
                          max_base_bytes=services.settings.fine_tune_max_base_bytes)
        audit.record(s, principal, "fine_tuning.job.created", principal.org_id,
                     target_id=job.id,
                     details={"model": job.model, "training_file": job.training_file,
                              "validation_file": job.validation_file, "suffix": job.suffix,
                              "method": job.method})
        return job_view(job)


def listing(services: Services, principal: Principal, *, after: str | None = None,
            limit: int = 20) -> JobList:
    with services.sessions() as s:
        rows, more = jobs.listing(s, principal.org_id, after=after, limit=limit)
        return JobList(data=[job_view(r) for r in rows], has_more=more)


def retrieve(services: Services, principal: Principal, job_id: str) -> Job:
    with services.sessions() as s:
        return job_view(jobs.get(s, principal.org_id, job_id))


def cancel(services: Services, principal: Principal, job_id: str) -> Job:
    """Queued jobs stop at once; a job that has finished is a 409."""
    with services.sessions.begin() as s:
        was = jobs.get(s, principal.org_id, job_id).status
        job = jobs.cancel(s, principal.org_id, job_id)
        if was != "cancelled" and job.status == "cancelled":  # this call cancelled it
            audit.record(s, principal, "fine_tuning.job.cancelled", principal.org_id,
                         target_id=job.id, details={"status_before": was})
        return job_view(job)


def list_events(services: Services, principal: Principal, job_id: str, *,
                after: str | None = None, limit: int = 20) -> JobEventList:
    """Newest first; another organisation's job is a 404."""
    with services.sessions() as s:
        jobs.get(s, principal.org_id, job_id)
        rows, more = events.listing(s, job_id, after=after, limit=limit)
        return JobEventList(data=[event_view(e) for e in rows], has_more=more)


def list_checkpoints(services: Services, principal: Principal, job_id: str, *,
                     after: str | None = None, limit: int = 10) -> CheckpointList:
    """Newest step first; `after` is a checkpoint id (an unknown one is ignored)."""
    with services.sessions() as s:
        job = jobs.get(s, principal.org_id, job_id)
        query = select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job_id)
        if after is not None:
            cursor = s.get(FineTuningCheckpoint, after)
            if cursor is not None:
                query = query.where(FineTuningCheckpoint.step < cursor.step)
        rows = list(s.scalars(query.order_by(FineTuningCheckpoint.step.desc()).limit(limit + 1)))
        name = jobs.model_name(job)
        data = [checkpoint_view(c, name) for c in rows[:limit]]
    return CheckpointList(data=data, has_more=len(rows) > limit,
                          first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)


def base_models(services: Services, principal: Principal) -> list[str]:
    """The ids of the models this organisation may fine-tune."""
    return [d.id for d in services.catalog.visible(principal.org_id)
            if why_not_fine_tunable(d) is None]
