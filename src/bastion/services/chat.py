"""Chat completions: messages -> a prompt the model's engine prepared and counted -> engine
events -> ChatCompletion or chunks. One path for every engine, local or upstream."""

from __future__ import annotations

import dataclasses
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

from bastion.admission.limiter import Limiter, Ticket
from bastion.config import Settings
from bastion.engines.base import (ChatPrompt, Delta, Finished, GenerationRequest, PreparedPrompt,
                                  TokenLogprob, Usage)
from bastion.errors import InvalidRequestError
from bastion.ids import new_id
from bastion.models.catalog import Deployment
from bastion.protocol.chat import (AssistantMessage, ChatChoice, ChatCompletion,
                                   ChatCompletionRequest, ChoiceLogprobs, ImagePart,
                                   OutputFunctionCall, OutputToolCall,
                                   TokenLogprobContent, TopLogprob)
from bastion.protocol.client_hints import SERVED_TIER
from bastion.protocol.common import Usage as WireUsage
from bastion.services.common import (check_n, completion_budget, metered,
                                     sampling_params, unsupported)
from bastion.services.images import load_images
from bastion.services.structured import output_format
from bastion.services.tools import (TAG, ToolCallStream, ToolSetup, parse_calls,
                                    prompt_messages, tool_setup)
from bastion.tenancy.keys import Principal


class PreparedChat:
    """Everything known before generation starts: validated, counted, budgeted."""

    def __init__(self, body: ChatCompletionRequest, deployment: Deployment,
                 prompt: PreparedPrompt, request: GenerationRequest,
                 tools: ToolSetup | None = None) -> None:
        self.body = body
        self.tools = tools  # tool calls are parsed out of the answers
        self.deployment = deployment
        self.prompt = prompt
        self.request = request
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.estimate = prompt.n_tokens + request.n * request.params.max_tokens


async def prepare_chat(body: ChatCompletionRequest, deployment: Deployment, settings: Settings,
                       principal: Principal, limiter: Limiter) -> PreparedChat:
    """Checked, counted and budgeted: the engine renders and counts the prompt (an upstream
    may only bound it from above: then nothing is refused on context here)."""
    engine = deployment.engine
    if not engine.capabilities.chat:
        raise unsupported(deployment, "chat completions")
    output = output_format(body.response_format, param="response_format",
                           texts=[m.text() for m in body.messages])
    if output is not None and not engine.capabilities.constrained:
        raise unsupported(deployment, "structured outputs (response_format)")
    tools = tool_setup(body, output)
    if tools is not None or any(m.role == "tool" or m.tool_calls for m in body.messages):
        if not engine.capabilities.tools:
            raise unsupported(deployment, "tools")
    if tools is not None:
        output = tools.output
    images = await load_images(body.messages, settings)  # every image is checked first
    if images and not engine.capabilities.vision:
        i, j = min(images)
        raise InvalidRequestError(
            f"The model '{deployment.id}' does not support image input; send text "
            f"only, or choose a vision model.", param=f"messages[{i}].content[{j}]",
            code="model_not_supported")
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        if isinstance(m.content, list):
            msg["content"] = [
                {"type": "image", "image": images[(i, j)], "detail": p.image_url.detail}
                if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
                for j, p in enumerate(m.content)]
        else:
            msg["content"] = m.content or ""
        if m.name:
            msg["name"] = m.name
        messages.append(msg)
    messages = prompt_messages(body.messages, messages, tools)
    check_n(body.n, max_n=settings.max_n, slots=engine.max_parallel)
    prompt = await engine.count_prompt(ChatPrompt(messages))
    max_tokens = completion_budget(prompt_len=prompt.n_tokens, requested=body.completion_limit,
                                   context=engine.info.context_length,
                                   default=settings.default_max_tokens, param="messages",
                                   what="messages", exact=prompt.exact)
    max_tokens = limiter.max_tokens_for(principal, prompt.n_tokens, body.n,
                                        body.completion_limit, default=max_tokens,
                                        param="messages")
    params = sampling_params(body, max_tokens=max_tokens, vocab_size=engine.info.vocab_size,
                             logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0,
                             output=output)
    request = GenerationRequest.of(prompt, params, body.n, cache_key=principal.org_id)
    return PreparedChat(body, deployment, prompt, request, tools)


def _logprobs(items: list[TokenLogprob]) -> list[TokenLogprobContent]:
    return [TokenLogprobContent(token=lp.token, logprob=lp.logprob, bytes=lp.bytes,
                                top_logprobs=[TopLogprob(token=t, bytes=b, logprob=v)
                                              for t, b, v in lp.top])
            for lp in items]


def reported_prompt(ticket: Ticket, counted: int, ev: Usage) -> int:
    """The engine's own prompt count (an upstream's report) in place of the prepared one."""
    ticket.prompt_tokens += ev.prompt_tokens - counted
    return ev.prompt_tokens


