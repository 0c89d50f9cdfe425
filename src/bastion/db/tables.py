"""SQLAlchemy tables: organisations, API keys, usage, files, fine-tuning jobs, uploaded models
(and the quota uploads under way hold), stored responses, the audit log."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, DateTime, ForeignKey, Index, Integer, LargeBinary,
                        String, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    plan: Mapped[str] = mapped_column(String(32), default="dedicated")
    limits_override: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(256))
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    permissions: Mapped[list[str]] = mapped_column(JSON, default=list)
    is_server_admin: Mapped[bool] = mapped_column(default=False)
    rate_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class UsageRecord(Base):
    """One row per request: the billing ledger. (org_id, request_id) is unique, so a retried
    request is billed once; each generation has its own request id (a retry that generates again
    is billed again: idempotent_responses replays a finished one instead)."""

    __tablename__ = "usage_records"
    __table_args__ = (UniqueConstraint("org_id", "request_id", name="uq_usage_org_request"),
                      Index("ix_usage_org_time", "org_id", "created_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128))
    org_id: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    endpoint: Mapped[str] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    # of prompt_tokens, those a prefix cache reused (billed as prompt tokens all the same)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # a fine-tuning job's row (one per job, its id as request_id): tokens x epochs trained
    trained_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    status: Mapped[str] = mapped_column(String(16))
    latency_ms: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class File(Base):
    """An uploaded file; its bytes live in the blob store under `storage_key`."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_org_time", "org_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(512))
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FineTuningJob(Base):
    """A fine-tuning job. A worker owns it while `claim_token` is its own and its heartbeat is
    fresh; every state change is a compare-and-set on (status, claim_token)."""

    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (Index("ix_ftjobs_org_time", "org_id", "created_at"),
                      Index("ix_ftjobs_status", "status"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # billed to this key
    model: Mapped[str] = mapped_column(String(256))
    base_path: Mapped[str] = mapped_column(String(1024))  # the base model's GGUF
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[str] = mapped_column(String(16))
    hyperparameters: Mapped[dict] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    estimated_finish: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    claim_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    artifact: Mapped[str | None] = mapped_column(String(512), nullable=True)
    meta: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the caller's metadata
    # set by DELETE /v1/models/{fine_tuned_model}: the job stays, its model is no longer served
    model_deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                              nullable=True)


class FineTuningEvent(Base):
    __tablename__ = "fine_tuning_events"
    __table_args__ = (Index("ix_ftevents_job", "job_id", "seq"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(String(2048))
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FineTuningCheckpoint(Base):
    __tablename__ = "fine_tuning_checkpoints"
    __table_args__ = (Index("ix_ftckpt_job", "job_id", "step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64))
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CustomModel(Base):
    """A model an organisation uploaded (POST /v1/models); its files live in `path`."""

    __tablename__ = "custom_models"
    __table_args__ = (UniqueConstraint("org_id", "model_id", name="uq_custom_models_org_model"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(String(128))
    model_type: Mapped[str] = mapped_column(String(32))
    format: Mapped[str] = mapped_column(String(16))  # "safetensors" or "gguf"
    path: Mapped[str] = mapped_column(String(1024))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelUploadReservation(Base):
    """An upload under way holds one model and up to `bytes` of its organisation's quota
    (models/quotas.py), so two uploads racing for the last place cannot both have it. Deleted
    when the upload is recorded or fails; one left by a process that died lapses at
    `expires_at`."""

    __tablename__ = "model_upload_reservations"
    __table_args__ = (Index("ix_model_reservations_org", "org_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IdempotentResponse(Base):
    """The first response to a request sent with an Idempotency-Key, replayed to its retries
    instead of generating again (OpenAI's semantics); 'running' while the first is under way.
    `digest` covers the organisation's key, the endpoint and the body, so another request
    reusing the key is a request of its own."""

    __tablename__ = "idempotent_responses"
    __table_args__ = (UniqueConstraint("org_id", "digest", name="uq_idempotent_org_digest"),
                      Index("ix_idempotent_expires", "expires_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    org_id: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # running | done
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    content_type: Mapped[str | None] = mapped_column(String(128), nullable=True)
    body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StoredResponse(Base):
    """A response of the Responses API created with `store` (OpenAI's default): the object as
    returned, the request's own input items (GET …/input_items) and the conversation the
    model saw besides the instructions, which a later `previous_response_id` continues. In the
    database, so every replica can continue it."""

    __tablename__ = "responses"
    __table_args__ = (Index("ix_responses_org_time", "org_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16))
    body: Mapped[dict] = mapped_column(JSON)
    input_items: Mapped[list] = mapped_column(JSON)
    conversation: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEvent(Base):
    """One change an operator may need to account for later (a key made or revoked, a plan
    raised, a model deleted, ...): who made it, from where, what changed. Written in the
    transaction of the change itself, so a change is never without its event. `details` holds
    what changed and never key material (a key is named by its id)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_org_time", "org_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # audit_log-…
    org_id: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(64))  # api_key.created, plan.updated, ...
    target_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    details: Mapped[dict] = mapped_column(JSON)
    actor_type: Mapped[str] = mapped_column(String(16))  # api_key | session | cli | system
    actor_key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    actor_server_admin: Mapped[bool] = mapped_column(default=False)
    ip_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    user_agent: Mapped[str | None] = mapped_column(String(512), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
