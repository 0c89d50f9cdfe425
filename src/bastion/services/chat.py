"""Chat completions: messages -> prompt tokens -> engine events -> ChatCompletion or chunks."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from starlette.concurrency import run_in_threadpool

from bastion.models.catalog import Deployment
from bastion.config import Settings
from bastion.engines.base import (Delta, Finished, GenerationRequest, PromptMedia, TokenLogprob,
                                  is_passthrough)
from bastion.errors import InvalidRequestError
from bastion.ids import new_id
from bastion.protocol.chat import (AssistantMessage, ChatChoice, ChatCompletion,
                                   ChatCompletionRequest, ChoiceLogprobs, ImagePart,
                                   TokenLogprobContent, TopLogprob)
from bastion.protocol.common import Usage
from bastion.admission.limiter import Limiter, Ticket
from bastion.services import passthrough
from bastion.services.images import load_images
from bastion.services.passthrough import UpstreamCall
from bastion.services.common import (check_n, completion_budget, merge, metered,
                                    sampling_params, unsupported)
from bastion.tenancy.keys import Principal


class PreparedChat:
    """Everything known before generation starts: validated, tokenised, budgeted."""

    def __init__(self, body: ChatCompletionRequest, deployment: Deployment,
                 prompt_tokens: list[int], request: GenerationRequest) -> None:
        self.body = body
        self.deployment = deployment
        self.prompt_tokens = prompt_tokens
        self.request = request
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.estimate = len(prompt_tokens) + request.n * request.params.max_tokens


async def prepare_chat(body: ChatCompletionRequest, deployment: Deployment, settings: Settings,
                       principal: Principal, limiter: Limiter) -> PreparedChat | UpstreamCall:
    """Checked, counted and budgeted; a passthrough engine's request is prepared by
    serving/passthrough.py and runs there (complete_chat and open_chat_stream dispatch)."""
    engine = deployment.engine
    if not engine.capabilities.chat:
        raise unsupported(deployment, "chat completions")
    images = await load_images(body.messages, settings)  # every image is checked first
    if images and not engine.capabilities.vision:
        i, j = min(images)
        raise InvalidRequestError(
            f"The model '{deployment.id}' does not support image input; send text "
            f"only, or choose a vision model.", param=f"messages[{i}].content[{j}]",
            code="model_not_supported")
    if is_passthrough(engine):
        check_n(body.n, max_n=settings.max_n, slots=body.n)
        return await passthrough.prepare_chat(body, deployment, settings, principal, limiter,
                                              images)
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if any(key[0] == i for key in images):
            parts = [{"type": "image", "image": images[(i, j)]} if isinstance(p, ImagePart)
                     else {"type": "text", "text": p.text}
                     for j, p in enumerate(m.content or [])]  # type: ignore[union-attr]
            messages.append({"role": role, "content": parts})
        else:
            messages.append({"role": role, "content": m.text()})
    check_n(body.n, max_n=settings.max_n, slots=getattr(engine, "max_parallel", body.n))
    media: tuple[PromptMedia, ...] = ()
    if any(isinstance(m["content"], list) for m in messages):  # images, checked for vision above
        rendered = await run_in_threadpool(engine.render_chat_media, messages)
        prompt, media = rendered.tokens, rendered.media
    else:
        prompt = await run_in_threadpool(engine.render_chat, messages)
    max_tokens = completion_budget(prompt_len=len(prompt), requested=body.completion_limit,
                                   context=engine.info.context_length,
                                   default=settings.default_max_tokens, param="messages",
                                   what="messages")
    max_tokens = limiter.max_tokens_for(principal, len(prompt), body.n, body.completion_limit,
                                        default=max_tokens, param="messages")
    params = sampling_params(body, max_tokens=max_tokens, vocab_size=engine.info.vocab_size,
                             logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0)
    gen = GenerationRequest(prompt_tokens=prompt, params=params, n=body.n, media=media)
    return PreparedChat(body, deployment, prompt, gen)


def _logprobs(items: list[TokenLogprob]) -> list[TokenLogprobContent]:
    return [TokenLogprobContent(token=lp.token, logprob=lp.logprob, bytes=lp.bytes,
                                top_logprobs=[TopLogprob(token=t, bytes=b, logprob=v)
                                              for t, b, v in lp.top])
            for lp in items]


async def complete_chat(prep: PreparedChat | UpstreamCall, ticket: Ticket) -> ChatCompletion:
    if isinstance(prep, UpstreamCall):
        return await passthrough.complete(prep, ticket)  # type: ignore[return-value]
    n = prep.request.n
    texts = [""] * n
    lps: list[list[TokenLogprob]] = [[] for _ in range(n)]
    reasons = ["stop"] * n
    async with metered(ticket, len(prep.prompt_tokens)) as meter:
        async for _, ev in merge([prep.deployment.engine.generate(prep.request)]):
            meter.count(0, ev)
            if isinstance(ev, Delta):
                texts[ev.index] += ev.text
                lps[ev.index].extend(ev.logprobs)
            elif isinstance(ev, Finished):
                reasons[ev.index] = ev.finish_reason
    completion = ticket.completion_tokens
    want_lp = prep.body.logprobs
    choices = [ChatChoice(index=i, message=AssistantMessage(content=texts[i]),
                          logprobs=ChoiceLogprobs(content=_logprobs(lps[i])) if want_lp else None,
                          finish_reason=reasons[i])  # type: ignore[arg-type]
               for i in range(n)]
    prompt = len(prep.prompt_tokens)
    return ChatCompletion(id=prep.id, created=prep.created, model=prep.deployment.id,
                          choices=choices,
                          usage=Usage(prompt_tokens=prompt, completion_tokens=completion,
                                      total_tokens=prompt + completion))


async def open_chat_stream(prep: PreparedChat | UpstreamCall,
                           ticket: Ticket) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed chat, awaited before the response starts: an upstream connects
    here, so its refusal (or no reachable replica) is an HTTP error, not an event."""
    if isinstance(prep, UpstreamCall):
        return await passthrough.open_stream(prep, ticket)
    return stream_chat(prep, ticket)


async def stream_chat(prep: PreparedChat, ticket: Ticket) -> AsyncIterator[dict[str, Any]]:
    body = prep.body
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": prep.id, "object": "chat.completion.chunk", "created": prep.created,
            "model": prep.deployment.id, "system_fingerprint": None}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], *, logprobs: Any = None,
              finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish}], **extra}

    for i in range(prep.request.n):
        yield chunk(i, {"role": "assistant", "content": ""},
                    logprobs={"content": [], "refusal": None} if body.logprobs else None)
    async with metered(ticket, len(prep.prompt_tokens)) as meter:
        async for _, ev in merge([prep.deployment.engine.generate(prep.request)]):
            meter.count(0, ev)
            if isinstance(ev, Delta):
                lp = ({"content": [c.model_dump() for c in _logprobs(ev.logprobs)],
                       "refusal": None} if body.logprobs else None)
                yield chunk(ev.index, {"content": ev.text}, logprobs=lp)
            elif isinstance(ev, Finished):
                yield chunk(ev.index, {}, finish=ev.finish_reason)
    if include_usage:
        prompt, completion = len(prep.prompt_tokens), ticket.completion_tokens
        yield {**base, "choices": [], "usage": {"prompt_tokens": prompt,
                                                "completion_tokens": completion,
                                                "total_tokens": prompt + completion}}
