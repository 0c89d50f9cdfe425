"""Tool calling on local engines: the tools go into the prompt (through the chat template
when it renders `tools` itself, else in the template family's built-in format: see
tool_prompts.py), the calls come out grammar-constrained to the functions' parameter schemas
in that family's call syntax, and are parsed back into OpenAI's `tool_calls`, whole or
streamed."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from bastion.engines.base import OutputFormat
from bastion.errors import InvalidRequestError
from bastion.ids import new_id
from bastion.protocol.chat import ChatCompletionRequest, ChatMessage, ToolDefinition
from bastion.services.structured import check_schema
from bastion.services.tool_prompts import (CallSyntax, built_in_messages, instructions,
                                           syntax_of, template_messages)

NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {},
                                 "additionalProperties": False}
# Parallel calls per answer: small models, once calling, tend to call again and again; the
# grammar ends the answer after this many.
MAX_PARALLEL_CALLS = 4
SEPARATORS = " \t\r\n;"  # what may stand between calls (the families' separators)
_JSON = json.JSONDecoder()


@dataclass(frozen=True)
class ToolSetup:
    """What a request's tools change: the prompt (the built-in instructions, or the tools
    for a template that renders them), the constraint and the call syntax to parse."""

    prompt: str
    output: OutputFormat
    syntax: CallSyntax
    tools: list[dict[str, Any]] | None = None  # for a template that renders them


def tool_setup(body: ChatCompletionRequest, answer: OutputFormat | None, *,
               family: str = "chatml", template: bool = False) -> ToolSetup | None:
    """None when no tool may be called (no tools, or tool_choice "none"). `answer`: the
    response_format's constraint, which a plain answer keeps to under tool_choice auto.
    `family`: the chat template's (its call syntax); `template`: it renders `tools`."""
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
    syntax = syntax_of(family)
    calls = [_call_schema(t, syntax.key) for t in tools]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    instead = ("" if choice != "auto" else answer.schema if answer is not None else "text")
    output = OutputFormat(schema=json.dumps(schema), open=syntax.open, close=syntax.close,
                          sep=syntax.sep, calls=True,
                          count=(MAX_PARALLEL_CALLS if body.parallel_tool_calls is not False
                                 and isinstance(choice, str) else 1),
                          instead=instead)
    if template:
        return ToolSetup(prompt="", output=output, syntax=syntax,
                         tools=[t.model_dump(exclude_none=True) for t in body.tools])
    return ToolSetup(prompt=instructions(syntax, body.tools, choice), output=output,
                     syntax=syntax)


def _parameters(tool: ToolDefinition) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else NO_PARAMETERS


def _call_schema(tool: ToolDefinition, key: str) -> dict[str, Any]:
    return {"type": "object",
            "properties": {"name": {"const": tool.function.name}, key: _parameters(tool)},
            "required": ["name", key], "additionalProperties": False}


def prompt_messages(messages: list[ChatMessage], rendered: list[dict[str, Any]],
                    setup: ToolSetup | None, *, family: str = "chatml",
                    template: bool = False) -> list[dict[str, Any]]:
    """The conversation as the engine renders it: for a template that renders tools, with
    its tool calls and tool messages as Hugging Face templates expect; else as plain turns in
    the family's built-in format (see tool_prompts.py)."""
    if template:
        return template_messages(rendered)
    return built_in_messages(messages, rendered, syntax_of(family),
                             setup.prompt if setup is not None else None)


@lru_cache(maxsize=8)
def _header(key: str) -> re.Pattern[str]:
    """The start of a call object up to its arguments (the grammar writes `name` first)."""
    return re.compile(r'\{\s?"name"\s?:\s?"((?:[^"\\]|\\.)*)"\s?,\s?"' + key + r'"\s?:\s?')


def _start(text: str, syntax: CallSyntax) -> int:
    """Where the calls begin (-1: none yet): the first tag, or a bare call's brace."""
    return text.find(syntax.open.strip() or "{")


