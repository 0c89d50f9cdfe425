"""Uploading and deleting an organisation's own models. An upload is checked whole (see
upload_checks.py), moved into its own directory by one rename, loaded, and only then recorded,
so a failure at any step leaves nothing behind; a delete refuses while a job still needs the
model."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from bastion.config import Settings
from bastion.db.tables import CustomModel, FineTuningJob, utcnow
from bastion.errors import ConflictError, InvalidRequestError
from bastion.finetune.states import ACTIVE_JOB_STATES
from bastion.files.upload import Upload
from bastion.ids import new_id
from bastion.models import upload_checks as checks

MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODEL_TYPES = ("causal-lm",)
# multipart part -> file name transformers looks for in a model directory
TOKENIZER_PARTS = {"tokenizer": "tokenizer.json", "tokenizer_config": "tokenizer_config.json",
                   "special_tokens_map": "special_tokens_map.json",
                   "generation_config": "generation_config.json",
                   "chat_template": "chat_template.jinja"}


@dataclass(frozen=True)
class Placed:
    format: str  # "safetensors" or "gguf"
    directory: Path
    size: int
    cost: int  # estimated bytes in memory once loaded (residency.py's budget counts it)

    @property
    def weights(self) -> Path:
        return self.directory / ("model.gguf" if self.format == "gguf" else "model.safetensors")


def fields(upload: Upload) -> tuple[str, str]:
    """(model_id, model_type) from the form, as the spec sends them."""
    model_id = upload.fields.get("model_id", "").strip()
    if not model_id:
        raise InvalidRequestError("Missing required parameter: 'model_id'.", param="model_id",
                                  code="missing_required_parameter")
    if not MODEL_ID.fullmatch(model_id):
        raise InvalidRequestError(
            f"Invalid model_id {model_id!r}: use 1 to 128 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit.", param="model_id", code="invalid_value")
    model_type = upload.fields.get("model_type", "causal-lm").strip()
    if model_type not in MODEL_TYPES:
        raise InvalidRequestError(f"Unsupported model_type {model_type!r}; supported: "
                                  f"{', '.join(MODEL_TYPES)}.", param="model_type",
                                  code="invalid_value")
    if "file" not in upload.files:
        raise InvalidRequestError("Missing required parameter: 'file' (model.safetensors or a "
                                  "GGUF file).", param="file", code="missing_required_parameter")
    return model_id, model_type


def place(upload: Upload, target: Path, settings: Settings) -> Placed:
    """Check every part, then move them into `target` (a new directory) in one rename."""
    weights = upload.files["file"].temp
    fmt = checks.sniff(weights)
    parts: dict[str, Path] = {}
    if fmt == "gguf":
        facts = checks.check_gguf(weights, seconds=settings.gguf_probe_seconds,
                                  memory=settings.gguf_probe_memory)
        cost = checks.gguf_cost(facts, settings.context_per_sequence, settings.parallel)
        parts["model.gguf"] = weights
    else:
        for name in ("config", "tokenizer"):
            if name not in upload.files:
                raise InvalidRequestError(
                    f"Missing required parameter: '{name}' ({TOKENIZER_PARTS.get(name, 'config.json')}); "
                    f"a safetensors model needs its config.json and tokenizer.json.",
                    param=name, code="missing_required_parameter")
        tensors = checks.safetensors_header(weights)
        config = checks.read_config(upload.files["config"].temp)
        parameters = checks.check_parameter_floor(config, tensors)
        cost = parameters * 4  # the PyTorch engine runs float32
        checks.check_shapes(config, tensors)
        checks.check_tokenizer(upload.files["tokenizer"].temp, config)
        parts["model.safetensors"] = weights
        parts["config.json"] = upload.files["config"].temp
        for part, filename in TOKENIZER_PARTS.items():
            if part in upload.files:
                parts[filename] = upload.files[part].temp
    if cost > settings.custom_model_memory:
        raise InvalidRequestError(
            f"The model needs about {cost // 2 ** 20} MiB of memory when loaded; this server "
            f"loads uploaded models within {settings.custom_model_memory // 2 ** 20} MiB "
            f"(BASTION_CUSTOM_MODEL_MEMORY).", param="file", code="model_too_large")
    size = sum(p.stat().st_size for p in parts.values())
    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True)
    for filename, temp in parts.items():
        os.replace(temp, partial / filename)
    os.replace(partial, target)
    return Placed(fmt, target, size, cost)


def find(session: Session, org_id: str, model_id: str) -> CustomModel | None:
    return session.scalar(select(CustomModel).where(CustomModel.org_id == org_id,
                                                    CustomModel.model_id == model_id))


def record(org_id: str, model_id: str, model_type: str, placed: Placed) -> CustomModel:
    """The row to insert once the model has loaded."""
    return CustomModel(id=placed.directory.name, org_id=org_id, model_id=model_id,
                       model_type=model_type, format=placed.format, path=str(placed.directory),
                       bytes=placed.size, created_at=utcnow())


def new_directory(root: Path, org_id: str) -> Path:
    return root / org_id / new_id("mdl")


def delete_uploaded(session: Session, org_id: str, model_id: str) -> Path | None:
    """Remove the record (its directory is the caller's to remove). Refused while a
    fine-tuning job still trains on the model or a served LoRA adapter still applies to it."""
    row = find(session, org_id, model_id)
    if row is None:
        return None
    users = session.scalars(select(FineTuningJob.id).where(
        FineTuningJob.org_id == org_id, FineTuningJob.model == model_id,
        FineTuningJob.status.in_(ACTIVE_JOB_STATES))).all()
    if users:
        raise ConflictError(
            f"The model '{model_id}' is the base of fine-tuning job(s) {', '.join(users)} that "
            f"are still running or queued; cancel them or let them finish, then delete it.",
            code="model_in_use")
    adapters = session.scalars(select(FineTuningJob.fine_tuned_model).where(
        FineTuningJob.org_id == org_id, FineTuningJob.model == model_id,
        FineTuningJob.status == "succeeded", FineTuningJob.method != "full",
        FineTuningJob.model_deleted_at.is_(None))).all()
    if adapters:
        raise ConflictError(
            f"The model '{model_id}' is the base of fine-tuned model(s) {', '.join(adapters)}, "
            f"whose LoRA adapters need it; delete them first.", code="model_in_use")
    session.delete(row)
    return Path(row.path)


def delete_fine_tuned(session: Session, org_id: str, model_id: str) -> Path | None:
    """Stop serving a fine-tuned model; its job and events stay, as on OpenAI."""
    job = session.scalar(select(FineTuningJob).where(
        FineTuningJob.org_id == org_id, FineTuningJob.fine_tuned_model == model_id,
        FineTuningJob.model_deleted_at.is_(None)))
    if job is None:
        return None
    session.execute(update(FineTuningJob).where(FineTuningJob.id == job.id)
                    .values(model_deleted_at=utcnow()))
    return Path(job.artifact) if job.artifact else None
