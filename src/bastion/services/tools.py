"""Tool calling on local engines: the tools go into the prompt in one built-in format (Hermes'
`<tool_call>` tags, rendered through the model's own chat template as ordinary turns), the
calls come out grammar-constrained to the functions' parameter schemas, and are parsed back
into OpenAI's `tool_calls`, whole or streamed."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from bastion.engines.base import OutputFormat
from bastion.errors import InvalidRequestError
from bastion.ids import new_id
from bastion.protocol.chat import ChatCompletionRequest, ChatMessage, ToolDefinition
from bastion.services.structured import check_schema

OPEN = "<tool_call>\n"
CLOSE = "\n</tool_call>"
TAG = OPEN.strip()
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {},
                                 "additionalProperties": False}
HEADER = re.compile(r'\{\s?"name"\s?:\s?"((?:[^"\\]|\\.)*)"\s?,\s?"arguments"\s?:\s?')
HOLD = len(CLOSE) + 4  # streamed argument text held back: it may be the call's closing part
# Parallel calls per answer: small models, once calling, tend to call again and again; the
# grammar ends the answer after this many.
MAX_PARALLEL_CALLS = 4


@dataclass(frozen=True)
class ToolSetup:
    """What a request's tools change: the prompt's tool instructions and the constraint."""

    prompt: str
    output: OutputFormat


def tool_setup(body: ChatCompletionRequest, answer: OutputFormat | None) -> ToolSetup | None:
    """None when no tool may be called (no tools, or tool_choice "none"). `answer`: the
    response_format's constraint, which a plain answer keeps to under tool_choice auto."""
    if not body.tools or body.tool_choice == "none":
        return None
    names: set[str] = set()
    for i, tool in enumerate(body.tools):
        fn = tool.function
        if fn.name in names:
            raise InvalidRequestError(f"Two tools are named '{fn.name}'; names must be unique.",
                                      param=f"tools[{i}].function.name", code="invalid_value")
        names.add(fn.name)
        check_schema(_parameters(tool), f"tools[{i}].function.parameters")
    choice = body.tool_choice or "auto"
    tools = body.tools
    if not isinstance(choice, str):
        tools = [t for t in body.tools if t.function.name == choice.function.name]
        if not tools:
            raise InvalidRequestError(
                f"tool_choice names the function '{choice.function.name}', which is not in "
                f"tools.", param="tool_choice", code="invalid_value")
    calls = [_call_schema(t) for t in tools]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    instead = ("" if choice != "auto" else answer.schema if answer is not None else "text")
    output = OutputFormat(schema=json.dumps(schema), open=OPEN, close=CLOSE,
                          count=(MAX_PARALLEL_CALLS if body.parallel_tool_calls is not False
                                 and isinstance(choice, str) else 1),
                          instead=instead)
    return ToolSetup(prompt=_instructions(body.tools, choice), output=output)


def _parameters(tool: ToolDefinition) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else NO_PARAMETERS


def _call_schema(tool: ToolDefinition) -> dict[str, Any]:
    return {"type": "object",
            "properties": {"name": {"const": tool.function.name},
                           "arguments": _parameters(tool)},
            "required": ["name", "arguments"], "additionalProperties": False}


def _instructions(tools: list[ToolDefinition], choice: Any) -> str:
    listed = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools)
    if choice == "required":
        rule = "You must call at least one function."
    elif not isinstance(choice, str):
        rule = f"You must call the function {choice.function.name}."
    else:
        rule = "Call a function only when it helps; otherwise answer directly."
    return ("You can call functions. Their signatures are within <tools></tools>:\n"
            f"<tools>\n{listed}\n</tools>\n{rule} To call a function, answer with a JSON "
            "object holding its name and arguments within <tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <arguments-object>}\n'
            "</tool_call>")


