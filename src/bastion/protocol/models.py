"""Model objects: OpenAI's, plus the Achiral document's context_length and parameters."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    context_length: int | None = None
    parameters: str | None = None
    dimensions: int | None = None  # embedding models only


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
