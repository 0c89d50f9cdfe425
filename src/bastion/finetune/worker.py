"""The fine-tuning worker: claims queued jobs, trains them, exports the model and records every
step. Runs as `bastion worker`, and as a child process of `bastion serve` by default."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from bastion.config import Settings
from bastion.db.tables import File, FineTuningCheckpoint, FineTuningJob, utcnow
from bastion.files.store import BlobStore
from bastion.finetune import events, queue
from bastion.finetune.failures import public_error
from bastion.finetune.jobs import model_name
from bastion.ids import new_id

log = logging.getLogger("bastion.worker")


class JobReporter:
    """Trainer callbacks: events and checkpoints into the database, and one heartbeat per step
    that also tells whether the job is still ours (a cancel shows up here)."""

    def __init__(self, sessions: sessionmaker[Session], claim: queue.Claim,
                 stop: threading.Event, lease_s: float) -> None:
        self.sessions = sessions
        self.claim = claim
        self.stop = stop
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.lost = False
        self._done = threading.Event()
        self._beat = threading.Thread(target=self._beating, args=(max(0.5, lease_s / 4),),
                                      name=f"heartbeat-{claim.job_id}", daemon=True)
        self._beat.start()

    def _beating(self, every: float) -> None:
        """Heartbeats while the model loads or a long step runs, not only between steps."""
        while not self._done.wait(every):
            try:
                if not queue.heartbeat(self.sessions, self.claim):
                    self.lost = True
                    return
            except Exception as exc:  # the database is briefly away: the lease has slack
                log.warning("heartbeat failed: %s", exc)

    def close(self) -> None:
        self._done.set()
        self._beat.join()

    def keep_going(self, step: int, total: int, tokens: int) -> bool:
        if self.first_step is None:
            self.first_step, self.started = step - 1, time.monotonic()
        done = step - self.first_step
        per_step = (time.monotonic() - self.started) / max(done, 1)
        finish = utcnow() + timedelta(seconds=per_step * (total - step))
        if self.lost or not queue.heartbeat(self.sessions, self.claim, trained_tokens=tokens,
                                            estimated_finish=finish):
            self.lost = True
            return False
        return not self.stop.is_set()

    def message(self, text: str, *, data: dict[str, Any] | None = None) -> None:
        with self.sessions.begin() as s:
            events.add(s, self.claim.job_id, text, data=data)

    def metrics(self, data: dict[str, Any]) -> None:
        parts = [f"Step {data['step']}/{data['total_steps']}"]
        if "train_loss" in data:
            parts.append(f"training loss={data['train_loss']:.4f}")
        if "valid_loss" in data:
            parts.append(f"validation loss={data['valid_loss']:.4f}")
        with self.sessions.begin() as s:
            events.add(s, self.claim.job_id, ", ".join(parts), type="metrics", data=data)

    def checkpoint(self, step: int, metrics: dict[str, float], path: Path) -> None:
        with self.sessions.begin() as s:
            s.add(FineTuningCheckpoint(id=new_id("ftckpt"), job_id=self.claim.job_id, step=step,
                                       metrics=metrics, path=str(path), created_at=utcnow()))


class Worker:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.blobs = BlobStore(settings.files_dir)
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.stop = threading.Event()

    def run_forever(self) -> None:
        log.info("fine-tuning worker %s polling every %.1fs", self.id,
                 self.settings.worker_poll_seconds)
        while not self.stop.is_set():
            try:
                queue.reclaim_stale(self.sessions, self.settings.worker_lease_seconds)
                claim = queue.claim_next(self.sessions, self.id)
            except Exception as exc:  # the database is away for a moment: try again later
                log.warning("the job queue is unreachable (%s); retrying", exc)
                claim = None
            if claim is None:
                self.stop.wait(self.settings.worker_poll_seconds)
                continue
            self.run_job(claim)

    def run_job(self, claim: queue.Claim) -> None:
        from bastion.finetune.trainer import Stopped, TrainSpec, train

        with self.sessions() as s:
            job = s.get(FineTuningJob, claim.job_id)
            assert job is not None
            files = {f.id: self.blobs.path(f.storage_key)
                     for f in s.query(File).filter(File.id.in_(
                         [job.training_file, job.validation_file or ""]))}
        spec = TrainSpec(base_gguf=Path(job.base_path), training=files[job.training_file],
                         validation=files.get(job.validation_file or ""), method=job.method,
                         hyperparameters=job.hyperparameters, seed=job.seed,
                         workdir=self.settings.jobs_dir / job.id,
                         threads=self.settings.training_threads,
                         cache_root=self.settings.models_dir)
        reporter = JobReporter(self.sessions, claim, self.stop, self.settings.worker_lease_seconds)
        log.info("training %s (%s on %s)", job.id, job.method, job.model)
        try:
            result = train(spec, reporter)
        except Stopped:
            if not reporter.lost:  # shutting down: let another worker take it over
                queue.release(self.sessions, claim, "The worker is shutting down")
            log.info("stopped %s", job.id)
            return
        except Exception as exc:  # details in the log; the tenant gets a code and a message
            log.error("job %s failed: %s: %s", job.id, type(exc).__name__, exc)
            log.debug("job %s failed", job.id, exc_info=True)
            public = public_error(exc, job.id)
            queue.finish(self.sessions, claim, "failed", public.message, level="error",
                         error=public.as_dict())
            return
        finally:
            reporter.close()
        name = model_name(job)
        if queue.finish(self.sessions, claim, "succeeded", f"New fine-tuned model created: {name}",
                        "The job has successfully completed", fine_tuned_model=name,
                        artifact=str(result.adapter), trained_tokens=result.trained_tokens):
            log.info("job %s succeeded: %s", job.id, name)
