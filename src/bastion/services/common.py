"""What chat and legacy completions share: token budgets, sampling parameters, SSE framing."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator


from bastion.engines.base import (Delta, EngineError, Event, Finished, OutputFormat,
                                  SamplingParams)
from bastion.errors import APIError, InvalidRequestError, engine_api_error
from bastion.protocol.common import SamplingFields
from bastion.admission.gate import metered as gate_metered
from bastion.admission.limiter import Ticket

log = logging.getLogger("bastion.services")


def check_n(n: int, *, max_n: int, slots: int) -> None:
    limit = min(max_n, slots)
    if n > limit:
        raise InvalidRequestError(f"n must be at most {limit} on this server (got {n}).",
                                  param="n", code="invalid_value")


def unsupported(deployment: Any, what: str) -> InvalidRequestError:
    """The 400 for a model asked for something it cannot do, saying what it is for instead."""
    hint = (" It is an embedding model: use it with /v1/embeddings."
            if deployment.engine.capabilities.embeddings else "")
    return InvalidRequestError(f"The model '{deployment.id}' does not support {what}.{hint}",
                               param="model", code="model_not_supported")


def check_token_ids(tokens: list[int], vocab_size: int, param: str) -> None:
    for t in tokens:
        if t < 0 or t >= vocab_size:
            raise InvalidRequestError(
                f"Token id {t} in '{param}' is outside this model's vocabulary (0 to {vocab_size - 1}).",
                param=param, code="invalid_token_id")


GUESS_FLOOR = 256  # max_tokens when an estimated prompt may already fill the context


def completion_budget(*, prompt_len: int, requested: int | None, context: int, default: int,
                      param: str, what: str, exact: bool = True) -> int:
    """The number of tokens to generate, or a 400 that names both numbers. A prompt that was
    only estimated (an upper bound: an upstream that cannot count) never refuses on context:
    the upstream will, if it must."""
    if not exact:
        if requested is not None:
            return requested
        room = context - prompt_len
        return min(default, room) if room >= 1 else min(default, GUESS_FLOOR)
    if prompt_len == 0:
        raise InvalidRequestError(f"The {what} is empty: it has no tokens for this model.",
                                  param=param, code="empty_prompt")
    if prompt_len >= context:
        raise InvalidRequestError(
            f"This model's maximum context length is {context} tokens, but the {what} "
            f"{'is' if what == 'prompt' else 'are'} {prompt_len} tokens. Please shorten the {what}.",
            param=param, code="context_length_exceeded")
    room = context - prompt_len
    if requested is None:
        return min(default, room)
    if requested > room:
        raise InvalidRequestError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the "
            f"completion). Please reduce the {what} or the completion length.",
            param="max_tokens", code="context_length_exceeded")
    return requested


def sampling_params(req: SamplingFields, *, max_tokens: int, vocab_size: int, logprobs: bool,
                    top_logprobs: int, prompt_logprobs: bool = False,
                    output: OutputFormat | None = None) -> SamplingParams:
    """The request's sampling fields for the engine; a vocab_size of 0 (unknown: an upstream)
    leaves logit_bias's token ids to the engine's server to check."""
    bias: list[tuple[int, float]] = []
    for key, value in (req.logit_bias or {}).items():
        tok = int(key)
        if vocab_size:
            check_token_ids([tok], vocab_size, "logit_bias")
        bias.append((tok, float(value)))
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0, min_p=req.min_p or 0.0,
        frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
        seed=None if req.seed is None else req.seed & 0xFFFFFFFF,
        stop=tuple(req.stop_list), logit_bias=tuple(bias), logprobs=logprobs,
        top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs, output=output,
        explicit=frozenset(req.model_fields_set))


def as_api_error(exc: EngineError) -> APIError:
    """An engine's error as the HTTP error a client sees (errors.py's one table)."""
    return engine_api_error(exc)


def error_payload(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, APIError):
        return exc.body()
    if isinstance(exc, EngineError):
        return as_api_error(exc).body()
    log.error("stream failed", exc_info=exc)
    return APIError("The server had an error while generating.").body()


async def merge(streams: list[AsyncIterator[Event]]) -> AsyncIterator[tuple[int, Event]]:
    """Interleave several engine streams, tagging each event with its stream's number."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Event]) -> None:
        try:
            async for ev in stream:
                await queue.put((i, ev))
            await queue.put((i, None))
        except Exception as exc:
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Meter:
    """Counts a request's real usage into its ticket as events arrive, per choice, so that a
    request cut off mid-stream is still billed exactly for what it generated."""

    def __init__(self, ticket: Ticket, prompt_tokens: int) -> None:
        self.ticket = ticket
        self.ticket.prompt_tokens += prompt_tokens
        self.counts: dict[tuple[int, int], int] = {}
        # the request's moments for its metrics and spans: handed to the engine now, its
        # first and last tokens as they pass (the engines themselves report no timings)
        self.timeline = ticket.timeline
        if self.timeline is not None:
            self.timeline.submit()
        self.cached: dict[int, int] = {}  # prompt tokens each stream reused (prefix cache)

    def count(self, stream: int, ev: Event) -> None:
        key = (stream, getattr(ev, "index", 0))
        if isinstance(ev, Delta):
            self.counts[key] = self.counts.get(key, 0) + ev.n_tokens
            if ev.n_tokens and self.timeline is not None:
                self.timeline.token()
                self.timeline.sequences = len(self.counts)
        elif isinstance(ev, Finished):
            self.counts[key] = ev.completion_tokens
            self.cached[stream] = ev.cached_tokens
            self.ticket.cached_tokens = sum(self.cached.values())
        self.ticket.completion_tokens = sum(self.counts.values())


@asynccontextmanager
async def metered(ticket: Ticket, prompt_tokens: int) -> AsyncIterator[Meter]:
    """Count the request's usage into its ticket and settle it however the block ends (the
    admission gate's own `metered`)."""
    async with gate_metered(ticket):
        yield Meter(ticket, prompt_tokens)
