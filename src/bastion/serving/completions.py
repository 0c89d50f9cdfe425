"""Legacy completions: prompts (text or tokens) -> engine events -> Completion or chunks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.concurrency import run_in_threadpool

from bastion.catalog.registry import Deployment
from bastion.config import Settings
from bastion.engines.base import Delta, Finished, GenerationRequest, PromptLogprobs, TokenLogprob
from bastion.errors import InvalidRequestError
from bastion.protocol.completions import (Completion, CompletionChoice, CompletionLogprobs,
                                          CompletionRequest)
from bastion.protocol.common import Usage
from bastion.serving.common import (check_n, check_token_ids, completion_budget, merge, new_id,
                                    sampling_params)


@dataclass
class PreparedCompletion:
    body: CompletionRequest
    deployment: Deployment
    prompts: list[list[int]]
    echo_texts: list[str]
    requests: list[GenerationRequest]
    id: str = field(default_factory=lambda: new_id("cmpl"))
    created: int = field(default_factory=lambda: int(time.time()))


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
                             settings: Settings) -> PreparedCompletion:
    engine = deployment.engine
    if not engine.capabilities.completion:
        raise InvalidRequestError(f"The model '{deployment.id}' does not support completions.",
                                  param="model", code="model_not_supported")
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
    requests = []
    for i, tokens in enumerate(prompts):
        max_tokens = completion_budget(prompt_len=len(tokens), requested=body.max_tokens,
                                       context=engine.info.context_length,
                                       default=settings.default_max_tokens,
                                       param="prompt" if len(prompts) == 1 else f"prompt[{i}]",
                                       what="prompt")
        params = sampling_params(body, max_tokens=max_tokens, vocab_size=engine.info.vocab_size,
                                 logprobs=want_lp, top_logprobs=body.logprobs or 0,
                                 prompt_logprobs=want_lp and body.echo)
        requests.append(GenerationRequest(prompt_tokens=tokens, params=params, n=body.n))
    return PreparedCompletion(body, deployment, prompts, texts, requests)


class _LogprobBuilder:
    """Accumulates OpenAI's legacy logprobs object for one choice."""

    def __init__(self) -> None:
        self.lp = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        self.offset = 0

    def add(self, items: list[TokenLogprob | None], texts: list[str] | None = None) -> None:
        for k, item in enumerate(items):
            token = item.token if item is not None else (texts[k] if texts else "")
            self.lp.tokens.append(token)
            self.lp.token_logprobs.append(item.logprob if item is not None else None)
            self.lp.top_logprobs.append({t: v for t, _, v in item.top} if item is not None else None)
            self.lp.text_offset.append(self.offset)
            self.offset += len(token)


def _prompt_items(prep: PreparedCompletion, i: int, ev: PromptLogprobs) -> tuple[list, list[str]]:
    engine = prep.deployment.engine
    texts = [engine.detokenize([t]) for t in prep.prompts[i]]
    return ev.tokens, texts


async def _events(prep: PreparedCompletion) -> AsyncIterator[tuple[int, Any]]:
    engine = prep.deployment.engine
    async for i, ev in merge([engine.generate(r) for r in prep.requests]):
        yield i, ev


async def complete(prep: PreparedCompletion) -> Completion:
    n = prep.body.n
    total = n * len(prep.requests)
    texts = [""] * total
    builders = [_LogprobBuilder() for _ in range(total)]
    reasons = ["stop"] * total
    completion = 0
    if prep.body.echo:
        for i in range(len(prep.requests)):
            for j in range(n):
                texts[i * n + j] = prep.echo_texts[i]
    async for i, ev in _events(prep):
        if isinstance(ev, PromptLogprobs):
            items, tok_texts = _prompt_items(prep, i, ev)
            for j in range(n):
                builders[i * n + j].add(items, tok_texts)
        elif isinstance(ev, Delta):
            texts[i * n + ev.index] += ev.text
            builders[i * n + ev.index].add(list(ev.logprobs))
        elif isinstance(ev, Finished):
            reasons[i * n + ev.index] = ev.finish_reason
            completion += ev.completion_tokens
    want_lp = prep.body.logprobs is not None
    choices = [CompletionChoice(index=k, text=texts[k],
                                logprobs=builders[k].lp if want_lp else None,
                                finish_reason=reasons[k])  # type: ignore[arg-type]
               for k in range(total)]
    prompt = sum(len(p) for p in prep.prompts)
    return Completion(id=prep.id, created=prep.created, model=prep.deployment.id, choices=choices,
                      usage=Usage(prompt_tokens=prompt, completion_tokens=completion,
                                  total_tokens=prompt + completion))


async def stream_completion(prep: PreparedCompletion) -> AsyncIterator[dict[str, Any]]:
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
        for i in range(len(prep.requests)):
            for j in range(n):
                yield chunk(i * n + j, prep.echo_texts[i], None, None)
    completion = 0
    async for i, ev in _events(prep):
        if isinstance(ev, PromptLogprobs):
            items, tok_texts = _prompt_items(prep, i, ev)
            for j in range(n):
                b = _LogprobBuilder()
                b.add(items, tok_texts)
                yield chunk(i * n + j, prep.echo_texts[i], b.lp, None)
        elif isinstance(ev, Delta):
            lp = None
            if want_lp:
                b = _LogprobBuilder()
                b.add(list(ev.logprobs))
                lp = b.lp
            yield chunk(i * n + ev.index, ev.text, lp, None)
        elif isinstance(ev, Finished):
            completion += ev.completion_tokens
            yield chunk(i * n + ev.index, "", None, ev.finish_reason)
    if include_usage:
        prompt = sum(len(p) for p in prep.prompts)
        yield {**base, "choices": [], "usage": {"prompt_tokens": prompt,
                                                "completion_tokens": completion,
                                                "total_tokens": prompt + completion}}
