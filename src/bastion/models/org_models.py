"""An organisation's own models in the catalog: every succeeded fine-tuning job's result (a LoRA
adapter on its base, served by the same llama.cpp engine, continuous batching included) and
every uploaded model (GGUF on llama.cpp, safetensors on PyTorch). Synced from the database, so
a model trained by any worker or uploaded to any replica appears on every replica, and a
deleted one disappears from all of them.

Neither kind is loaded when it is listed: each is a LazyEngine, listed from a profile saved
beside its files and loaded on its first request, within one memory budget (residency.py).
An upload's profile is saved when it is loaded at upload. A fine-tune's is saved by the first
replica to see it: derived from its base model as served (a LoRA or a merged copy of the
base has the base's vocabulary, template and context), its memory estimated from its GGUF
read in a child process (probe.py); only where the base is not served here is the model
loaded once to learn it. A load corrects a derived profile that proves wrong."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from bastion.engines.base import ModelUnavailable
from bastion.engines.llamacpp.probe import ProbeError, probe
from bastion.models.catalog import Catalog, Deployment, build_engine
from bastion.models.residency import PROFILE, LazyEngine, Profile, Residency
from bastion.models.upload_checks import gguf_cost
from bastion.config import ModelSpec, Settings
from bastion.db.tables import CustomModel, FineTuningJob

log = logging.getLogger("bastion.models")

Wanted = dict[tuple[str, str], FineTuningJob | CustomModel]  # (org, model id) -> its record
RETIRE_GRACE_S = 60.0  # requests already running on a deleted model may finish this long


def fine_tuned_profile(artifact: Path) -> Path:
    """Where a fine-tuned model's profile is kept: beside its adapter or GGUF, named after it
    (deleting the model deletes both)."""
    return artifact.with_name(artifact.name + "." + PROFILE)


def save_profile(profile: Profile, path: Path, name: str) -> None:
    try:
        profile.save(path)
    except OSError:
        log.warning("could not save the profile of %s in %s", name, path)


class OrgModels:
    def __init__(self, catalog: Catalog, sessions: sessionmaker[Session],
                 settings: Settings) -> None:
        self.catalog = catalog
        self.sessions = sessions
        self.settings = settings
        self.lock = asyncio.Lock()
        self._failed: set[tuple[str, str]] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._retired: list[Deployment] = []  # out of the catalog, engine not yet closed
        self.residency = Residency(settings.custom_model_memory,
                                   settings.custom_model_idle_seconds)
        self.syncs: dict[str, int] = {}  # syncs run so far, by what asked for them (a metric)
        self._looked: dict[tuple[str, str], float] = {}  # (org, name) -> last lookup on a miss
        self._gguf_costs: dict[Path, int] = {}  # a fine-tune's GGUF -> its estimated memory

    def _wanted(self) -> Wanted:
        with self.sessions() as s:
            jobs = s.scalars(select(FineTuningJob).where(
                FineTuningJob.status == "succeeded", FineTuningJob.fine_tuned_model.is_not(None),
                FineTuningJob.artifact.is_not(None), FineTuningJob.model_deleted_at.is_(None)))
            wanted: Wanted = {(j.org_id, str(j.fine_tuned_model)): j for j in jobs}
            for row in s.scalars(select(CustomModel)):
                wanted[(row.org_id, row.model_id)] = row
            return wanted

    def load(self, record: FineTuningJob | CustomModel) -> Deployment:
        """The engine for a record (slow: call off the event loop), loaded only on its first
        request, unless its profile cannot be had otherwise (an upload from before profiles
        were kept; a fine-tune whose base is not served here)."""
        if isinstance(record, CustomModel):
            path = Path(record.path) / PROFILE
            profile = Profile.read(path)
            lazy = self.uploaded(record, profile.cost if profile else record.bytes, profile)
            if profile is None:  # uploaded before profiles were kept: learn it by loading
                self.residency.load_now(lazy)
            return Deployment(record.model_id, lazy, owned_by=record.org_id,
                              org_id=record.org_id, source="uploaded")
        lazy = self.fine_tuned(record)
        if lazy.profile is None:
            self.residency.load_now(lazy)
        return Deployment(lazy.name, lazy, owned_by=record.org_id, org_id=record.org_id,
                          source="fine-tuned")

    def uploaded(self, record: CustomModel, cost: int,
                 profile: Profile | None = None) -> LazyEngine:
        """An uploaded model's engine, loaded when first needed."""
        path = Path(record.path)
        gguf = record.format == "gguf"
        spec = ModelSpec(path=path / "model.gguf" if gguf else path, id=record.model_id)
        return LazyEngine(record.model_id,
                          lambda: build_engine("llamacpp" if gguf else "torch", spec,
                                               self.settings),
                          cost, self.residency, profile,
                          keep_profile=lambda p: save_profile(p, path / PROFILE, record.model_id))

    def fine_tuned(self, job: FineTuningJob) -> LazyEngine:
        """A fine-tuned model's engine, loaded when first needed: a LoRA adapter on its base's
        GGUF, or a whole GGUF (method "full")."""
        name = str(job.fine_tuned_model)
        artifact = Path(str(job.artifact))
        full = job.method == "full"
        spec = ModelSpec(path=artifact if full else Path(job.base_path), id=name)
        lora = None if full else artifact
        where = fine_tuned_profile(artifact)
        profile = Profile.read(where)
        if profile is None:
            profile = self._derived_profile(job, spec.path, artifact)
            if profile is not None:
                save_profile(profile, where, name)
        cost = profile.cost if profile is not None else self._estimate(spec.path, lora)
        return LazyEngine(name, lambda: build_engine("llamacpp", spec, self.settings, lora=lora),
                          cost, self.residency, profile, kind="fine-tuned",
                          keep_profile=lambda p: save_profile(p, where, name))

    def _estimate(self, weights: Path, lora: Path | None) -> int:
        """Bytes in memory once loaded, from the GGUF read in a child process (the files'
        sizes where it cannot be read: the load will tell). Kept per GGUF, as a sync that
        finds the memory busy tries again."""
        adapter = lora.stat().st_size if lora is not None and lora.exists() else 0
        known = self._gguf_costs.get(weights)
        if known is None:
            try:
                facts = probe(weights, seconds=self.settings.gguf_probe_seconds,
                              memory=self.settings.gguf_probe_memory)
            except (ProbeError, OSError) as exc:
                log.warning("could not read %s to estimate its memory: %s", weights, exc)
                return (weights.stat().st_size if weights.exists() else 0) + adapter
            known = self._gguf_costs[weights] = gguf_cost(
                facts, self.settings.context_per_sequence, self.settings.parallel)
        return known + adapter

    def _derived_profile(self, job: FineTuningJob, weights: Path,
                         artifact: Path) -> Profile | None:
        """The fine-tune's profile from its base as this replica serves it, when the base is
        served from the same GGUF the job trained on; None otherwise."""
        base = self.catalog.get(job.model, job.org_id)
        if base is None or base.source == "fine-tuned":
            return None
        try:  # an uploaded base neither loaded nor profiled raises RuntimeError
            base_path = getattr(base.engine, "path", None)
            if base_path is None or Path(base_path).resolve() != Path(job.base_path).resolve():
                return None
            of = Profile.of(base.engine, 0)
            created = int(artifact.stat().st_mtime)
        except (OSError, RuntimeError):
            return None
        lora = None if job.method == "full" else artifact
        return replace(of, capabilities=replace(of.capabilities, vision=False),  # no projector
                       info=replace(of.info, created=created), path=str(weights),
                       cost=self._estimate(weights, lora))

    async def adopt(self, dep: Deployment) -> None:
        """Serve a model loaded by this replica's upload handler (unless a sync beat it)."""
        async with self.lock:
            if self.catalog.has(dep.id, dep.org_id):
                await run_in_threadpool(dep.engine.close)
            else:
                self.catalog.add(dep)

    def _exists(self, org_id: str, name: str) -> bool:
        """Whether the database holds a model `name` of this organisation (two indexed
        lookups, not the whole catalogue)."""
        with self.sessions() as s:
            if s.scalar(select(CustomModel.id).where(CustomModel.org_id == org_id,
                                                     CustomModel.model_id == name).limit(1)):
                return True
            return s.scalar(select(FineTuningJob.id).where(
                FineTuningJob.org_id == org_id, FineTuningJob.fine_tuned_model == name,
                FineTuningJob.status == "succeeded").limit(1)) is not None

    async def sync_for_miss(self, org_id: str, name: str) -> None:
        """A request named a model this replica does not serve: perhaps one another replica
        has just uploaded or a worker has just fine-tuned. A full sync (every organisation's
        models, under the global lock) runs only when the database holds that very model, and
        the database is asked at most once per `model_lookup_interval` for the same
        organisation and name: a client sending random names costs a dictionary lookup."""
        if len(name) > 256 or not name.isprintable():
            return  # no model is named so (and PostgreSQL refuses a NUL in a query)
        now = time.monotonic()
        interval = self.settings.model_lookup_interval
        key = (org_id, name)
        if now - self._looked.get(key, -interval - 1) < interval:
            return
        if len(self._looked) > 10_000:  # forget the lookups that no longer hold anything back
            self._looked = {k: t for k, t in self._looked.items() if now - t < interval}
        self._looked[key] = now
        if await run_in_threadpool(self._exists, org_id, name):
            await self.sync("miss")

    async def sync(self, reason: str = "periodic") -> None:
        """Load new models and retire deleted ones (engines load off the event loop; the
        catalog changes on it, so requests never see a half-changed catalog)."""
        self.syncs[reason] = self.syncs.get(reason, 0) + 1
        async with self.lock:
            wanted = await run_in_threadpool(self._wanted)
            for key, record in wanted.items():
                org_id, name = key
                if self.catalog.has(name, org_id) or key in self._failed:
                    continue
                try:
                    dep = await run_in_threadpool(self.load, record)
                except ModelUnavailable as exc:  # the memory is busy: the next sync retries
                    log.warning("could not load model %s of %s: %s", name, org_id, exc.message)
                    if exc.code == "model_too_large":  # it never will
                        self._failed.add(key)
                    continue
                except Exception:
                    log.exception("could not load model %s of %s", name, org_id)
                    self._failed.add(key)
                    continue
                self.catalog.add(dep)
                log.info("serving %s model %s for %s", dep.source, name, org_id)
            for dep in self.catalog.all():
                if dep.source != "configured" and (str(dep.org_id), dep.id) not in wanted:
                    self.retire(dep)

    def retire(self, dep: Deployment) -> None:
        """Take a deleted model out of the catalog at once (new requests get 404); close its
        engine once the requests already running on it are done."""
        if self.catalog.remove(dep.id, dep.org_id) is None:
            return
        log.info("retiring %s model %s of %s", dep.source, dep.id, dep.org_id)
        self._retired.append(dep)
        task = asyncio.create_task(self._close_when_idle(dep))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_when_idle(self, dep: Deployment) -> None:
        deadline = time.monotonic() + RETIRE_GRACE_S
        while time.monotonic() < deadline:
            stats = dep.engine.stats()
            if not stats.get("running_sequences") and not stats.get("waiting_requests"):
                break
            await asyncio.sleep(0.2)
        else:
            dep.engine.abort_all(f"The model '{dep.id}' was deleted.")
        self._retired.remove(dep)
        await run_in_threadpool(dep.engine.close)

    async def close(self) -> None:
        """At shutdown: stop waiting for retired models to go idle and close them now (the
        catalog closes the rest)."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for dep in self._retired:
            await run_in_threadpool(dep.engine.close)
        self._retired.clear()

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.sync()
                await run_in_threadpool(self.residency.sweep)
            except Exception:
                log.exception("model sync failed")
            await asyncio.sleep(interval)
