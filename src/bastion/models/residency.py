"""Which of the organisations' own models are in memory. An uploaded or fine-tuned model is
loaded on its first request, not at start on every replica; all loaded ones together stay
within a memory budget (BASTION_CUSTOM_MODEL_MEMORY, each model counted by an estimate: its
weights as loaded plus its KV cache), so loading one more first unloads the least recently
used idle ones; one idle for BASTION_CUSTOM_MODEL_IDLE_SECONDS is unloaded anyway. A model
with a request running is never unloaded, nor one used in the last GRACE_S (a request between
counting its prompt and generating) or read by a synchronous caller in the last HOLD_S
(fine-tuning checking a training file with its tokenizer); when the budget is all in use, a
request gets a 503 to retry rather than an overcommitted machine.

The catalogue shows a model that is not loaded from its Profile, saved beside its files (an
upload's when it was first loaded, a fine-tune's when first seen: see org_models.py), so
listing models loads nothing."""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from starlette.concurrency import run_in_threadpool

from bastion.engines.base import (BaseEngine, Capabilities, Embeddings, Engine, Event,
                                  GenerationRequest, ModelInfo, ModelUnavailable,
                                  PreparedPrompt, PromptSource)

log = logging.getLogger("bastion.models")

PROFILE = "profile.json"
GRACE_S = 1.0
HOLD_S = 120.0


