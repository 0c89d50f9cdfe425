"""Which models exist and which engine serves each; resolves an id or alias or raises."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from bastion.config import EmbeddingModelSpec, ModelSpec, Settings
from bastion.engines.base import Engine, engine_class
from bastion.errors import ModelNotFoundError
from bastion.models.bundled import (BUNDLED_EMBEDDINGS_ID, BUNDLED_ID, SMOLLM2_ID,
                                     bundled_embeddings, bundled_gguf, bundled_smollm2)

log = logging.getLogger("bastion.models")


@dataclass
class Deployment:
    id: str
    engine: Engine
    owned_by: str
    aliases: list[str] = field(default_factory=list)
    truncatable_dimensions: bool = False  # embedding models trained to be shortened
    org_id: str | None = None  # fine-tuned or uploaded: visible to this organisation only
    source: str = "configured"  # "configured" by the server, "fine-tuned" or "uploaded"

    def visible_to(self, org_id: str | None) -> bool:
        return self.org_id is None or self.org_id == org_id


class Catalog:
    """Models keyed by (organisation, id): the server's own under None, an organisation's
    uploads and fine-tunes under its id, so two organisations may each upload a 'my-model'
    and neither ever learns of the other's."""

    def __init__(self) -> None:
        self._deployments: dict[tuple[str | None, str], Deployment] = {}
        self._aliases: dict[str, str] = {}

    def add(self, deployment: Deployment) -> None:
        key = (deployment.org_id, deployment.id)
        if key in self._deployments or (None, deployment.id) in self._deployments \
                or deployment.id in self._aliases:
            raise ValueError(f"model id {deployment.id!r} is configured twice")
        self._deployments[key] = deployment
        for alias in deployment.aliases:
            self.alias(alias, deployment.id)

    def alias(self, alias: str, target: str) -> None:
        if (None, alias) in self._deployments:
            raise ValueError(f"alias {alias!r} collides with a model id")
        self._aliases[alias] = target

    def taken(self, name: str) -> bool:
        """Whether a server-wide model or alias already answers to `name`."""
        return (None, name) in self._deployments or name in self._aliases

    def resolve(self, name: str, org_id: str | None = None) -> Deployment:
        """Never falls back to another model: an unknown name is a 404, and so is another
        organisation's fine-tuned or uploaded model."""
        dep = self.get(name, org_id) or self._deployments.get((None, self._aliases.get(name, "")))
        if dep is None:
            raise ModelNotFoundError(
                f"The model '{name}' does not exist or you do not have access to it.",
                param="model")
        return dep

    def get(self, name: str, org_id: str | None = None) -> Deployment | None:
        """By id only (no aliases): the organisation's own model first, then the server's."""
        found = self._deployments.get((org_id, name)) if org_id is not None else None
        return found or self._deployments.get((None, name))

    def aliases_of(self, model_id: str) -> list[str]:
        """Every other name that resolves to this model (for people choosing one)."""
        return [a for a, target in self._aliases.items() if target == model_id]

    def all(self) -> list[Deployment]:
        return list(self._deployments.values())

    def visible(self, org_id: str | None) -> list[Deployment]:
        return [d for d in self._deployments.values() if d.visible_to(org_id)]

    def has(self, model_id: str, org_id: str | None = None) -> bool:
        return (org_id, model_id) in self._deployments

    def remove(self, model_id: str, org_id: str | None = None) -> Deployment | None:
        dep = self._deployments.pop((org_id, model_id), None)
        if org_id is None:
            for alias in [a for a, t in self._aliases.items() if t == model_id]:
                del self._aliases[alias]
        return dep

    async def start(self) -> None:
        """Engines with work in the event loop (an upstream's connection pool and health
        checks) start here, in the app's lifespan."""
        for dep in self._deployments.values():
            await dep.engine.start()

    async def stop(self) -> None:
        for dep in self._deployments.values():
            await dep.engine.stop()

    def close(self) -> None:
        for dep in self._deployments.values():
            dep.engine.close()


def build_engine(name: str, spec: Any, settings: Settings, **extra: Any) -> Engine:
    """The engine registered under `name` (entry point), built from its own spec; its module
    is imported only now, so PyTorch loads only when a PyTorch-backed model is configured."""
    return engine_class(name).from_spec(spec, settings, **extra)  # type: ignore[attr-defined]


def load_catalog(settings: Settings) -> Catalog:
    """Load every configured model (the bundled ones unless disabled) into its engine. The
    instruction-tuned SmolLM2 comes first: it is the default (first listed, the playground's
    choice); Gemma 3 270M base follows as the fine-tuning base."""
    catalog = Catalog()
    try:
        if settings.serve_bundled_model:
            path = bundled_smollm2()
            log.info("loading bundled model %s from %s", SMOLLM2_ID, path)
            catalog.add(Deployment(SMOLLM2_ID, build_engine(
                "llamacpp", ModelSpec(path=path, id=SMOLLM2_ID), settings),
                owned_by="huggingface"))
            path = bundled_gguf(settings.models_dir)
            log.info("loading bundled model %s from %s", BUNDLED_ID, path)
            catalog.add(Deployment(BUNDLED_ID, build_engine(
                "llamacpp", ModelSpec(path=path, id=BUNDLED_ID), settings), owned_by="google"))
        for spec in settings.models:
            model_id = spec.id or spec.path.stem
            log.info("loading model %s from %s", model_id, spec.path)
            engine = build_engine("llamacpp", spec.model_copy(update={"id": model_id}), settings)
            catalog.add(Deployment(model_id, engine, owned_by=spec.owned_by,
                                   aliases=list(spec.aliases)))
        load_embedding_models(settings, catalog)
        load_upstreams(settings, catalog)
        for alias, target in settings.all_aliases.items():
            if catalog.has(target) and not catalog.has(alias):
                catalog.alias(alias, target)
            elif alias in settings.aliases:  # the defaults name models that may be left out
                log.warning("alias %r not served: %s", alias, "it is a model's id"
                            if catalog.has(alias) else f"no model {target!r} is served")
    except BaseException:
        catalog.close()
        raise
    return catalog


def load_embedding_models(settings: Settings, catalog: Catalog) -> None:
    """Sentence-transformers models (engine `sentence-transformers`)."""
    specs = list(settings.embedding_models)
    if settings.serve_bundled_embeddings:
        specs.insert(0, EmbeddingModelSpec(path=bundled_embeddings(), id=BUNDLED_EMBEDDINGS_ID,
                                           owned_by="sentence-transformers"))
    for spec in specs:
        model_id = spec.id or spec.path.name
        log.info("loading embedding model %s from %s", model_id, spec.path)
        engine = build_engine("sentence-transformers", spec.model_copy(update={"id": model_id}),
                              settings)
        catalog.add(Deployment(model_id, engine, owned_by=spec.owned_by,
                               aliases=list(spec.aliases),
                               truncatable_dimensions=spec.truncatable_dimensions))


def load_upstreams(settings: Settings, catalog: Catalog) -> None:
    """Models that OpenAI-compatible servers elsewhere serve, through the `upstream` engine;
    nothing connects before the lifespan starts."""
    for spec in settings.upstreams:
        log.info("upstream model %s: %d replica(s)", spec.id, len(spec.urls))
        catalog.add(Deployment(spec.id, build_engine("upstream", spec, settings),
                               owned_by=spec.owned_by, aliases=list(spec.aliases)))
