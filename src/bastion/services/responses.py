"""The Responses API as a translation onto chat completions (response_translation.py): the
request becomes a chat request admitted exactly as chat's (start_chat: model, permissions,
limits, reservation, ledger), chat's answer or chunks become the response or its typed events
(response_stream.py), and a stored response (response_store.py) is what a later
previous_response_id continues."""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from bastion.admission.gate import RequestContext
from bastion.admission.limiter import Ticket
from bastion.errors import InvalidRequestError
from bastion.protocol.responses import (NamedFunction, ResponseCreateRequest, TextFormatJSONSchema,
                                        item_list, usage)
from bastion.services import response_store
from bastion.services.chat import PreparedChat, complete_chat, open_chat_stream
from bastion.services.common import error_payload
from bastion.services.context import Services
from bastion.services.inference import start_chat
from bastion.services.response_stream import StreamTranslator
from bastion.services.response_translation import (chat_request, in_responses_terms,
                                                   incomplete_details, input_items,
                                                   output_items)


@dataclass
class PreparedResponse:
    """A Responses request admitted as its chat request; `id` shares the chat id's suffix, so
    the ledger row (billed under the chat id) is easy to trace."""

    body: ResponseCreateRequest
    org_id: str
    chat: PreparedChat
    items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]
    id: str = ""
    created_at: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = "resp_" + self.chat.id.split("-", 1)[1]


async def start_response(services: Services, ctx: RequestContext,
                         body: ResponseCreateRequest) -> tuple[PreparedResponse, Ticket]:
    org = ctx.principal.org_id
    history = (await response_store.previous(services, org, body.previous_response_id)
               if body.previous_response_id else [])
    items = input_items(body)
    chat_body, source = chat_request(body, history, items)
    try:
        prep, ticket = await start_chat(services, ctx, chat_body)
    except InvalidRequestError as err:
        raise in_responses_terms(err, source) from None
    return PreparedResponse(body, org, prep, items, history + items), ticket


def _tools(body: ResponseCreateRequest) -> list[dict[str, Any]]:
    return [{"type": "function", "name": t.name, "description": t.description,
             "parameters": t.parameters, "strict": t.strict}
            for t in body.tools or []]


def _text(body: ResponseCreateRequest) -> dict[str, Any]:
    fmt = body.text.format if body.text else None
    shown: dict[str, Any] = {"type": "text"}
    if isinstance(fmt, TextFormatJSONSchema):
        shown = {"type": "json_schema", "name": fmt.name, "schema": fmt.schema_,
                 "description": fmt.description, "strict": fmt.strict}
    elif fmt is not None:
        shown = {"type": fmt.type}
    return {"format": shown,
            "verbosity": body.text.verbosity if body.text and body.text.verbosity else "medium"}


def response_object(prep: PreparedResponse, status: str) -> dict[str, Any]:
    """The response as OpenAI shows it, before its output and usage are known."""
    body = prep.body
    choice = body.tool_choice
    return {
        "id": prep.id, "object": "response", "created_at": prep.created_at, "status": status,
        "background": False, "completed_at": None, "error": None, "incomplete_details": None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls, "model": prep.chat.deployment.id, "output": [],
        "parallel_tool_calls": True if body.parallel_tool_calls is None
        else body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
        "store": body.store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": _text(body),
        "tool_choice": choice.model_dump() if isinstance(choice, NamedFunction)
        else choice or "auto",
        "tools": _tools(body), "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": "disabled", "usage": None, "user": body.user,
        "metadata": body.metadata or {}, "safety_identifier": body.safety_identifier,
        "prompt_cache_key": body.prompt_cache_key,
    }


def _usage(chat_usage: dict[str, Any]) -> dict[str, Any]:
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return usage(chat_usage["prompt_tokens"], chat_usage["completion_tokens"], cached)


async def _kept(services: Services, prep: PreparedResponse, response: dict[str, Any]) -> None:
    if prep.body.store:
        await response_store.save(services, prep.org_id, response, prep.items,
                                  prep.conversation)


async def complete_response(services: Services, prep: PreparedResponse,
                            ticket: Ticket) -> dict[str, Any]:
    completion = (await complete_chat(prep.chat, ticket)).model_dump()
    choice = completion["choices"][0]
    details = incomplete_details(choice.get("finish_reason"))
    response = response_object(prep, "incomplete" if details else "completed")
    response.update(output=output_items(choice["message"], cut=details is not None),
                    incomplete_details=details, usage=_usage(completion["usage"]))
    if not details:
        response["completed_at"] = int(time.time())
    await _kept(services, prep, response)
    return response


async def open_response_stream(services: Services, prep: PreparedResponse,
                               ticket: Ticket) -> AsyncIterator[dict[str, Any]]:
    """The typed events, awaited before the response starts (the engine is opened by chat's
    own open_chat_stream, so its refusal is an HTTP error, not an event)."""
    chunks = await open_chat_stream(prep.chat, ticket)
    return _events(services, prep, chunks)


async def _events(services: Services, prep: PreparedResponse,
                  chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    t = StreamTranslator(response_object(prep, "in_progress"))
    for ev in t.start():
        yield ev
    try:
        async with aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                for ev in t.chunk(chunk):
                    yield ev
    except Exception as exc:  # once the first byte is out, errors travel in the stream
        last = t.fail(error_payload(exc)["error"])
    else:
        # chat's last chunk holds the usage (include_usage is asked for in every translation)
        last = t.finish(_usage(t.usage or {"prompt_tokens": prep.chat.prompt.n_tokens,
                                           "completion_tokens": 0}))
    await _kept(services, prep, t.response)
    for ev in last:
        yield ev


async def retrieve(services: Services, org_id: str, response_id: str) -> dict[str, Any]:
    return (await response_store.get(services, org_id, response_id)).body


async def delete(services: Services, org_id: str, response_id: str) -> None:
    await response_store.remove(services, org_id, response_id)


async def list_input_items(services: Services, org_id: str, response_id: str, *,
                           after: str | None, before: str | None, limit: int,
                           order: str) -> dict[str, Any]:
    row = await response_store.get(services, org_id, response_id)
    items, more = response_store.page(row.input_items, after=after, before=before,
                                      limit=limit, order=order)
    return item_list(items, more)
