"""/v1/fine_tuning/jobs (OpenAI's spelling) and /v1/fine-tuning/jobs (the spec's): create,
list, retrieve, cancel, events, checkpoints."""

from __future__ import annotations

from typing import Annotated, Callable

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from bastion.api.deps import CatalogDep, SessionsDep, require
from bastion.api.organizations import epoch
from bastion.models.catalog import Deployment
from bastion.db.tables import File, FineTuningCheckpoint, FineTuningEvent, FineTuningJob
from bastion.files.validate import Summary
from bastion.finetune import events, jobs
from bastion.finetune.encode import deployment_checker
from bastion.protocol.fine_tuning import (Checkpoint, CheckpointList, Job, JobCreate, JobError,
                                          JobEvent, JobEventList, JobList)
from bastion.tenancy.keys import Principal

router = APIRouter()
TrainingKey = Annotated[Principal, Depends(require("training"))]
PREFIXES = ("/v1/fine_tuning/jobs", "/v1/fine-tuning/jobs")


def view(job: FineTuningJob) -> Job:
    hp = {k: job.hyperparameters[k] for k in ("n_epochs", "batch_size",
                                              "learning_rate_multiplier", "learning_rate")}
    method = {"type": job.method, job.method: {"hyperparameters": hp}}
    if job.method == "lora":
        method["lora"] |= {"rank": job.hyperparameters.get("lora_rank"),
                           "alpha": job.hyperparameters.get("lora_alpha")}
    return Job(id=job.id, created_at=epoch(job.created_at) or 0,
               error=JobError(**job.error) if job.error else None,
               fine_tuned_model=job.fine_tuned_model, finished_at=epoch(job.finished_at),
               hyperparameters=hp, model=job.model, organization_id=job.org_id, seed=job.seed,
               status=job.status, trained_tokens=job.trained_tokens,  # type: ignore[arg-type]
               training_file=job.training_file, validation_file=job.validation_file,
               estimated_finish=epoch(job.estimated_finish), metadata=job.meta, method=method,
               user_provided_suffix=job.suffix)


def event_view(e: FineTuningEvent) -> JobEvent:
    return JobEvent(id=e.id, created_at=epoch(e.created_at) or 0, level=e.level,  # type: ignore[arg-type]
                    message=e.message, data=e.data, type=e.type)  # type: ignore[arg-type]


def rechecker(request: Request) -> Callable[[Deployment, File], Summary]:
    """Validate a stored file against a chosen base model's tokenizer and context."""
    settings = request.app.state.settings

    def recheck(dep: Deployment, f: File) -> Summary:
        return deployment_checker(dep, settings)(request.app.state.blobs.path(f.storage_key))
    return recheck


async def create_job(body: JobCreate, key: TrainingKey, sessions: SessionsDep,
                     catalog: CatalogDep, request: Request) -> Job:
    recheck = rechecker(request)

    def run() -> Job:
        with sessions.begin() as s:
            return view(jobs.create(s, catalog, key.org_id, body, recheck))
    return await run_in_threadpool(run)


def list_jobs(key: TrainingKey, sessions: SessionsDep, after: str | None = None,
              limit: int = 20) -> JobList:
    with sessions() as s:
        rows, more = jobs.listing(s, key.org_id, after=after, limit=limit)
        return JobList(data=[view(r) for r in rows], has_more=more)


def retrieve_job(job_id: str, key: TrainingKey, sessions: SessionsDep) -> Job:
    with sessions() as s:
        return view(jobs.get(s, key.org_id, job_id))


def cancel_job(job_id: str, key: TrainingKey, sessions: SessionsDep) -> Job:
    with sessions.begin() as s:
        return view(jobs.cancel(s, key.org_id, job_id))


def list_events(job_id: str, key: TrainingKey, sessions: SessionsDep, after: str | None = None,
                limit: int = 20) -> JobEventList:
    with sessions() as s:
        jobs.get(s, key.org_id, job_id)
        rows, more = events.listing(s, job_id, after=after, limit=limit)
        return JobEventList(data=[event_view(e) for e in rows], has_more=more)


def list_checkpoints(job_id: str, key: TrainingKey, sessions: SessionsDep,
                     after: str | None = None, limit: int = 10) -> CheckpointList:
    with sessions() as s:
        job = jobs.get(s, key.org_id, job_id)
        query = select(FineTuningCheckpoint).where(FineTuningCheckpoint.job_id == job_id)
        if after is not None:
            cursor = s.get(FineTuningCheckpoint, after)
            if cursor is not None:
                query = query.where(FineTuningCheckpoint.step < cursor.step)
        rows = list(s.scalars(query.order_by(FineTuningCheckpoint.step.desc()).limit(limit + 1)))
    name = jobs.model_name(job)
    data = [Checkpoint(id=c.id, created_at=epoch(c.created_at) or 0,
                       fine_tuned_model_checkpoint=f"{name}:ckpt-step-{c.step}",
                       fine_tuning_job_id=job_id, metrics=c.metrics, step_number=c.step)
            for c in rows[:limit]]
    return CheckpointList(data=data, has_more=len(rows) > limit,
                          first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)


for prefix in PREFIXES:
    router.add_api_route(prefix, create_job, methods=["POST"], response_model=Job)
    router.add_api_route(prefix, list_jobs, methods=["GET"], response_model=JobList)
    router.add_api_route(prefix + "/{job_id}", retrieve_job, methods=["GET"], response_model=Job)
    router.add_api_route(prefix + "/{job_id}/cancel", cancel_job, methods=["POST"],
                         response_model=Job)
    router.add_api_route(prefix + "/{job_id}/events", list_events, methods=["GET"],
                         response_model=JobEventList)
    router.add_api_route(prefix + "/{job_id}/checkpoints", list_checkpoints, methods=["GET"],
                         response_model=CheckpointList)
