"""The states of a fine-tuning job, owned here: files, uploads and the dashboard ask these
whether a job still needs what it reads."""

from __future__ import annotations

ACTIVE_JOB_STATES = ("validating_files", "queued", "running")
FINISHED_JOB_STATES = ("succeeded", "failed", "cancelled")
