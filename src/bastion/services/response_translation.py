"""The Responses API translated onto chat completions, both ways: input items (with the stored
conversation a previous_response_id brings) become chat messages, function tools and text
formats become chat's nested forms; chat's answer becomes output items. Whatever chat learns
(tools, structured output), Responses gets through here; a field chat does not take yet is
chat's 400, its param named as the Responses request names it."""

from __future__ import annotations

import re
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from bastion.errors import InvalidRequestError, validation_error
from bastion.ids import new_id
from bastion.protocol.chat import ChatCompletionRequest
from bastion.protocol.responses import (ITEM_MODELS, FunctionCallItem, FunctionCallOutputItem,
                                        InputItem, MessageItem, NamedFunction,
                                        ResponseCreateRequest, TextFormatJSONSchema,
                                        function_call_item, message_item, output_text)

# chat's names for the Responses fields a param may name
_FIELDS = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format",
           "max_tokens": "max_output_tokens"}


def ident(prefix: str) -> str:
    """An item id in OpenAI's Responses style: msg_…, fc_…, resp_…"""
    return new_id(prefix).replace("-", "_", 1)


def parse_items(raw: list[dict[str, Any]]) -> list[InputItem]:
    """Each input item validated as its own type; an error names `input[i]…` exactly."""
    items: list[InputItem] = []
    for i, item in enumerate(raw):
        model = ITEM_MODELS[item.get("type", "message")]
        try:
            items.append(model.model_validate({"type": "message", **item}))  # type: ignore[arg-type]
        except ValidationError as exc:
            located = [{**e, "loc": ("body", "input", i, *e["loc"])} for e in exc.errors()]
            raise validation_error(RequestValidationError(located)) from None
    return items


def input_items(body: ResponseCreateRequest) -> list[dict[str, Any]]:
    """The request's input as stored items, each with an id (GET …/input_items lists them)."""
    if isinstance(body.input, str):
        return [{"id": ident("msg"), "type": "message", "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": body.input}]}]
    items: list[dict[str, Any]] = []
    for item in parse_items(body.input):
        if isinstance(item, MessageItem):
            if isinstance(item.content, str):
                parts = [output_text(item.content) if item.role == "assistant"
                         else {"type": "input_text", "text": item.content}]
            else:
                parts = [p.model_dump(exclude_none=True) for p in item.content]
            items.append({"id": item.id or ident("msg"), "type": "message", "role": item.role,
                          "status": item.status or "completed", "content": parts})
        elif isinstance(item, FunctionCallItem):
            items.append(function_call_item(item.id or ident("fc"), item.call_id, item.name,
                                            item.arguments, item.status or "completed"))
        elif isinstance(item, FunctionCallOutputItem):
            output = (item.output if isinstance(item.output, str)
                      else [p.model_dump() for p in item.output])
            items.append({"id": item.id or ident("fco"), "type": "function_call_output",
                          "call_id": item.call_id, "output": output,
                          "status": item.status or "completed"})
    return items


def _chat_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in parts:
        if p["type"] == "input_image":
            out.append({"type": "image_url",
                        "image_url": {"url": p["image_url"], "detail": p.get("detail", "auto")}})
        else:
            text = p.get("refusal", "") if p["type"] == "refusal" else p["text"]
            out.append({"type": "text", "text": text})
    if all(p["type"] == "text" for p in out):
        return "".join(p["text"] for p in out)
    return out


