"""What every engine is: capability flags, generation events and the Engine protocol.

Built-in engines register through the `bastion.engines` entry-point group, the same way a
third-party package would, so a new backend is a package, not a patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, AsyncIterator, Protocol, runtime_checkable

ENTRY_POINT_GROUP = "bastion.engines"


@dataclass(frozen=True)
class Capabilities:
    chat: bool = False
    completion: bool = False
    embeddings: bool = False
    vision: bool = False
    adapters: bool = False
    infill: bool = False


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class DecodedImage:
    """An image part after validation: RGB pixels, row-major, width*height*3 bytes."""

    width: int
    height: int
    rgb: bytes


# Stands in prompt_tokens for each token an image occupies, so that len(prompt_tokens) is the
# exact prompt length (usage, budgets, context checks) with or without images. Never decoded:
# llama_decode refuses a negative token id, so a slip shows as an error, not as wrong text.
MEDIA_TOKEN = -1


@dataclass(frozen=True)
class PromptMedia:
    """An image inside a prompt: it fills prompt_tokens[offset:offset + n_tokens] (all
    MEDIA_TOKEN). The payload is the engine's own (llama.cpp: a preprocessed mtmd chunk), made
    by the same engine's render_chat_media, so only that engine ever reads it."""

    offset: int
    n_tokens: int
    payload: Any


@dataclass(frozen=True)
class Prompt:
    """A rendered multimodal prompt: tokens with MEDIA_TOKEN runs, and what fills them."""

    tokens: list[int]
    media: tuple[PromptMedia, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """Tokens in, n independent continuations out."""

    prompt_tokens: list[int]
    params: SamplingParams
    n: int = 1
    request_id: str = ""
    media: tuple[PromptMedia, ...] = ()  # images in the prompt, in order of offset


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]] = field(default_factory=list)


@dataclass(frozen=True)
class Delta:
    """New text of one choice, with the logprobs of the tokens it came from."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    n_tokens: int = 0  # tokens generated since the previous Delta of this choice


@dataclass(frozen=True)
class Finished:
    index: int
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of the prompt's own tokens (the first has none)."""

    tokens: list[TokenLogprob | None]


Event = Delta | Finished | PromptLogprobs


class EngineError(Exception):
    """The engine could not run a request; carries an OpenAI-style error when it has one."""

    def __init__(self, message: str, *, error_type: str = "model_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type
        self.code = code


@dataclass(frozen=True)
class ModelInfo:
    context_length: int
    parameters: str | None
    vocab_size: int
    created: int
    dimensions: int | None = None  # embedding models: the length of their vectors


@runtime_checkable
class Engine(Protocol):
    capabilities: Capabilities
    info: ModelInfo

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]: ...

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...

    # Vision engines only (capabilities.vision): messages whose content may be a list of
    # {"type": "text", "text": str} and {"type": "image", "image": DecodedImage} parts.
    def render_chat_media(self, messages: list[dict[str, Any]]) -> Prompt: ...

    def infill_tokens(self, prefix: str, suffix: str) -> list[int]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]: ...

    def stats(self) -> dict[str, int]: ...

    def abort_all(self, message: str) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class PassthroughEngine(Protocol):
    """An engine that takes OpenAI request bodies as they are (messages, not tokens): a server
    elsewhere renders the prompt. serving/passthrough.py drives it; Bastion still checks,
    counts, admits and bills every request in front of it."""

    passthrough: bool  # True
    capabilities: Capabilities
    info: ModelInfo
    upstream_model: str  # the upstream's own name for the model
    image_tokens: int  # admission's estimate for one image

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    # The exact prompt length ({"messages": ...} or {"prompt": ...}), or None if unknown.
    async def count_prompt(self, payload: dict[str, Any]) -> int | None: ...

    async def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]: ...

    # Connects now (a refusal raises here); the iterator yields the stream's JSON chunks.
    async def open_stream(self, path: str, payload: dict[str, Any]
                          ) -> AsyncIterator[dict[str, Any]]: ...

    def close(self) -> None: ...


def is_passthrough(engine: object) -> bool:
    return getattr(engine, "passthrough", False) is True


def engine_class(name: str) -> type:
    """Find an engine by its entry-point name, as a plugin would be found."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    known = ", ".join(sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)))
    raise LookupError(f"no engine named {name!r} (installed: {known or 'none'})")


def format_parameters(n: int) -> str:
    """268098176 -> '268M', as the Achiral model objects show it."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value >= 10 else f"{value:.1f}{unit}".replace(".0", "")
    return str(n)
