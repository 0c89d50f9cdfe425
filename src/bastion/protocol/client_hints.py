"""The newer chat request fields OpenAI's SDKs send: accepted, so an application written for
OpenAI runs unchanged; most are hints that change nothing here, and a field asking for what
Bastion cannot do (audio output, a faster service tier) is a 400 that says so.

- `service_tier`: every request is served at one tier, answered as "default" in the response
  and every stream chunk. "auto", "default" and "flex" (which only allows slower processing)
  are served so; "scale", "priority" and "fast" ask for capacity Bastion does not have: 400.
- `prompt_cache_key`, `prompt_cache_retention`: caching hints; accepted, ignored.
- `safety_identifier`: recorded nowhere (like `user`); accepted, bounded.
- `reasoning_effort`, `verbosity`: the served models do not reason or take a verbosity;
  accepted, ignored.
- `modalities`: ["text"] only; "audio" is a 400. `audio`: null only.
- `prediction`: a predicted output is a speed hint; accepted (checked), ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from bastion.protocol.common import StrictModel

SERVED_TIER = "default"
UNSERVED_TIERS = ("scale", "priority", "fast")


class PredictionText(StrictModel):
    type: Literal["text"]
    text: str


class Prediction(StrictModel):
    type: Literal["content"]
    content: str | list[PredictionText]


class ChatClientFields(StrictModel):
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    prompt_cache_key: str | None = Field(None, max_length=1024)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: str | None = Field(None, max_length=256)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh",
                              "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    modalities: list[Literal["text", "audio"]] | None = Field(None, max_length=2)
    prediction: Prediction | None = None
    audio: dict[str, Any] | None = None

    @field_validator("service_tier")
    @classmethod
    def _served_tier(cls, v: str | None) -> str | None:
        if v in UNSERVED_TIERS:
            raise ValueError(f"service tier '{v}' is not offered by this server: every request "
                             f"is served at the 'default' tier (send 'auto' or 'default')")
        return v

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and "audio" in v:
            raise ValueError('audio output is not supported: the served models answer in text '
                             'only (send ["text"] or leave modalities out)')
        return v

    @field_validator("audio")
    @classmethod
    def _no_audio(cls, v: dict[str, Any] | None) -> None:
        if v is not None:
            raise ValueError("audio output is not supported: the served models answer in "
                             "text only (send null or leave audio out)")
        return None
