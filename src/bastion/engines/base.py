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
    """What an engine can do; services check these, never an engine's class."""

    chat: bool = False
    completion: bool = False
    embeddings: bool = False
    vision: bool = False
    constrained: bool = False  # keeps output to a JSON Schema (OutputFormat)
    adapters: bool = False
    infill: bool = False
    tools: bool = False  # the service may prompt it for tool calls and constrain them
    # How a tools request is prompted and parsed (see services/tools.py): the call syntax of
    # the chat template's family ("chatml" = Hermes' <tool_call> tags, "llama3", "gemma"), or
    # "" for an engine that forwards `tools` to a server that does tool calling itself (an
    # upstream); `tool_template`: the chat template renders `tools` and tool messages itself.
    tool_family: str = "chatml"
    tool_template: bool = False


@dataclass(frozen=True)
class OutputFormat:
    """Output an engine must keep to, token by token: a JSON value matching `schema`, or,
    when `open` is set, one to `count` such values, each between `open` and `close`, one per
    line (parallel tool calls). `instead`, with `open`, is what may come in place of
    the wrapped values: "" nothing, "text" free text without `open`'s first character (the
    model chooses: tool_choice auto), or a JSON Schema the answer then matches.

    `calls`: the values are tool calls, each between `open` and `close` (which may then be
    empty: bare JSON calls), `sep` between them; `instead` "text" is then free text without
    the first character of a call.

    The fields are text, so the format is hashable and its compiled grammar cached by it.
    `wire` is the request's own field (response_format) for an engine that forwards the
    request instead of enforcing it."""

    schema: str
    wire: str = "null"
    open: str = ""
    close: str = ""
    count: int = 1
    instead: str = ""
    sep: str = "\n"
    calls: bool = False


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
    output: OutputFormat | None = None  # constrained (structured) output
    # The wire names of the parameters the client set: an engine that forwards the request
    # (an upstream) sends only these, so the server there keeps its own defaults.
    explicit: frozenset[str] = frozenset()


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
class ChatPrompt:
    """A conversation to render. Each message: role, content (text, or a list of
    {"type": "text", "text"} and {"type": "image", "image": DecodedImage, "detail"} parts) and
    an optional name; assistant messages may have `tool_calls` and tool messages
    `tool_call_id`, as OpenAI's. `tools`: OpenAI function tools, given only to a template that
    renders them itself (Capabilities.tool_template) or a server that takes them (upstream),
    with `tool_options` (tool_choice, parallel_tool_calls as the client sent them)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextPrompt:
    """A completion prompt: text or token ids, with a suffix for fill-in-the-middle."""

    text: str | list[int]
    suffix: str | None = None
    param: str = "prompt"  # where it sits in the request, for error messages
    pieces: bool = False  # also the text of each prompt token (echo with logprobs)


@dataclass(frozen=True)
class EmbeddingPrompt:
    """Inputs to embed (text or token ids), with where each sits in the request."""

    inputs: list[str | list[int]]
    params: list[str]
    truncate: bool = False  # cut an input that is too long instead of refusing it


PromptSource = ChatPrompt | TextPrompt | EmbeddingPrompt


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt as its engine will run it, made by that engine's count_prompt and handed back
    to it in generate/embed: tokens for a local engine, the engine's own payload (an
    upstream's messages or text) otherwise. `n_tokens` is exact, or an upper bound when not
    `exact` (admission reserves it; an estimate never refuses on context)."""

    n_tokens: int
    exact: bool = True
    tokens: list[int] = field(default_factory=list)
    media: tuple[PromptMedia, ...] = ()
    payload: Any = None
    text: str | None = None  # the prompt's text (echo), where the engine knows it
    pieces: list[str] | None = None  # each prompt token's text, when asked for


@dataclass(frozen=True)
class GenerationRequest:
    """A prepared prompt in, n independent continuations out."""

    prompt_tokens: list[int]
    params: SamplingParams
    n: int = 1
    request_id: str = ""
    media: tuple[PromptMedia, ...] = ()  # images in the prompt, in order of offset
    payload: Any = None  # the engine's own part of the prompt (PreparedPrompt.payload)
    # Whether the caller relays events as they come; an engine that answers a whole request
    # more cheaply or more exactly (an upstream's non-streamed call) may do so when False.
    stream: bool = True
    # Who may share cached prompt prefixes with this request (the organisation): an engine
    # with a prefix cache reuses only KV cached under the same key, because how fast a prompt
    # is answered tells whether someone else sent its prefix.
    cache_key: str = ""

    @classmethod
    def of(cls, prompt: PreparedPrompt, params: SamplingParams, n: int = 1,
           stream: bool = True, cache_key: str = "") -> "GenerationRequest":
        return cls(prompt_tokens=prompt.tokens, params=params, n=n, media=prompt.media,
                   payload=prompt.payload, stream=stream, cache_key=cache_key)


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
    # Tool-call deltas as OpenAI streams them (index, id, type, function name / arguments),
    # from an engine whose server parsed the calls itself (an upstream).
    tool_calls: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Finished:
    index: int
    finish_reason: str
    completion_tokens: int
    cached_tokens: int = 0  # the request's prompt tokens that were not prefilled (prefix cache)


@dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of the prompt's own tokens (the first has none)."""

    tokens: list[TokenLogprob | None]


@dataclass(frozen=True)
class Usage:
    """The engine's own count of a whole request (an upstream's usage report), sent after its
    Finished events, whose completion_tokens already add up to completion_tokens: consumers
    take prompt_tokens from here in place of the prompt's (possibly estimated) count."""

    prompt_tokens: int
    completion_tokens: int


Event = Delta | Finished | PromptLogprobs | Usage


@dataclass(frozen=True)
class Embeddings:
    """Vectors (float32, one row per input) and the input tokens they cost."""

    vectors: Any  # numpy.ndarray
    prompt_tokens: int


# --- the engine error family: transport-free; errors.py maps each class to its HTTP error ---
class EngineError(Exception):
    """The engine could not run a request (as such: a model failure). Each class names its
    `kind`, the key of errors.py's table (which sits below the engines and so cannot import
    these classes)."""

    kind = "failure"

    def __init__(self, message: str, *, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class ModelInputError(EngineError):
    """The request's input is wrong for this model (a template refuses the messages, a token
    id outside the vocabulary, an input too long): the client's to fix."""

    kind = "input"


class ModelUnavailable(EngineError):
    """The model cannot take requests now (shutting down, no upstream replica reachable)."""

    kind = "unavailable"


class ModelFailure(EngineError):
    """The model failed while running a request it had accepted."""


class UpstreamRefused(ModelInputError):
    """An upstream server refused the request as the client's fault (a 4xx): relayed with
    the upstream's own status."""

    kind = "refused"

    def __init__(self, message: str, *, status: int, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message, code=code, param=param)
        self.status = status


class UpstreamFailure(EngineError):
    """An upstream server failed, refused this server's credentials or answered nonsense."""

    kind = "bad_gateway"


@dataclass(frozen=True)
class ModelInfo:
    context_length: int
    parameters: str | None
    vocab_size: int  # 0 where unknown (an upstream)
    created: int
    dimensions: int | None = None  # embedding models: the length of their vectors


@runtime_checkable
class Engine(Protocol):
    """What every engine is. Built from its own spec by `from_spec(spec, settings)`, found by
    its entry-point name (engine_class)."""

    capabilities: Capabilities
    info: ModelInfo
    max_parallel: int  # sequences it runs at once for one request (bounds n)

    async def start(self) -> None: ...  # in the app's event loop, after loading

    async def stop(self) -> None: ...

    # Counts (and renders, tokenises, checks) a prompt: ModelInputError if it cannot run.
    async def count_prompt(self, source: PromptSource) -> PreparedPrompt: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]: ...

    # Starts a generation: a refusal that comes before any output (an upstream's HTTP
    # status, no replica up) raises here; the iterator then yields the events.
    async def open(self, request: GenerationRequest) -> AsyncIterator[Event]: ...

    async def embed(self, prompt: PreparedPrompt, *,
                    dimensions: int | None = None) -> Embeddings: ...

    def stats(self) -> dict[str, int]: ...

    def batch_sizes(self) -> dict[int, int]: ...  # inputs per forward pass -> passes so far

    def abort_all(self, message: str) -> None: ...

    def close(self) -> None: ...


class BaseEngine:
    """Defaults for what an engine does not do, so that each engine writes only its own."""

    capabilities = Capabilities()
    max_parallel = 1

    async def start(self) -> None:
        """Nothing to start in the event loop."""

    async def stop(self) -> None:
        """Nothing to stop in the event loop."""

    async def count_prompt(self, source: PromptSource) -> PreparedPrompt:
        raise ModelInputError("This model does not take this kind of input.",
                              code="model_not_supported", param="model")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        raise ModelInputError("This model does not generate text.", code="model_not_supported",
                              param="model")
        yield  # pragma: no cover  (makes this an async generator)

    async def open(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Local engines queue the request when it is first read: nothing can refuse it here."""
        return self.generate(request)

    async def embed(self, prompt: PreparedPrompt, *,
                    dimensions: int | None = None) -> Embeddings:
        raise ModelInputError("This model does not make embeddings.",
                              code="model_not_supported", param="model")

    def stats(self) -> dict[str, int]:
        return {}

    def batch_sizes(self) -> dict[int, int]:
        """How many forward passes ran each number of inputs together, for an engine that
        batches requests (the metrics' histogram); empty for one that does not count them."""
        return {}

    def abort_all(self, message: str) -> None:
        """Nothing runs long enough to abort."""

    def close(self) -> None:
        """Nothing to release."""


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
