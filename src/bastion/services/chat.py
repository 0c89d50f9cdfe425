"""Chat completions: messages -> a prompt the model's engine prepared and counted -> engine
events -> ChatCompletion or chunks. One path for every engine, local or upstream."""

from __future__ import annotations

import dataclasses
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

from bastion.admission.limiter import Limiter, Ticket
from bastion.config import Settings
from bastion.engines.base import (Capabilities, ChatPrompt, Delta, Finished,
                                  GenerationRequest, PreparedPrompt, TokenLogprob, Usage)
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
from bastion.services.tools import (ToolCallStream, ToolSetup, call_id, parse_calls,
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
    caps = engine.capabilities
    # an engine whose server does tool calling itself (an upstream) gets the tools as sent
    forwards = caps.tools and not caps.tool_family
    if body.tools or any(m.role == "tool" or m.tool_calls for m in body.messages):
        if not caps.tools:
            raise unsupported(deployment, "tools")
    tools = None if forwards else tool_setup(body, output, family=caps.tool_family,
                                             template=caps.tool_template)
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
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        messages.append(msg)
    check_n(body.n, max_n=settings.max_n, slots=engine.max_parallel)
    prompt = await engine.count_prompt(_chat_prompt(body, messages, tools, forwards, caps))
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


def _chat_prompt(body: ChatCompletionRequest, messages: list[dict[str, Any]],
                 tools: ToolSetup | None, forwards: bool, caps: Capabilities) -> ChatPrompt:
    """The conversation for the engine: as sent, with the tools and the client's choice, for
    one that forwards them; else with the tools prompted as the model's template family
    wants (tool_prompts.py)."""
    if forwards:
        options = {k: v for k, v in (("tool_choice", body.tool_choice),
                                      ("parallel_tool_calls", body.parallel_tool_calls))
                   if v is not None}
        if "tool_choice" in options and not isinstance(options["tool_choice"], str):
            options["tool_choice"] = options["tool_choice"].model_dump()
        return ChatPrompt(messages, tools=[t.model_dump(exclude_none=True)
                                           for t in body.tools or []] or None,
                          tool_options=options)
    messages = prompt_messages(body.messages, messages, tools, family=caps.tool_family,
                               template=caps.tool_template)
    return ChatPrompt(messages, tools=tools.tools if tools is not None else None)


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
    relayed: list[dict[int, dict[str, str]]] = [{} for _ in range(n)]  # an upstream's calls
    prompt = prep.prompt.n_tokens
    request = dataclasses.replace(prep.request, stream=False)
    async with metered(ticket, prompt) as meter, \
            aclosing(prep.deployment.engine.generate(request)) as events:
        async for ev in events:
            meter.count(0, ev)
            if isinstance(ev, Delta):
                texts[ev.index] += ev.text
                lps[ev.index].extend(ev.logprobs)
                _gather(relayed[ev.index], ev.tool_calls)
            elif isinstance(ev, Finished):
                reasons[ev.index] = ev.finish_reason
            elif isinstance(ev, Usage):
                prompt = reported_prompt(ticket, prompt, ev)
    completion = ticket.completion_tokens
    want_lp = prep.body.logprobs
    choices = []
    for i in range(n):
        message = _message(prep, texts[i], relayed[i])
        choices.append(ChatChoice(
            index=i, message=message,
            logprobs=ChoiceLogprobs(content=_logprobs(lps[i])) if want_lp else None,
            finish_reason=_reason(prep, message, reasons[i])))  # type: ignore[arg-type]
    return ChatCompletion(id=prep.id, created=prep.created, model=prep.deployment.id,
                          choices=choices, service_tier=SERVED_TIER,
                          usage=WireUsage.of(prompt, completion, ticket.cached_tokens))


def _gather(calls: dict[int, dict[str, str]], deltas: tuple[dict[str, Any], ...]) -> None:
    """An upstream's tool-call deltas reassembled, by their index."""
    for d in deltas:
        call = calls.setdefault(d["index"], {"id": "", "name": "", "arguments": ""})
        call["id"] = d.get("id") or call["id"]
        fn = d.get("function") or {}
        call["name"] += fn.get("name") or ""
        call["arguments"] += fn.get("arguments") or ""


def _relayed(seen: set[int], deltas: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """An upstream's tool-call deltas in OpenAI's exact shape, whatever the upstream's: a
    call's first delta has its index, id, type and name; later ones only arguments."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        fn = d.get("function") or {}
        if d["index"] not in seen:
            seen.add(d["index"])
            out.append({"index": d["index"], "id": d.get("id") or call_id(), "type": "function",
                        "function": {"name": fn.get("name") or "",
                                     "arguments": fn.get("arguments") or ""}})
        elif fn.get("arguments"):
            out.append({"index": d["index"], "function": {"arguments": fn["arguments"]}})
    return out


def _message(prep: PreparedChat, text: str,
             relayed: dict[int, dict[str, str]]) -> AssistantMessage:
    if relayed:  # an upstream parsed them
        return AssistantMessage(content=text or None, tool_calls=[
            OutputToolCall(id=c["id"] or call_id(),
                           function=OutputFunctionCall(name=c["name"], arguments=c["arguments"]))
            for _, c in sorted(relayed.items())])
    if prep.tools is None:
        return AssistantMessage(content=text)
    content, calls = parse_calls(text, prep.tools.syntax)
    if not calls:
        return AssistantMessage(content=text)
    return AssistantMessage(content=content, tool_calls=[
        OutputToolCall(id=c.id, function=OutputFunctionCall(name=c.name, arguments=c.arguments))
        for c in calls])


def _reason(prep: PreparedChat, message: AssistantMessage, reason: str) -> str:
    """"tool_calls" when a finished answer called a tool (the grammar makes every call
    whole, so a call in a finished answer is a call); a cut-off one stays "length", with the
    calls it completed. An upstream's own reason stands."""
    if prep.tools is not None and reason == "stop" and message.tool_calls:
        return "tool_calls"
    return reason


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
    parsers = ([ToolCallStream(prep.tools.syntax) for _ in range(prep.request.n)]
               if prep.tools else [])
    seen: dict[int, set[int]] = {}  # the upstream's calls already begun, per choice
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
                    if ev.tool_calls:  # an upstream's own calls, relayed as they come
                        if ev.text or lp:
                            yield chunk(ev.index, {"content": ev.text}, logprobs=lp)
                        relay = _relayed(seen.setdefault(ev.index, set()), ev.tool_calls)
                        if relay:
                            yield chunk(ev.index, {"tool_calls": relay})
                        continue
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