@dataclass(frozen=True)
class Profile:
    """What the catalogue and the services read of a model without loading it."""

    capabilities: Capabilities
    info: ModelInfo
    max_parallel: int
    architecture: str | None  # a GGUF's, for fine-tuning
    path: str | None  # the engine's own path (a GGUF file; a safetensors model's directory)
    cost: int  # estimated bytes in memory once loaded

    @classmethod
    def of(cls, engine: Engine, cost: int) -> "Profile":
        path = getattr(engine, "path", None)
        return cls(capabilities=engine.capabilities, info=engine.info,
                   max_parallel=engine.max_parallel,
                   architecture=getattr(engine, "architecture", None),
                   path=str(path) if path is not None else None, cost=cost)

    def save(self, path: Path) -> None:
        data = {**asdict(self), "capabilities": asdict(self.capabilities),
                "info": asdict(self.info)}
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(json.dumps(data), "utf-8")
        temp.replace(path)

    @classmethod
    def read(cls, path: Path) -> "Profile | None":
        """None for a model first served before profiles were kept (or a damaged one)."""
        try:
            data = json.loads(path.read_text("utf-8"))
            return cls(capabilities=Capabilities(**data["capabilities"]),
                       info=ModelInfo(**data["info"]), max_parallel=int(data["max_parallel"]),
                       architecture=data["architecture"], path=data["path"],
                       cost=int(data["cost"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


class LazyEngine(BaseEngine):
    """An engine that is loaded when a request needs it, through its Residency."""

    def __init__(self, name: str, load: Callable[[], Engine], cost: int,
                 residency: "Residency", profile: Profile | None = None, *,
                 kind: str = "uploaded",
                 keep_profile: Callable[[Profile], None] | None = None) -> None:
        """`kind`: "uploaded" or "fine-tuned", for the log. `keep_profile`: saves the profile
        learnt on a load when it differs from the one known (a fine-tune's is first derived
        from its base model's)."""
        self.name = name
        self.load = load
        self.cost = cost
        self.residency = residency
        self.profile = profile
        self.kind = kind
        self.keep_profile = keep_profile
        self.engine: Engine | None = None  # set and cleared under the residency's lock
        self.active = 0  # requests using the engine now
        self.last_used = time.monotonic()
        self.held_until = 0.0  # a synchronous caller holds parts of the engine until then
        self.load_lock = threading.Lock()  # one load at a time per model
        self.closed = False  # deleted: never loaded again

    def _known(self) -> Engine | Profile:
        engine = self.engine
        if engine is not None:
            return engine
        if self.profile is None:
            raise RuntimeError(f"{self.name}: neither loaded nor profiled")
        return self.profile

    @property  # type: ignore[override]
    def capabilities(self) -> Capabilities:
        return self._known().capabilities

    @property
    def info(self) -> ModelInfo:
        return self._known().info

    @property  # type: ignore[override]
    def max_parallel(self) -> int:
        return self._known().max_parallel

    @property
    def architecture(self) -> str | None:
        known = self._known()
        return known.architecture if isinstance(known, Profile) \
            else getattr(known, "architecture", None)

    @property
    def path(self) -> Path | None:
        known = self._known()
        path = known.path if isinstance(known, Profile) else getattr(known, "path", None)
        return Path(path) if path is not None else None

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    async def count_prompt(self, source: PromptSource) -> PreparedPrompt:
        async with self.residency.using(self) as engine:
            return await engine.count_prompt(source)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        async with self.residency.using(self) as engine:
            async with aclosing(engine.generate(request)) as events:  # type: ignore[type-var]
                async for event in events:
                    yield event

    async def embed(self, prompt: PreparedPrompt, *,
                    dimensions: int | None = None) -> Embeddings:
        async with self.residency.using(self) as engine:
            return await engine.embed(prompt, dimensions=dimensions)

    def stats(self) -> dict[str, int]:
        engine = self.engine
        return engine.stats() if engine is not None else {}

    def batch_sizes(self) -> dict[int, int]:
        engine = self.engine
        return engine.batch_sizes() if engine is not None else {}

    def abort_all(self, message: str) -> None:
        engine = self.engine
        if engine is not None:
            engine.abort_all(message)

    def close(self) -> None:
        """The model was deleted, or the server stops: unload it for good."""
        self.closed = True
        self.residency.unload(self)

    def __getattr__(self, name: str) -> Any:
        """Anything else of the engine (fine-tuning reads a GGUF model's tokenizer and
        template): loaded if need be, and counted as a use."""
        if name.startswith("_") or name in ("engine", "profile", "residency", "held_until",
                                            "kind", "keep_profile"):
            raise AttributeError(name)
        return getattr(self.residency.hold(self), name)


def _busy(lazy: LazyEngine, now: float) -> bool:
    if lazy.active or now - lazy.last_used < GRACE_S or now < lazy.held_until:
        return True
    engine = lazy.engine
    stats = engine.stats() if engine is not None else {}
    return bool(stats.get("running_sequences") or stats.get("waiting_requests"))


class Residency:
    """The loaded LazyEngines of one server process, within `budget` bytes together."""

    def __init__(self, budget: int, idle_s: float) -> None:
        self.budget = budget
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._resident: dict[int, LazyEngine] = {}  # loaded or loading, by id()
        self._reserved = 0

    @property
    def used(self) -> int:
        return self._reserved

    @asynccontextmanager
    async def using(self, lazy: LazyEngine) -> AsyncIterator[Engine]:
        """The loaded engine, held for the block: it is not unloaded meanwhile."""
        with self._lock:
            lazy.active += 1
            lazy.last_used = time.monotonic()
            engine = lazy.engine
        try:
            if engine is None:
                engine = await run_in_threadpool(self._ensure, lazy)
            yield engine
        finally:
            with self._lock:
                lazy.active -= 1
                lazy.last_used = time.monotonic()

    def hold(self, lazy: LazyEngine) -> Engine:
        """The loaded engine, for a synchronous caller (loads in its thread)."""
        with self._lock:
            lazy.last_used = time.monotonic()
            lazy.held_until = lazy.last_used + HOLD_S
            engine = lazy.engine
        return engine if engine is not None else self._ensure(lazy)

    def load_now(self, lazy: LazyEngine) -> Engine:
        """Load at once (an upload is loaded before it is recorded); slow: off the loop."""
        return self._ensure(lazy)

    def _ensure(self, lazy: LazyEngine) -> Engine:
        with lazy.load_lock:
            with self._lock:
                if lazy.closed:
                    raise ModelUnavailable(f"The model '{lazy.name}' was deleted.",
                                           code="model_deleted")
                if lazy.engine is not None:
                    return lazy.engine
                victims = self._make_room(lazy)
                self._reserved += lazy.cost
                self._resident[id(lazy)] = lazy
            for victim, engine in victims:
                log.info("unloading %s model %s to make room for %s", victim.kind,
                         victim.name, lazy.name)
                engine.close()
            try:
                log.info("loading %s model %s (about %d MiB)", lazy.kind, lazy.name,
                         lazy.cost // 2 ** 20)
                engine = lazy.load()
            except BaseException:
                with self._lock:
                    self._reserved -= lazy.cost
                    self._resident.pop(id(lazy), None)
                raise
            learnt = Profile.of(engine, lazy.cost)
            with self._lock:
                lazy.engine = engine
                lazy.last_used = time.monotonic()
                changed, lazy.profile = lazy.profile != learnt, learnt
            if changed and lazy.keep_profile is not None:
                lazy.keep_profile(learnt)
            return engine

    def _make_room(self, lazy: LazyEngine) -> list[tuple[LazyEngine, Engine]]:
        """Under the lock: detach idle models, least recently used first, until `lazy` fits
        (their engines are the caller's to close); ModelUnavailable when it cannot fit."""
        if lazy.cost > self.budget:
            raise ModelUnavailable(
                f"The model '{lazy.name}' needs about {lazy.cost // 2 ** 20} MiB, more than "
                f"this server keeps for uploaded and fine-tuned models "
                f"({self.budget // 2 ** 20} MiB).",
                code="model_too_large")
        now = time.monotonic()
        idle = sorted((r for r in self._resident.values()
                       if r is not lazy and r.engine is not None and not _busy(r, now)),
                      key=lambda r: r.last_used)
        over = self._reserved + lazy.cost - self.budget
        chosen: list[LazyEngine] = []
        for candidate in idle:
            if over <= 0:
                break
            chosen.append(candidate)
            over -= candidate.cost
        if over > 0:
            raise ModelUnavailable(
                f"The memory for uploaded and fine-tuned models ({self.budget // 2 ** 20} MiB) "
                f"is taken by models serving requests; retry in a moment.",
                code="model_overloaded")
        return [self._detach(victim) for victim in chosen]

    def _detach(self, lazy: LazyEngine) -> tuple[LazyEngine, Engine]:
        """Under the lock: out of the residents (new requests will load it again)."""
        engine = lazy.engine
        assert engine is not None
        lazy.engine = None
        self._reserved -= lazy.cost
        self._resident.pop(id(lazy), None)
        return lazy, engine

    def unload(self, lazy: LazyEngine) -> None:
        """Unload now (deleted, or shutting down); slow: off the loop."""
        with lazy.load_lock:
            with self._lock:
                if lazy.engine is None:
                    return
                _, engine = self._detach(lazy)
            engine.close()

    def sweep(self) -> int:
        """Unload the models idle for idle_s; how many were (slow: off the loop)."""
        now = time.monotonic()
        with self._lock:
            stale = [self._detach(r) for r in list(self._resident.values())
                     if r.engine is not None and not _busy(r, now)
                     and now - r.last_used > self.idle_s]
        for lazy, engine in stale:
            log.info("unloading %s model %s: idle", lazy.kind, lazy.name)
            engine.close()
        return len(stale)
