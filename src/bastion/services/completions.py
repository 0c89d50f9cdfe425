"""Legacy completions: prompts (text or tokens) -> engine events -> Completion or chunks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.concurrency import run_in_threadpool

from bastion.models.catalog import Deployment
from bastion.config import Settings
from bastion.engines.base import (Delta, Finished, GenerationRequest, PromptLogprobs,
                                  TokenLogprob, is_passthrough)
from bastion.errors import InvalidRequestError
from bastion.ids import new_id
from bastion.protocol.completions import (Completion, CompletionChoice, CompletionLogprobs,
                                          CompletionRequest)
from bastion.protocol.common import Usage
from bastion.admission.limiter import Limiter, Ticket
from bastion.services import passthrough
from bastion.services.passthrough import UpstreamCall
from bastion.services.common import (check_n, check_token_ids, completion_budget, merge, metered,
                                    sampling_params, unsupported)
from bastion.tenancy.keys import Principal


@dataclass
class PreparedCompletion:
    body: CompletionRequest
    deployment: Deployment
    prompts: list[list[int]]
    echo_texts: list[str]
    requests: list[GenerationRequest]
    prompt_pieces: list[list[str]]  # text of each prompt token, for echo with logprobs
    id: str = field(default_factory=lambda: new_id("cmpl"))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def estimate(self) -> int:
        """Tokens this request may use at most: what admission reserves."""
        return sum(len(r.prompt_tokens) + r.n * r.params.max_tokens for r in self.requests)


def _tokenize_all(engine: Any, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    prompts: list[list[int]] = []
    texts: list[str] = []
    for i, p in enumerate(body.prompts()):
        param = "prompt" if len(body.prompts()) == 1 else f"prompt[{i}]"
        if body.suffix is not None:
            if not isinstance(p, str):
                raise InvalidRequestError("suffix needs a text prompt, not token ids.",
                                          param="suffix", code="invalid_value")
            tokens = engine.infill_tokens(p, body.suffix)
        elif isinstance(p, str):
            tokens = engine.tokenize(p)
        else:
            check_token_ids(p, engine.info.vocab_size, param)
            tokens = list(p)
        prompts.append(tokens)
        texts.append(p if isinstance(p, str) else engine.detokenize(p))
    return prompts, texts


async def prepare_completion(body: CompletionRequest, deployment: Deployment,
                             settings: Settings, principal: Principal,
                             limiter: Limiter) -> PreparedCompletion | UpstreamCall:
    """Checked, tokenised and budgeted; a passthrough engine's request is prepared by
    serving/passthrough.py and runs there (complete and open_completion_stream dispatch)."""
    engine = deployment.engine
    if not engine.capabilities.completion:
        raise unsupported(deployment, "completions")
    if is_passthrough(engine):
        check_n(body.n, max_n=settings.max_n, slots=body.n)
        return await passthrough.prepare_completion(body, deployment, settings, principal,
                                                    limiter)
    if body.suffix is not None and not engine.capabilities.infill:
        raise InvalidRequestError(
            f"The model '{deployment.id}' cannot use suffix: it has no fill-in-the-middle tokens.",
            param="suffix", code="unsupported_parameter")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError("best_of is not supported; use n to get several completions.",
                                  param="best_of", code="unsupported_parameter")
    if body.echo and body.suffix is not None:
        raise InvalidRequestError("echo cannot be combined with suffix.", param="echo")
    check_n(body.n, max_n=settings.max_n, slots=getattr(engine, "max_parallel", body.n))
    prompts, texts = await run_in_threadpool(_tokenize_all, engine, body)
    want_lp = body.logprobs is not None
    budgets = [completion_budget(prompt_len=len(tokens), requested=body.max_tokens,
                                 context=engine.info.context_length,
                                 default=settings.default_max_tokens,
                                 param="prompt" if len(prompts) == 1 else f"prompt[{i}]",
                                 what="prompt")
               for i, tokens in enumerate(prompts)]
    # The plan's tokens per request count the whole request: every prompt, every choice.
    plan_cap = limiter.max_tokens_for(principal, sum(len(t) for t in prompts),
                                      body.n * len(prompts), body.max_tokens,
                                      default=max(budgets), param="prompt")
    requests = []
    for tokens, budget in zip(prompts, budgets):
        max_tokens = min(budget, plan_cap)
        params = sampling_params(body, max_tokens=max_tokens, vocab_size=engine.info.vocab_size,
                                 logprobs=want_lp, top_logprobs=body.logprobs or 0,
                                 prompt_logprobs=want_lp and body.echo)
        requests.append(GenerationRequest(prompt_tokens=tokens, params=params, n=body.n))
    pieces: list[list[str]] = []
    if want_lp and body.echo:
        pieces = await run_in_threadpool(
            lambda: [[engine.detokenize([t]) for t in tokens] for tokens in prompts])
    return PreparedCompletion(body, deployment, prompts, texts, requests, pieces)


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


def _events(prep: PreparedCompletion) -> AsyncIterator[tuple[int, Any]]:
    return merge([prep.deployment.engine.generate(r) for r in prep.requests])


def _usage(prep: PreparedCompletion, completion: int) -> Usage:
    prompt = sum(len(p) for p in prep.prompts)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


async def complete(prep: PreparedCompletion | UpstreamCall, ticket: Ticket) -> Completion:
    if isinstance(prep, UpstreamCall):
        return await passthrough.complete(prep, ticket)  # type: ignore[return-value]
    n = prep.body.n
    total = n * len(prep.requests)
    texts = [prep.echo_texts[k // n] if prep.body.echo else "" for k in range(total)]
    builders = [_LogprobBuilder() for _ in range(total)]
    reasons = ["stop"] * total
    async with metered(ticket, sum(len(p) for p in prep.prompts)) as meter:
        async for i, ev in _events(prep):
            meter.count(i, ev)
            if isinstance(ev, PromptLogprobs):
                for j in range(n):
                    builders[i * n + j].add(ev.tokens, prep.prompt_pieces[i])
            elif isinstance(ev, Delta):
                texts[i * n + ev.index] += ev.text
                builders[i * n + ev.index].add(list(ev.logprobs))
            elif isinstance(ev, Finished):
                reasons[i * n + ev.index] = ev.finish_reason
    want_lp = prep.body.logprobs is not None
    choices = [CompletionChoice(index=k, text=texts[k],
                                logprobs=builders[k].lp if want_lp else None,
                                finish_reason=reasons[k])  # type: ignore[arg-type]
               for k in range(total)]
    return Completion(id=prep.id, created=prep.created, model=prep.deployment.id, choices=choices,
                      usage=_usage(prep, ticket.completion_tokens))


async def open_completion_stream(prep: PreparedCompletion | UpstreamCall,
                                 ticket: Ticket) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed completion, awaited before the response starts (see
    open_chat_stream)."""
    if isinstance(prep, UpstreamCall):
        return await passthrough.open_stream(prep, ticket)
    return stream_completion(prep, ticket)


async def stream_completion(prep: PreparedCompletion,
                            ticket: Ticket) -> AsyncIterator[dict[str, Any]]:
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

    if body.echo and not want_lp:
        for k in range(n * len(prep.requests)):
            yield chunk(k, prep.echo_texts[k // n], None, None)
    builders = [_LogprobBuilder() for _ in range(n * len(prep.requests))]
    async with metered(ticket, sum(len(p) for p in prep.prompts)) as meter:
        async for i, ev in _events(prep):
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
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(prep, ticket.completion_tokens).model_dump()}