def chat_messages(instructions: str | None, conversation: list[dict[str, Any]],
                  origins: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Chat messages for the conversation's items, and for each message the Responses param
    it came from (`origins` gives one per item)."""
    messages: list[dict[str, Any]] = []
    source: list[str] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
        source.append("instructions")
    for item, origin in zip(conversation, origins):
        kind = item["type"]
        if kind == "message":
            content = _chat_content(item["content"])
            if item["role"] == "assistant":
                content = content if isinstance(content, str) else \
                    "".join(p.get("text", "") for p in content)
            messages.append({"role": item["role"], "content": content})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # parallel calls: one message
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item["output"]
            if not isinstance(output, str):
                output = "".join(p.get("text", "") for p in output)
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        source.append(origin)
    return messages, source


def chat_request(body: ResponseCreateRequest, history: list[dict[str, Any]],
                 items: list[dict[str, Any]]) -> tuple[ChatCompletionRequest, list[str]]:
    """The chat request that answers this Responses request (fields are set only when the
    request set them, so a plain request is a plain chat request), and for each of its
    messages the Responses param it came from (for in_responses_terms)."""
    origins = ["previous_response_id"] * len(history) + (
        ["input"] * len(items) if isinstance(body.input, str)
        else [f"input[{i}]" for i in range(len(items))])
    messages, source = chat_messages(body.instructions, history + items, origins)
    if not messages:
        raise InvalidRequestError("input must hold at least one item.", param="input",
                                  code="invalid_value")
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    if body.stream:
        chat["stream_options"] = {"include_usage": True}
    for ours, theirs in (("max_output_tokens", "max_completion_tokens"),
                         ("temperature", "temperature"), ("top_p", "top_p"), ("user", "user"),
                         ("parallel_tool_calls", "parallel_tool_calls")):
        value = getattr(body, ours)
        if value is not None:
            chat[theirs] = value
    if body.tools:
        chat["tools"] = [{"type": "function", "function": {
            k: v for k, v in (("name", t.name), ("description", t.description),
                              ("parameters", t.parameters), ("strict", t.strict))
            if v is not None}} for t in body.tools]
    if isinstance(body.tool_choice, NamedFunction):
        chat["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    elif body.tool_choice is not None:
        chat["tool_choice"] = body.tool_choice
    fmt = body.text.format if body.text else None
    if isinstance(fmt, TextFormatJSONSchema):
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            k: v for k, v in (("name", fmt.name), ("schema", fmt.schema_),
                              ("description", fmt.description), ("strict", fmt.strict))
            if v is not None}}
    elif fmt is not None and fmt.type != "text":
        chat["response_format"] = {"type": fmt.type}
    try:
        return ChatCompletionRequest.model_validate(chat), source
    except ValidationError as exc:
        raise in_responses_terms(validation_error(RequestValidationError(exc.errors())),
                                 source) from None


def in_responses_terms(err: InvalidRequestError, source: list[str]) -> InvalidRequestError:
    """Chat's error about a chat param, renamed to the Responses param it came from."""
    param = err.param or ""
    m = re.match(r"messages\[(\d+)\]", param)
    if m and int(m.group(1)) < len(source):
        new = source[int(m.group(1))]
        if new.startswith("input["):
            new += param[m.end():]
    elif param == "messages":
        new = "input"
    elif param.startswith("tools[") and ".function" in param:
        new = param.replace(".function", "", 1)
    else:
        head = param.split(".")[0].split("[")[0]
        new = _FIELDS.get(head, head) + param[len(head):] if head else param
    if new and new != param:
        err.message = err.message.replace(f"'{param}'", f"'{new}'").replace(
            f": {param}", f": {new}")
        err.param = new
    return err


def output_items(message: dict[str, Any], cut: bool) -> list[dict[str, Any]]:
    """Chat's assistant message as Responses output items: its text as a message item (also
    when empty and nothing else was said), each tool call as a function_call item."""
    items: list[dict[str, Any]] = []
    calls = message.get("tool_calls") or []
    text = message.get("content") or ""
    if text or not calls:
        items.append(message_item(ident("msg"), text, "incomplete" if cut else "completed"))
    for call in calls:
        fn = call.get("function") or {}
        items.append(function_call_item(ident("fc"), call.get("id") or ident("call"),
                                        fn.get("name", ""), fn.get("arguments", ""),
                                        "completed"))
    return items


def incomplete_details(finish_reason: str | None) -> dict[str, str] | None:
    if finish_reason == "length":
        return {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return {"reason": "content_filter"}
    return None
