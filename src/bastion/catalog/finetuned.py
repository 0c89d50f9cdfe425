"""Fine-tuned models in the catalog: every succeeded job's LoRA adapter, served by the same
llama.cpp engine as its base (continuous batching included), visible to its organisation only.
Synced from the database, so a model trained by any worker appears on every replica."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from bastion.catalog.registry import Catalog, Deployment, engine_options
from bastion.config import Settings
from bastion.db.tables import FineTuningJob
from bastion.engines.base import engine_class

log = logging.getLogger("bastion.catalog")


class FineTunedModels:
    def __init__(self, catalog: Catalog, sessions: sessionmaker[Session],
                 settings: Settings) -> None:
        self.catalog = catalog
        self.sessions = sessions
        self.settings = settings
        self._lock = asyncio.Lock()
        self._failed: set[str] = set()

    def _wanted(self) -> list[FineTuningJob]:
        with self.sessions() as s:
            return list(s.scalars(select(FineTuningJob).where(
                FineTuningJob.status == "succeeded", FineTuningJob.fine_tuned_model.is_not(None),
                FineTuningJob.artifact.is_not(None))))

    def _load(self, job: FineTuningJob) -> Deployment:
        artifact = Path(str(job.artifact))
        full = job.method == "full"  # a whole GGUF; a LoRA is an adapter on the base GGUF
        engine = engine_class("llamacpp")(
            path=artifact if full else Path(job.base_path), name=str(job.fine_tuned_model),
            lora=None if full else artifact, **engine_options(self.settings))
        return Deployment(str(job.fine_tuned_model), engine, owned_by=job.org_id,
                          org_id=job.org_id)

    async def sync(self) -> None:
        """Load new fine-tuned models (engines load off the event loop; the catalog changes on
        it, so requests never see a half-changed catalog)."""
        async with self._lock:
            jobs = await run_in_threadpool(self._wanted)
            for job in jobs:
                name = str(job.fine_tuned_model)
                if self.catalog.has(name) or name in self._failed:
                    continue
                try:
                    dep = await run_in_threadpool(self._load, job)
                except Exception:
                    log.exception("could not load fine-tuned model %s", name)
                    self._failed.add(name)
                    continue
                self.catalog.add(dep)
                log.info("serving fine-tuned model %s for %s", name, job.org_id)

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.sync()
            except Exception:
                log.exception("fine-tuned model sync failed")
            await asyncio.sleep(interval)