async def complete_chat(prep: PreparedChat, ticket: Ticket) -> ChatCompletion:
    n = prep.request.n
    texts = [""] * n
    lps: list[list[TokenLogprob]] = [[] for _ in range(n)]
    reasons = ["stop"] * n
    prompt = prep.prompt.n_tokens
    request = dataclasses.replace(prep.request, stream=False)
    async with metered(ticket, prompt) as meter, \
            aclosing(prep.deployment.engine.generate(request)) as events:
        async for ev in events:
            meter.count(0, ev)
            if isinstance(ev, Delta):
                texts[ev.index] += ev.text
                lps[ev.index].extend(ev.logprobs)
            elif isinstance(ev, Finished):
                reasons[ev.index] = ev.finish_reason
            elif isinstance(ev, Usage):
                prompt = reported_prompt(ticket, prompt, ev)
    completion = ticket.completion_tokens
    want_lp = prep.body.logprobs
    choices = [ChatChoice(index=i, message=_message(prep, texts[i], reasons[i]),
                          logprobs=ChoiceLogprobs(content=_logprobs(lps[i])) if want_lp else None,
                          finish_reason=_reason(prep, texts[i], reasons[i]))  # type: ignore[arg-type]
               for i in range(n)]
    return ChatCompletion(id=prep.id, created=prep.created, model=prep.deployment.id,
                          choices=choices, service_tier=SERVED_TIER,
                          usage=WireUsage.of(prompt, completion, ticket.cached_tokens))


def _message(prep: PreparedChat, text: str, reason: str) -> AssistantMessage:
    if prep.tools is None:
        return AssistantMessage(content=text)
    content, calls = parse_calls(text)
    if not calls:
        return AssistantMessage(content=text)
    return AssistantMessage(content=content, tool_calls=[
        OutputToolCall(id=c.id, function=OutputFunctionCall(name=c.name, arguments=c.arguments))
        for c in calls])


def _reason(prep: PreparedChat, text: str, reason: str) -> str:
    """"tool_calls" when a finished answer called a tool (the grammar makes every call
    whole, so a call's tag in a finished answer is a call); a cut-off one stays "length",
    with the calls it completed."""
    return "tool_calls" if prep.tools is not None and reason == "stop" and TAG in text else reason


async def open_chat_stream(prep: PreparedChat, ticket: Ticket) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed chat, awaited before the response starts: the engine is opened
    here (an upstream connects), so its refusal is an HTTP error, not an event."""
    chunks = stream_chat(prep, ticket)
    await chunks.__anext__()  # None: the engine took the request
    return chunks  # type: ignore[return-value]


async def stream_chat(prep: PreparedChat, ticket: Ticket
                      ) -> AsyncIterator[dict[str, Any] | None]:
    body = prep.body
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": prep.id, "object": "chat.completion.chunk", "created": prep.created,
            "model": prep.deployment.id, "system_fingerprint": None,
            "service_tier": SERVED_TIER}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], *, logprobs: Any = None,
              finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish}], **extra}

    prompt = prep.prompt.n_tokens
    parsers = [ToolCallStream() for _ in range(prep.request.n)] if prep.tools else []
    async with metered(ticket, prompt) as meter:
        events = await prep.deployment.engine.open(prep.request)
        yield None
        for i in range(prep.request.n):
            yield chunk(i, {"role": "assistant", "content": ""},
                        logprobs={"content": [], "refusal": None} if body.logprobs else None)
        async with aclosing(events):  # type: ignore[type-var]
            async for ev in events:
                meter.count(0, ev)
                if isinstance(ev, Delta):
                    lp = ({"content": [c.model_dump() for c in _logprobs(ev.logprobs)],
                           "refusal": None} if body.logprobs else None)
                    if not parsers:
                        yield chunk(ev.index, {"content": ev.text}, logprobs=lp)
                        continue
                    for k, delta in enumerate(parsers[ev.index].feed(ev.text) or [{}]):
                        if delta or lp:
                            yield chunk(ev.index, delta or {"content": ""},
                                        logprobs=lp if k == 0 else None)
                elif isinstance(ev, Finished):
                    reason = ev.finish_reason
                    if parsers:
                        parser = parsers[ev.index]
                        for delta in parser.feed("", final=True):
                            yield chunk(ev.index, delta)
                        if reason == "stop" and parser.calls:
                            reason = "tool_calls"
                    yield chunk(ev.index, {}, finish=reason)
                elif isinstance(ev, Usage):
                    prompt = reported_prompt(ticket, prompt, ev)
    if include_usage:
        completion = ticket.completion_tokens
        yield {**base, "choices": [],
               "usage": WireUsage.of(prompt, completion, ticket.cached_tokens).model_dump()}