def _content(text: str, syntax: CallSyntax) -> str:
    """Text before the calls, less the optional prefix before them."""
    text = text.rstrip()
    if syntax.prefix and text.endswith(syntax.prefix):
        text = text[:-len(syntax.prefix)].rstrip()
    return text


@dataclass
class _Found:
    name: str
    arguments: str  # so far, for a call not yet whole
    closed: bool


def _scan(text: str, start: int, syntax: CallSyntax) -> list[_Found]:
    """The calls from `start` on, each with its arguments' exact text (the same characters
    streamed and whole); the last may be unfinished."""
    found: list[_Found] = []
    pos, n = start, len(text)
    open_tag, close_tag = syntax.open.strip(), syntax.close.strip()
    header = _header(syntax.key)
    while True:
        while pos < n and text[pos] in SEPARATORS:
            pos += 1
        if open_tag:
            if not text.startswith(open_tag, pos):
                return found
            pos += len(open_tag)
            while pos < n and text[pos].isspace():
                pos += 1
        head = header.match(text, pos)
        if head is None:
            return found
        name = json.loads(f'"{head.group(1)}"')
        try:
            _, end = _JSON.raw_decode(text, pos)
        except ValueError:  # still being written (or cut off)
            found.append(_Found(name, text[head.end():].rstrip(), False))
            return found
        arguments = text[head.end():end - 1].rstrip()  # less the wrapper's closing brace
        if close_tag:
            after = end
            while after < n and text[after].isspace():
                after += 1
            if not text.startswith(close_tag, after):
                found.append(_Found(name, arguments, False))
                return found
            end = after + len(close_tag)
        found.append(_Found(name, arguments, True))
        pos = end


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str


def parse_calls(text: str, syntax: CallSyntax) -> tuple[str | None, list[ParsedCall]]:
    """A finished answer's text before the first call, and its whole calls (one cut off by
    max_tokens is not a call)."""
    start = _start(text, syntax)
    if start < 0:
        return text, []
    calls = [ParsedCall(call_id(), f.name, f.arguments)
             for f in _scan(text, start, syntax) if f.closed]
    content = _content(text[:start], syntax)
    return content or None, calls


def call_id() -> str:
    """OpenAI's form: call_ and 24 letters and digits."""
    return new_id("call", sep="_")


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

    syntax: CallSyntax
    text: str = ""
    content_sent: int = 0
    calls: list[_StreamedCall] = field(default_factory=list)

    def feed(self, piece: str, final: bool = False) -> list[dict[str, Any]]:
        self.text += piece
        syntax = self.syntax
        deltas: list[dict[str, Any]] = []
        start = _start(self.text, syntax)
        if start >= 0:
            end = len(_content(self.text[:start], syntax))
        elif final:
            end = len(self.text)
        else:  # held back: trailing space (it may precede a call, where it is not content)
            # and the start of a tag or of the prefix still being written
            end = min(_safe_end(self.text, syntax.open.strip()),
                      _safe_end(self.text, syntax.prefix))
            end = len(self.text[:end].rstrip())
            if syntax.prefix and self.text.rstrip().endswith(syntax.prefix):
                end = min(end, len(_content(self.text, syntax)))
        if end > self.content_sent:
            deltas.append({"content": self.text[self.content_sent:end]})
            self.content_sent = end
        if start < 0:
            return deltas
        for k, found in enumerate(_scan(self.text, start, syntax)):
            if k == len(self.calls):
                call = _StreamedCall(call_id(), found.name)
                self.calls.append(call)
                deltas.append({"tool_calls": [{"index": k, "id": call.id, "type": "function",
                                               "function": {"name": call.name,
                                                            "arguments": ""}}]})
            call = self.calls[k]
            if len(found.arguments) > call.sent:
                deltas.append({"tool_calls": [{"index": k, "function": {
                    "arguments": found.arguments[call.sent:]}}]})
                call.sent = len(found.arguments)
        return deltas


def _safe_end(text: str, tag: str) -> int:
    """How much text can be sent without sending the start of a tag still being written."""
    if not tag:
        return len(text)
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return len(text) - k
    return len(text)
