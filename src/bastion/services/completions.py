"""Legacy completions: prompts (text or tokens) -> prompts the model's engine prepared and
counted -> engine events -> Completion or chunks. One path for every engine."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from bastion.admission.limiter import Limiter, Ticket
from bastion.config import Settings
from bastion.engines.base import (Delta, Finished, GenerationRequest, PreparedPrompt,
                                  PromptLogprobs, TextPrompt, TokenLogprob, Usage)
from bastion.errors import InvalidRequestError
from bastion.ids import new_id
from bastion.models.catalog import Deployment
from bastion.protocol.common import Usage as WireUsage
from bastion.protocol.completions import (Completion, CompletionChoice, CompletionLogprobs,
                                          CompletionRequest)
from bastion.services.structured import output_format
from bastion.services.common import (check_n, completion_budget, merge, metered,
                                     sampling_params, unsupported)
from bastion.tenancy.keys import Principal


@dataclass
class PreparedCompletion:
    body: CompletionRequest
    deployment: Deployment
    prompts: list[PreparedPrompt]
    echo_texts: list[str]
    requests: list[GenerationRequest]
    prompt_pieces: list[list[str]]  # text of each prompt token, for echo with logprobs
    id: str = field(default_factory=lambda: new_id("cmpl"))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def estimate(self) -> int:
        """Tokens this request may use at most: what admission reserves."""
        return sum(p.n_tokens + r.n * r.params.max_tokens
                   for p, r in zip(self.prompts, self.requests))


async def prepare_completion(body: CompletionRequest, deployment: Deployment,
                             settings: Settings, principal: Principal,
                             limiter: Limiter) -> PreparedCompletion:
    """Checked, counted by the model's engine and budgeted (see prepare_chat)."""
    engine = deployment.engine
    if not engine.capabilities.completion:
        raise unsupported(deployment, "completions")
    if body.suffix is not None and not engine.capabilities.infill:
        raise InvalidRequestError(
            f"The model '{deployment.id}' cannot use suffix: it has no fill-in-the-middle tokens.",
            param="suffix", code="unsupported_parameter")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError("best_of is not supported; use n to get several completions.",
                                  param="best_of", code="unsupported_parameter")
    if body.echo and body.suffix is not None:
        raise InvalidRequestError("echo cannot be combined with suffix.", param="echo")
    output = output_format(body.response_format, param="response_format")
    if output is not None and not engine.capabilities.constrained:
        raise unsupported(deployment, "structured outputs (response_format)")
    check_n(body.n, max_n=settings.max_n, slots=engine.max_parallel)
    texts = body.prompts()
    want_lp = body.logprobs is not None
    names = ["prompt" if len(texts) == 1 else f"prompt[{i}]" for i in range(len(texts))]
    if body.suffix is not None and any(not isinstance(p, str) for p in texts):
        raise InvalidRequestError("suffix needs a text prompt, not token ids.",
                                  param="suffix", code="invalid_value")
    prompts: list[PreparedPrompt] = []
    for p, name in zip(texts, names):  # in order: the first bad prompt is the one named
        prompts.append(await engine.count_prompt(TextPrompt(
            p, suffix=body.suffix, param=name, pieces=want_lp and body.echo)))
    if body.echo and any(p.text is None for p in prompts):
        raise InvalidRequestError(f"The model '{deployment.id}' can echo only text prompts.",
                                  param="echo", code="unsupported_parameter")
    budgets = [completion_budget(prompt_len=p.n_tokens, requested=body.max_tokens,
                                 context=engine.info.context_length,
                                 default=settings.default_max_tokens, param=name,
                                 what="prompt", exact=p.exact)
               for p, name in zip(prompts, names)]
    # The plan's tokens per request count the whole request: every prompt, every choice.
    plan_cap = limiter.max_tokens_for(principal, sum(p.n_tokens for p in prompts),
                                      body.n * len(prompts), body.max_tokens,
                                      default=max(budgets), param="prompt")
    requests = []
    for prompt, budget in zip(prompts, budgets):
        params = sampling_params(body, max_tokens=min(budget, plan_cap),
                                 vocab_size=engine.info.vocab_size, logprobs=want_lp,
                                 top_logprobs=body.logprobs or 0,
                                 prompt_logprobs=want_lp and body.echo, output=output)
        requests.append(GenerationRequest.of(prompt, params, body.n,
                                             cache_key=principal.org_id))
    echo = [p.text or "" for p in prompts]
    pieces = [p.pieces or [] for p in prompts] if want_lp and body.echo else []
    return PreparedCompletion(body, deployment, prompts, echo, requests, pieces)


class _LogprobBuilder:
    """Accumulates OpenAI's legacy logprobs object for one choice; text offsets run on across
    the echoed prompt and every streamed chunk."""

    def __init__(self) -> None:
        self.lp = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        self.offset = 0

    def add(self, items: list[TokenLogprob | None], texts: list[str] | None = None
            ) -> CompletionLogprobs:
        """Append items; returns just the appended part (what one stream chunk carries)."""
        part = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for k, item in enumerate(items):
            token = item.token if item is not None else (texts[k] if texts else "")
            for target in (self.lp, part):
                target.tokens.append(token)
                target.token_logprobs.append(item.logprob if item is not None else None)
                target.top_logprobs.append({t: v for t, _, v in item.top} if item else None)
                target.text_offset.append(self.offset)
            self.offset += len(token)
        return part


