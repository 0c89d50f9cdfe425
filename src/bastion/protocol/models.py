"""Model objects: OpenAI's, plus the Achiral document's context_length and parameters; and the
presenter from a deployment of the catalogue."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field


class Served(Protocol):
    """What `card` reads of a deployment (models.catalog.Deployment); typed loosely so that the
    wire layer needs nothing from the catalogue or the engines."""

    id: str
    owned_by: str
    engine: Any  # its `info` (created, context_length, parameters, dimensions), `capabilities`


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    context_length: int | None = None
    parameters: str | None = None
    dimensions: int | None = None  # embedding models only
    capabilities: list[str] = Field(default_factory=list)  # what the model takes: chat, completion, embeddings, vision...


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# Capabilities fields that say how tools are prompted, not what the model can do.
PROMPTING_DETAILS = frozenset({"tool_family", "tool_template"})


def card(dep: Served) -> ModelCard:
    info = dep.engine.info
    return ModelCard(id=dep.id, created=info.created, owned_by=dep.owned_by,
                     context_length=info.context_length, parameters=info.parameters,
                     dimensions=info.dimensions,
                     capabilities=[k for k, on in asdict(dep.engine.capabilities).items()
                                   if on is True and k not in PROMPTING_DETAILS])
