"""/v1/fine_tuning/jobs (OpenAI's spelling) and /v1/fine-tuning/jobs (the spec's): create,
list, retrieve, cancel, events, checkpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from bastion.api.deps import ServicesDep, require
from bastion.protocol.fine_tuning import CheckpointList, Job, JobCreate, JobEventList, JobList
from bastion.services import fine_tuning
from bastion.tenancy.keys import Principal

router = APIRouter()
TrainingKey = Annotated[Principal, Depends(require("training"))]
PREFIXES = ("/v1/fine_tuning/jobs", "/v1/fine-tuning/jobs")


async def create_job(body: JobCreate, key: TrainingKey, services: ServicesDep) -> Job:
    return await run_in_threadpool(fine_tuning.create, services, key, body)


def list_jobs(key: TrainingKey, services: ServicesDep, after: str | None = None,
              limit: int = 20) -> JobList:
    return fine_tuning.listing(services, key, after=after, limit=limit)


def retrieve_job(job_id: str, key: TrainingKey, services: ServicesDep) -> Job:
    return fine_tuning.retrieve(services, key, job_id)


def cancel_job(job_id: str, key: TrainingKey, services: ServicesDep) -> Job:
    return fine_tuning.cancel(services, key, job_id)


def list_events(job_id: str, key: TrainingKey, services: ServicesDep, after: str | None = None,
                limit: int = 20) -> JobEventList:
    return fine_tuning.list_events(services, key, job_id, after=after, limit=limit)


def list_checkpoints(job_id: str, key: TrainingKey, services: ServicesDep,
                     after: str | None = None, limit: int = 10) -> CheckpointList:
    return fine_tuning.list_checkpoints(services, key, job_id, after=after, limit=limit)


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
