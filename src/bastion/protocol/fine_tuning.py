"""Fine-tuning jobs on the wire, as the `openai` SDK's client.fine_tuning.jobs sees them, plus
the spec's plain `learning_rate` and the method types `lora` and `full`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from bastion.protocol.common import StrictModel, epoch

SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
MAX_EPOCHS, MAX_BATCH = 50, 256
MAX_LR_MULTIPLIER, MAX_LR = 10.0, 0.01


def _number(v: Any, *, name: str, integer: bool, low: float, high: float,
            low_open: bool = False) -> Any:
    """'auto' or a number within bounds, with a message that says what would be accepted."""
    if v == "auto":
        return v
    kind = "an integer" if integer else "a number"
    bounds = f"{'greater than ' if low_open else 'from '}{low:g} {'up ' if low_open else ''}to {high:g}"
    ok_type = (isinstance(v, int) if integer else isinstance(v, (int, float))) and not isinstance(v, bool)
    if not ok_type or not ((v > low if low_open else v >= low) and v <= high):
        raise ValueError(f"{name} must be 'auto' or {kind} {bounds} (got {v!r})")
    return v


class Hyperparameters(StrictModel):
    n_epochs: Any = "auto"
    batch_size: Any = "auto"
    learning_rate_multiplier: Any = "auto"
    learning_rate: Any = None  # the spec's absolute rate; overrides the multiplier

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: Any) -> Any:
        return _number(v, name="n_epochs", integer=True, low=1, high=MAX_EPOCHS)

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        return _number(v, name="batch_size", integer=True, low=1, high=MAX_BATCH)

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, v: Any) -> Any:
        return _number(v, name="learning_rate_multiplier", integer=False, low=0,
                       high=MAX_LR_MULTIPLIER, low_open=True)

    @field_validator("learning_rate")
    @classmethod
    def _rate(cls, v: Any) -> Any:
        if v == "auto":
            raise ValueError("learning_rate must be a number; leave it out for the automatic rate")
        return _number(v, name="learning_rate", integer=False, low=0, high=MAX_LR, low_open=True)


class LoraOptions(StrictModel):
    hyperparameters: Hyperparameters | None = None
    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0, le=1024)


class FullOptions(StrictModel):
    hyperparameters: Hyperparameters | None = None


class Method(StrictModel):
    """OpenAI's {"type": "supervised", "supervised": {...}} (trained as LoRA here), or
    {"type": "lora" | "full", "lora" | "full": {...}}."""

    type: Literal["supervised", "lora", "full"]
    supervised: FullOptions | None = None
    lora: LoraOptions | None = None
    full: FullOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") in ("dpo", "reinforcement"):
            raise ValueError(f"method type '{data['type']}' is not supported; use 'supervised', "
                             f"'lora' or 'full'")
        return data


class JobCreate(StrictModel):
    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is not None and not SUFFIX.match(v):
            raise ValueError(f"suffix may contain only letters, digits, '-' and '_', 1 to 40 "
                             f"characters (got {v!r})")
        return v

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("integrations are not supported by this server")
        return v


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Job(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    user_provided_suffix: str | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Checkpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


def job_view(job: Any) -> Job:
    """`job`: a db.tables.FineTuningJob (typed loosely: protocol imports nothing from db/)."""
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
               status=job.status, trained_tokens=job.trained_tokens,
               training_file=job.training_file, validation_file=job.validation_file,
               estimated_finish=epoch(job.estimated_finish), metadata=job.meta, method=method,
               user_provided_suffix=job.suffix)


def event_view(e: Any) -> JobEvent:
    """`e`: a db.tables.FineTuningEvent."""
    return JobEvent(id=e.id, created_at=epoch(e.created_at) or 0, level=e.level,
                    message=e.message, data=e.data, type=e.type)


def checkpoint_view(c: Any, model_name: str) -> Checkpoint:
    """`c`: a db.tables.FineTuningCheckpoint; `model_name`: the job's fine-tuned model name
    (finetune.jobs.model_name)."""
    return Checkpoint(id=c.id, created_at=epoch(c.created_at) or 0,
                      fine_tuned_model_checkpoint=f"{model_name}:ckpt-step-{c.step}",
                      fine_tuning_job_id=c.job_id, metrics=c.metrics, step_number=c.step)