async def _open_all(prep: PreparedCompletion, stream: bool) -> list[AsyncIterator[Any]]:
    """Every prompt's generation opened (an upstream connects for each); if one is refused,
    the others are closed again and the refusal raised."""
    engine = prep.deployment.engine
    opened = await asyncio.gather(*(engine.open(dataclasses.replace(r, stream=stream))
                                    for r in prep.requests), return_exceptions=True)
    failed = next((x for x in opened if isinstance(x, BaseException)), None)
    if failed is not None:
        for events in opened:
            if not isinstance(events, BaseException) and hasattr(events, "aclose"):
                await events.aclose()
        raise failed
    return opened  # type: ignore[return-value]


class _Prompts:
    """Each prompt's token count, replaced by the engine's own report where it sends one."""

    def __init__(self, prep: PreparedCompletion, ticket: Ticket) -> None:
        self.counts = [p.n_tokens for p in prep.prompts]
        self.ticket = ticket

    def report(self, stream: int, ev: Usage) -> None:
        self.ticket.prompt_tokens += ev.prompt_tokens - self.counts[stream]
        self.counts[stream] = ev.prompt_tokens

    def usage(self, completion: int) -> WireUsage:
        prompt = sum(self.counts)
        return WireUsage.of(prompt, completion, self.ticket.cached_tokens)


async def complete(prep: PreparedCompletion, ticket: Ticket) -> Completion:
    n = prep.body.n
    total = n * len(prep.requests)
    texts = [prep.echo_texts[k // n] if prep.body.echo else "" for k in range(total)]
    builders = [_LogprobBuilder() for _ in range(total)]
    reasons = ["stop"] * total
    prompts = _Prompts(prep, ticket)
    async with metered(ticket, sum(prompts.counts)) as meter:
        streams = await _open_all(prep, stream=False)
        async for i, ev in merge(streams):
            meter.count(i, ev)
            if isinstance(ev, PromptLogprobs):
                for j in range(n):
                    builders[i * n + j].add(ev.tokens, prep.prompt_pieces[i])
            elif isinstance(ev, Delta):
                texts[i * n + ev.index] += ev.text
                builders[i * n + ev.index].add(list(ev.logprobs))
            elif isinstance(ev, Finished):
                reasons[i * n + ev.index] = ev.finish_reason
            elif isinstance(ev, Usage):
                prompts.report(i, ev)
    want_lp = prep.body.logprobs is not None
    choices = [CompletionChoice(index=k, text=texts[k],
                                logprobs=builders[k].lp if want_lp else None,
                                finish_reason=reasons[k])  # type: ignore[arg-type]
               for k in range(total)]
    return Completion(id=prep.id, created=prep.created, model=prep.deployment.id, choices=choices,
                      usage=prompts.usage(ticket.completion_tokens))


async def open_completion_stream(prep: PreparedCompletion,
                                 ticket: Ticket) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed completion, awaited before the response starts (see
    open_chat_stream)."""
    chunks = stream_completion(prep, ticket)
    await chunks.__anext__()  # None: the engine took every prompt
    return chunks  # type: ignore[return-value]


async def stream_completion(prep: PreparedCompletion,
                            ticket: Ticket) -> AsyncIterator[dict[str, Any] | None]:
    body = prep.body
    n = body.n
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": prep.id, "object": "text_completion", "created": prep.created,
            "model": prep.deployment.id, "system_fingerprint": None}
    extra = {"usage": None} if include_usage else {}
    want_lp = body.logprobs is not None

    def chunk(index: int, text: str, lp: CompletionLogprobs | None, finish: str | None) -> dict:
        return {**base, "choices": [{"index": index, "text": text,
                                     "logprobs": lp.model_dump() if lp is not None else None,
                                     "finish_reason": finish}], **extra}

    builders = [_LogprobBuilder() for _ in range(n * len(prep.requests))]
    prompts = _Prompts(prep, ticket)
    async with metered(ticket, sum(prompts.counts)) as meter:
        streams = await _open_all(prep, stream=True)
        yield None
        if body.echo and not want_lp:
            for k in range(n * len(prep.requests)):
                yield chunk(k, prep.echo_texts[k // n], None, None)
        async with aclosing(merge(streams)) as events:
            async for i, ev in events:
                meter.count(i, ev)
                if isinstance(ev, PromptLogprobs):
                    for j in range(n):
                        part = builders[i * n + j].add(ev.tokens, prep.prompt_pieces[i])
                        yield chunk(i * n + j, prep.echo_texts[i], part, None)
                elif isinstance(ev, Delta):
                    k = i * n + ev.index
                    lp = builders[k].add(list(ev.logprobs)) if want_lp else None
                    yield chunk(k, ev.text, lp, None)
                elif isinstance(ev, Finished):
                    yield chunk(i * n + ev.index, "", None, ev.finish_reason)
                elif isinstance(ev, Usage):
                    prompts.report(i, ev)
    if include_usage:
        yield {**base, "choices": [], "usage": prompts.usage(ticket.completion_tokens).model_dump()}