def prompt_messages(messages: list[ChatMessage], rendered: list[dict[str, Any]],
                    setup: ToolSetup | None) -> list[dict[str, Any]]:
    """The conversation as plain turns any chat template takes: an assistant's calls become
    its `<tool_call>` text, tool results a user turn of `<tool_response>`s, and the tools'
    instructions join the system prompt."""
    out: list[dict[str, Any]] = []
    for m, msg in zip(messages, rendered):
        if m.role == "tool":
            text = f"<tool_response>\n{m.text()}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "tool_results": True})
            continue
        if m.role == "assistant" and m.tool_calls:
            calls = "\n".join(
                OPEN + json.dumps({"name": c.function.name,
                                   "arguments": _arguments(c.function.arguments)}) + CLOSE
                for c in m.tool_calls)
            text = msg["content"] if isinstance(msg["content"], str) else ""
            msg = {**msg, "content": (text + "\n" if text else "") + calls}
        out.append(msg)
    for msg in out:
        msg.pop("tool_results", None)
    if setup is not None:
        if out and out[0]["role"] == "system" and isinstance(out[0]["content"], str):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + setup.prompt}
        else:
            out.insert(0, {"role": "system", "content": setup.prompt})
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # the client's own history; shown to the model as it was sent


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str


def parse_calls(text: str) -> tuple[str | None, list[ParsedCall]]:
    """A finished answer's text before the first call, and its calls."""
    start = text.find(TAG)
    if start < 0:
        return text, []
    calls = []
    for raw in text[start:].split(TAG)[1:]:
        body = raw.split(CLOSE.strip())[0]
        head = HEADER.search(body)
        if head is None:
            continue
        if CLOSE.strip() not in raw:
            continue  # cut off by max_tokens: not a call
        calls.append(ParsedCall(call_id(), json.loads(f'"{head.group(1)}"'),
                                _strip_wrapper(body[head.end():])))
    content = text[:start].strip()
    return content or None, calls


def call_id() -> str:
    """OpenAI's form: call_ and 24 letters and digits."""
    return new_id("call", sep="_")


def _strip_wrapper(rest: str) -> str:
    """The arguments' text: the rest of the call less the wrapper's closing brace."""
    rest = rest.rstrip()
    return rest[:-1].rstrip() if rest.endswith("}") else rest


@dataclass
class _StreamedCall:
    id: str
    name: str
    sent: int = 0  # characters of the arguments already sent


@dataclass
class ToolCallStream:
    """Turns one choice's streamed text into content and tool-call deltas as OpenAI streams
    them: a call's first delta has its index, id, type and name; later ones carry argument
    fragments. Recomputed from the whole text at each step (answers are short)."""

    text: str = ""
    content_sent: int = 0
    calls: list[_StreamedCall] = field(default_factory=list)

    def feed(self, piece: str, final: bool = False) -> list[dict[str, Any]]:
        self.text += piece
        deltas: list[dict[str, Any]] = []
        start = self.text.find(TAG)
        end = len(self.text) if start < 0 else start
        if start < 0 and not final:
            end = _safe_end(self.text, TAG)
        if end > self.content_sent:
            content = self.text[self.content_sent:end]
            if start >= 0:
                content = content.rstrip()
            if content:
                deltas.append({"content": content})
            self.content_sent = end
        if start < 0:
            return deltas
        for k, raw in enumerate(self.text[start:].split(TAG)[1:]):
            closed = CLOSE.strip() in raw
            body = raw.split(CLOSE.strip())[0]
            head = HEADER.search(body)
            if head is None:
                continue
            if k == len(self.calls):
                call = _StreamedCall(call_id(), json.loads(f'"{head.group(1)}"'))
                self.calls.append(call)
                deltas.append({"tool_calls": [{"index": k, "id": call.id, "type": "function",
                                               "function": {"name": call.name,
                                                            "arguments": ""}}]})
            call = self.calls[k]
            args = body[head.end():]
            if closed or final:
                args = _strip_wrapper(args)
            else:
                args = args[:max(call.sent, len(args) - HOLD)]
            if len(args) > call.sent:
                deltas.append({"tool_calls": [{"index": k, "function": {
                    "arguments": args[call.sent:]}}]})
                call.sent = len(args)
        return deltas


def _safe_end(text: str, tag: str) -> int:
    """How much text can be sent without sending the start of a tag still being written."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return len(text) - k
    return len(text)
