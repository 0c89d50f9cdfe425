"""The Responses API (/v1/responses) as OpenAI's: the request, its input items, and the shapes
of what it returns (items, usage, the response object, its stream events, the item list).

Bastion answers it by translating onto chat completions (services/responses.py); what it cannot
do (built-in tools, background mode, reasoning items, ...) is refused here with a 400 naming
the field, before anything is admitted."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

from bastion.protocol.common import StrictModel

MAX_INPUT_ITEMS = 1024
ItemStatus = Literal["in_progress", "completed", "incomplete"]

# --- input -------------------------------------------------------------------------------


class InputText(StrictModel):
    type: Literal["input_text"]
    text: str


class InputImage(StrictModel):
    type: Literal["input_image"]
    image_url: str = Field(max_length=20 * 1024 * 1024)
    detail: Literal["auto", "low", "high"] = "auto"


class OutputText(StrictModel):
    """An earlier answer's text, sent back as an assistant message's content."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] | None = None


class Refusal(StrictModel):
    type: Literal["refusal"]
    refusal: str


InputPart = Annotated[Union[InputText, InputImage, OutputText, Refusal],
                      Field(discriminator="type")]


class MessageItem(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]
    id: str | None = Field(None, max_length=128)
    status: ItemStatus | None = None
    phase: str | None = None

    @model_validator(mode="after")
    def _parts_fit_role(self) -> "MessageItem":
        if isinstance(self.content, list):
            out = self.role == "assistant"
            for p in self.content:
                if isinstance(p, (OutputText, Refusal)) != out:
                    raise ValueError(
                        f"a {self.role} message takes "
                        f"{'output_text' if out else 'input_text and input_image'} parts, "
                        f"not {p.type}")
        return self


class FunctionCallItem(StrictModel):
    """A call the model made earlier, sent back with its output (function_call_output)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=128)
    name: str = Field(min_length=1, max_length=128)
    arguments: str
    id: str | None = Field(None, max_length=128)
    status: ItemStatus | None = None


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=128)
    output: str | list[InputText]
    id: str | None = Field(None, max_length=128)
    status: ItemStatus | None = None


InputItem = Union[MessageItem, FunctionCallItem, FunctionCallOutputItem]
# Items are validated one by one by their type (services/response_translation.parse_items), so
# that an error names `input[2].content[0]`, not the union's branch.
ITEM_MODELS: dict[str, type[StrictModel]] = {
    "message": MessageItem, "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem}
SUPPORTED_ITEMS = tuple(ITEM_MODELS)

# --- tools and formats -------------------------------------------------------------------


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(StrictModel):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)


ToolChoice = Union[Literal["none", "auto", "required"], NamedFunction]


class TextFormatText(StrictModel):
    type: Literal["text"]


class TextFormatJSONObject(StrictModel):
    type: Literal["json_object"]


class TextFormatJSONSchema(StrictModel):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["json_schema"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[Union[TextFormatText, TextFormatJSONObject, TextFormatJSONSchema],
                       Field(discriminator="type")]


class TextConfig(StrictModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponseStreamOptions(StrictModel):
    include_obfuscation: bool | None = None  # nothing is obfuscated: accepted, no effect

# --- the request -------------------------------------------------------------------------


class ResponseCreateRequest(StrictModel):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stream: bool = False
    stream_options: ResponseStreamOptions | None = None
    store: bool = True
    previous_response_id: str | None = Field(None, min_length=1, max_length=128)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    user: str | None = Field(None, max_length=256)
    parallel_tool_calls: bool | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    text: TextConfig | None = None
    # accepted as OpenAI accepts them; they do not change what Bastion does
    truncation: Literal["disabled"] | None = None
    service_tier: Literal["auto", "default"] | None = None
    safety_identifier: str | None = Field(None, max_length=128)
    prompt_cache_key: str | None = Field(None, max_length=256)
    max_tool_calls: int | None = Field(None, ge=1)
    # refused when asked for (below), accepted when empty
    background: bool | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _items_bastion_runs(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        if len(v) > MAX_INPUT_ITEMS:
            raise ValueError(f"at most {MAX_INPUT_ITEMS} input items are allowed, got {len(v)}")
        for i, item in enumerate(v):
            if isinstance(item, dict):
                kind = item.get("type", "message")  # an easy input message has no type
                if kind not in SUPPORTED_ITEMS:
                    raise ValueError(
                        f"input[{i}] is a '{kind}' item, which Bastion does not support; "
                        f"input items may be {', '.join(SUPPORTED_ITEMS)}")
        return v

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, v: Any) -> Any:
        for i, tool in enumerate(v if isinstance(v, list) else []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tools[{i}] is a '{kind}' tool: Bastion has no built-in "
                                 f"tools, only function tools (type 'function')")
        return v

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice_only(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("type") != "function":
            raise ValueError(f"tool_choice of type '{v.get('type')}' is not supported; use "
                             f"none, auto, required or {{\"type\": \"function\", \"name\": ...}}")
        return v

    @field_validator("background")
    @classmethod
    def _not_background(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("Bastion does not run responses in the background; leave "
                             "background out or false")
        return v

    @field_validator("include")
    @classmethod
    def _nothing_to_include(cls, v: list[str] | None) -> list[str] | None:
        if v:
            raise ValueError(f"Bastion has no extra output to include (got {v[0]!r})")
        return v

    @field_validator("reasoning")
    @classmethod
    def _no_reasoning(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and any(x is not None for x in v.values()):
            raise ValueError("Bastion's models are not reasoning models; leave reasoning out")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (len(v) > 16 or any(len(k) > 64 for k in v)):
            raise ValueError("metadata holds at most 16 pairs, with keys of at most 64 "
                             "characters")
        return v

# --- what it returns ---------------------------------------------------------------------


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [output_text(text)]}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def usage(input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def item_list(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "has_more": has_more,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None}


def deleted(response_id: str) -> dict[str, Any]:
    return {"id": response_id, "object": "response", "deleted": True}
