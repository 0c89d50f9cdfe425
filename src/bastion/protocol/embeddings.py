"""Embeddings: request and response, as OpenAI's."""

from __future__ import annotations

import base64
from typing import Any, Iterable, Literal

from pydantic import BaseModel, Field, field_validator

from bastion.protocol.common import StrictModel

MAX_INPUTS = 2048

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(StrictModel):
    model: str = Field(min_length=1, max_length=256)
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)
    # Bastion's own: cut inputs longer than the model's limit instead of refusing them.
    truncate: bool = False

    @field_validator("input")
    @classmethod
    def _check_input(cls, v: EmbeddingInput) -> EmbeddingInput:
        if isinstance(v, str):
            if not v:
                raise ValueError("input must not be an empty string")
            return v
        if not v:
            raise ValueError("input must not be an empty list")
        if isinstance(v[0], int):
            return v  # one token array: its length is checked against the model's limit
        if len(v) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(v)}")
        for i, item in enumerate(v):
            if not item:
                what = "string" if isinstance(item, str) else "token array"
                raise ValueError(f"input[{i}] is an empty {what}")
        return v

    def inputs(self) -> list[str | list[int]]:
        """The four accepted shapes as one list of inputs."""
        v = self.input
        if isinstance(v, str):
            return [v]
        if isinstance(v[0], int):
            return [list(v)]  # type: ignore[arg-type]
        return list(v)  # type: ignore[arg-type]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage

    @classmethod
    def of(cls, vectors: Iterable[Any], *, encoding_format: str, model: str,
           prompt_tokens: int) -> "EmbeddingList":
        """float32 numpy rows on the wire: lists of floats, or base64 of little-endian float32
        (the SDK's default), which decode to the same vectors."""
        as_base64 = encoding_format == "base64"
        data = [Embedding(index=i, embedding=(base64.b64encode(v.astype("<f4").tobytes()).decode()
                                              if as_base64 else v.tolist()))
                for i, v in enumerate(vectors)]
        return cls(data=data, model=model,
                   usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))
