"""Chat and completions on a passthrough engine (an upstream server).

Bastion does in front what it does for a local model: image parts decoded and checked (and
forwarded only as re-encoded data: URIs, so the upstream never fetches a URL), the prompt
counted (the upstream's /tokenize, or a safe upper bound), budgets and plan limits checked,
admission. The request then goes upstream as an OpenAI body with an explicit max_tokens (so
the reservation holds), and the ticket settles to the upstream's own usage report.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from bastion.models.catalog import Deployment
from bastion.config import Settings
from bastion.engines.base import DecodedImage, PassthroughEngine
from bastion.errors import BadGatewayError
from bastion.ids import new_id
from bastion.protocol.chat import ChatCompletion, ChatCompletionRequest, ImagePart
from bastion.protocol.completions import Completion, CompletionRequest
from bastion.admission.limiter import Limiter, Ticket
from bastion.services.common import completion_budget, metered
from bastion.tenancy.keys import Principal

# The upper bound when the upstream cannot count: a token is at least one byte of text, and a
# chat template adds at most this much around the messages and per message.
TEMPLATE_TOKENS = 64
MESSAGE_TOKENS = 16
PROMPT_TOKENS = 8  # BOS and the like around a completion prompt
GUESS_FLOOR = 256  # max_tokens when an estimated prompt may already fill the context
# Sent only when the client asked; the rest are Bastion's to keep (privacy: `user`).
DROPPED = {"model", "max_tokens", "max_completion_tokens", "stream", "stream_options",
           "metadata", "store", "user", "messages"}


@dataclass
class UpstreamCall:
    """A checked, counted request for an upstream: what admission needs and what is sent."""

    body: ChatCompletionRequest | CompletionRequest
    deployment: Deployment
    path: str  # under the replica's base URL: chat/completions or completions
    payload: dict[str, Any]
    prompt_estimate: int
    choices: int  # n x prompts
    max_tokens: int
    id: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def estimate(self) -> int:
        return self.prompt_estimate + self.choices * self.max_tokens

    @property
    def engine(self) -> PassthroughEngine:
        return self.deployment.engine  # type: ignore[return-value]


def _budget(prompt: int, exact: bool, requested: int | None, context: int, default: int,
            param: str, what: str) -> int:
    """max_tokens to send. An exact count gets the local models' checks and messages; an
    estimate (an upper bound) cannot refuse on context: the upstream will, if it must."""
    if exact:
        return completion_budget(prompt_len=prompt, requested=requested, context=context,
                                 default=default, param=param, what=what)
    if requested is not None:
        return requested
    room = context - prompt
    return min(default, room) if room >= 1 else min(default, GUESS_FLOOR)


def _png_uri(image: DecodedImage) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (image.width, image.height), image.rgb).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


async def _messages(body: ChatCompletionRequest, images: dict[tuple[int, int], DecodedImage]
                    ) -> list[dict[str, Any]]:
    """The messages as sent upstream: every image the decoded, checked pixels as a PNG."""
    uris = dict(zip(images, await run_in_threadpool(lambda: [_png_uri(im) for im in
                                                             images.values()])))
    out: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        if isinstance(m.content, list):
            msg["content"] = [
                {"type": "image_url", "image_url": {"url": uris[(i, j)],
                                                    "detail": p.image_url.detail}}
                if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
                for j, p in enumerate(m.content)]
        else:
            msg["content"] = m.content or ""
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


def _chat_upper_bound(messages: list[dict[str, Any]], image_tokens: int) -> int:
    total = TEMPLATE_TOKENS
    for m in messages:
        total += MESSAGE_TOKENS + len(m.get("name", "").encode())
        parts = m["content"] if isinstance(m["content"], list) else [
            {"type": "text", "text": m["content"]}]
        for p in parts:
            total += image_tokens if p["type"] == "image_url" else len(p["text"].encode())
    return total


def _payload(body: ChatCompletionRequest | CompletionRequest, engine: PassthroughEngine,
             max_tokens: int) -> dict[str, Any]:
    payload = body.model_dump(exclude_unset=True, exclude=DROPPED)
    payload.update(model=engine.upstream_model, max_tokens=max_tokens)
    return payload


async def prepare_chat(body: ChatCompletionRequest, deployment: Deployment, settings: Settings,
                       principal: Principal, limiter: Limiter,
                       images: dict[tuple[int, int], DecodedImage]) -> UpstreamCall:
    engine: PassthroughEngine = deployment.engine  # type: ignore[assignment]
    messages = await _messages(body, images)
    count = None if images else await engine.count_prompt(
        {"messages": messages, "add_generation_prompt": True})
    prompt = count if count is not None else _chat_upper_bound(messages, engine.image_tokens)
    max_tokens = _budget(prompt, count is not None, body.completion_limit,
                         engine.info.context_length, settings.default_max_tokens, "messages",
                         "messages")
    max_tokens = limiter.max_tokens_for(principal, prompt, body.n, body.completion_limit,
                                        default=max_tokens, param="messages")
    payload = _payload(body, engine, max_tokens)
    payload["messages"] = messages
    return UpstreamCall(body, deployment, "chat/completions", payload, prompt, body.n,
                        max_tokens, new_id("chatcmpl"))


async def prepare_completion(body: CompletionRequest, deployment: Deployment,
                             settings: Settings, principal: Principal,
                             limiter: Limiter) -> UpstreamCall:
    engine: PassthroughEngine = deployment.engine  # type: ignore[assignment]
    prompts = body.prompts()

    async def count(p: str | list[int]) -> tuple[int, bool]:
        if isinstance(p, list):
            return len(p), True
        if body.suffix is None and (n := await engine.count_prompt({"prompt": p})) is not None:
            return n, True
        return len(p.encode()) + len((body.suffix or "").encode()) + PROMPT_TOKENS, False

    counts = await asyncio.gather(*(count(p) for p in prompts))
    budgets = [_budget(n, exact, body.max_tokens, engine.info.context_length,
                       settings.default_max_tokens,
                       "prompt" if len(prompts) == 1 else f"prompt[{i}]", "prompt")
               for i, (n, exact) in enumerate(counts)]
    prompt = sum(n for n, _ in counts)
    max_tokens = limiter.max_tokens_for(principal, prompt, body.n * len(prompts),
                                        body.max_tokens, default=min(budgets), param="prompt")
    payload = _payload(body, engine, max_tokens)
    return UpstreamCall(body, deployment, "completions", payload, prompt,
                        body.n * len(prompts), max_tokens, new_id("cmpl"))


def _settle_usage(ticket: Ticket, call: UpstreamCall, usage: Any, generated: int) -> None:
    """The upstream's usage when it reports one; else the prompt's estimate and the tokens
    seen (streamed chunks, one token each on vLLM and llama.cpp; or the reservation)."""
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        ticket.prompt_tokens = usage["prompt_tokens"]
        ticket.completion_tokens = int(usage.get("completion_tokens") or 0)
    else:
        ticket.prompt_tokens = call.prompt_estimate
        ticket.completion_tokens = generated


def _usage(ticket: Ticket) -> dict[str, int]:
    return {"prompt_tokens": ticket.prompt_tokens, "completion_tokens": ticket.completion_tokens,
            "total_tokens": ticket.prompt_tokens + ticket.completion_tokens}


def _finish(reason: Any) -> str:
    """OpenAI's finish reasons that Bastion's schema knows; anything else ended normally."""
    return reason if reason in ("stop", "length") else "stop"


async def complete(call: UpstreamCall, ticket: Ticket) -> ChatCompletion | Completion:
    async with metered(ticket, 0):
        _settle_usage(ticket, call, None, 0)  # what a request cut off here is billed
        data = await call.engine.post(call.path, {**call.payload, "stream": False})
        _settle_usage(ticket, call, data.get("usage"), call.choices * call.max_tokens)
    choices = data.get("choices") if isinstance(data.get("choices"), list) else []
    common = {"id": call.id, "created": call.created, "model": call.deployment.id,
              "usage": _usage(ticket)}
    try:
        if call.path == "completions":
            return Completion.model_validate({**common, "choices": [
                {"index": c.get("index", k), "text": c.get("text") or "",
                 "logprobs": c.get("logprobs"), "finish_reason": _finish(c.get("finish_reason"))}
                for k, c in enumerate(choices)]})
        return ChatCompletion.model_validate({**common, "choices": [
            {"index": c.get("index", k),
             "message": {"content": (c.get("message") or {}).get("content")},
             "logprobs": c.get("logprobs"), "finish_reason": _finish(c.get("finish_reason"))}
            for k, c in enumerate(choices)]})
    except (ValidationError, AttributeError):
        raise BadGatewayError(f"The upstream server of '{call.deployment.id}' sent a response "
                              f"Bastion cannot read.") from None


async def open_stream(call: UpstreamCall, ticket: Ticket) -> AsyncIterator[dict[str, Any]]:
    """The relayed stream, connected already: a refusal or no reachable replica raises here,
    before the response starts."""
    chunks = _relay(call, ticket)
    await chunks.__anext__()  # None: the upstream accepted the request
    return chunks  # type: ignore[return-value]


async def _relay(call: UpstreamCall, ticket: Ticket) -> AsyncIterator[dict[str, Any] | None]:
    body = call.body
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    names = {"id": call.id, "created": call.created, "model": call.deployment.id}
    usage: Any = None
    generated = 0
    async with metered(ticket, 0):
        _settle_usage(ticket, call, None, 0)
        # usage comes from the upstream, and is stripped again if the client did not ask
        payload = {**call.payload, "stream": True, "stream_options": {"include_usage": True}}
        async with aclosing(await call.engine.open_stream(call.path, payload)) as chunks:
            yield None
            async for chunk in chunks:
                chunk.update(names)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                generated += sum(1 for c in choices if isinstance(c, dict) and (
                    c.get("text") or (c.get("delta") or {}).get("content")))
                _settle_usage(ticket, call, usage, generated)
                if not choices:  # the usage chunk (or an empty one)
                    if include_usage and chunk.get("usage"):
                        chunk["usage"] = _usage(ticket)
                        yield chunk
                    continue
                if include_usage:
                    chunk["usage"] = None
                else:
                    chunk.pop("usage", None)
                yield chunk
    if include_usage and usage is None:  # an upstream that does not report it (llama.cpp)
        yield {**names, "object": "chat.completion.chunk" if call.path != "completions"
               else "text_completion", "choices": [], "usage": _usage(ticket)}
