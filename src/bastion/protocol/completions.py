"""Legacy text completions: request and response, as OpenAI's."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from bastion.protocol.common import FinishReason, ResponseFormat, SamplingFields, Usage

MAX_PROMPTS = 64

PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=128)
    max_tokens: int | None = Field(16, ge=1)
    # Not in OpenAI's legacy API; vLLM accepts it here too, and so does Bastion.
    response_format: ResponseFormat | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: PromptInput) -> PromptInput:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if len(v) > MAX_PROMPTS and not isinstance(v[0], int):
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
            if isinstance(v[0], list) and any(not p for p in v):
                raise ValueError("token arrays in prompt must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """Normalise the four accepted prompt shapes to a list of prompts."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
