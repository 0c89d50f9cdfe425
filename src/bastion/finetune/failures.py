"""What a tenant is told when training fails. An exception's own text can hold file paths,
library internals and other tenants' job directories, so it goes to the worker's log only;
the job's error and events carry a code and a message written here, plus the job id to quote
to the administrator. Failures the trainer explains itself (TrainingError) keep their text."""

from __future__ import annotations

from dataclasses import dataclass


class TrainingError(Exception):
    """A failure whose message was written for the tenant (it names their data, never the
    server's files): it is shown as it is."""

    code = "invalid_training_data"


@dataclass(frozen=True)
class PublicError:
    code: str
    message: str

    def as_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "param": None}


def public_error(exc: BaseException, job_id: str) -> PublicError:
    if isinstance(exc, TrainingError):
        return PublicError(exc.code, f"Training failed: {exc}")
    if isinstance(exc, MemoryError):
        return PublicError("training_out_of_memory",
                           "Training failed: the worker ran out of memory. Try a smaller "
                           "batch_size, shorter examples or a smaller base model.")
    return PublicError("training_failed",
                       f"Training failed because of an internal error. The server's "
                       f"administrator can find the details in the fine-tuning worker's log "
                       f"under {job_id}.")
