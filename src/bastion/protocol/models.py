"""Model objects: OpenAI's, plus the Achiral document's context_length and parameters."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


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
