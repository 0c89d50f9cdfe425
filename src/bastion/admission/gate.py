"""The admission gate: one unit that owns a request's counting, its early refusal, the work it
may do before admission, its concurrency slot, its token reservation, its settlement, its ledger
row and its rate-limit headers, for HTTP, the WebSocket and the playground alike.

A request goes through it in four steps, whatever the transport:
1. `enter` (at authentication): the request is counted against its key's requests per minute
   and the organisation's limits are read; a key over its rate, an organisation with every
   concurrency slot taken or its tokens per hour spent, is refused here, before any expensive
   work (image decoding, template rendering, tokenising, upstream calls).
2. `admit` / `open` (after the prompt is counted): a slot and the token reservation, or a 429.
3. settlement when the request ends, however it ends: the real usage, one ledger row per
   generation (its own id: a retry that generates again is billed again).
4. `close`, the transport's safety net: whatever never reached settlement is settled, and
   (Redis) releases are written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import AsyncIterator, Literal

import anyio

from bastion.admission.limiter import CONCURRENCY_RETRY_S, Limiter, Quota, Ticket
from bastion.errors import APIError, RateLimitError, ServiceUnavailableError
from bastion.telemetry.metrics import Metrics
from bastion.telemetry.timeline import Timeline
from bastion.telemetry.tracing import Tracing
from bastion.tenancy.keys import Principal
from bastion.usage.ledger import Ledger, UsageRow

log = logging.getLogger("bastion.admission")
Counting = Literal["now", "meanwhile", "defer"]


@dataclass
class RequestContext:
    """One request's admission state, typed, for every transport."""

    principal: Principal
    quota: Quota
    endpoint: str
    tickets: list[Ticket] = field(default_factory=list)
    counting: asyncio.Future[None] | None = None  # a GET counted while its route runs
    after_response: bool = False  # HTTP with Redis: releases are written after the last byte
    arrived: float = field(default_factory=time.monotonic)  # latencies are measured from here


REFUSALS = (RateLimitError, ServiceUnavailableError)


class Gate:
    def __init__(self, limiter: Limiter, ledger: Ledger, metrics: Metrics | None = None,
                 tracing: Tracing | None = None) -> None:
        self.limiter = limiter
        self.ledger = ledger
        self.metrics = metrics or Metrics()
        self.tracing = tracing or Tracing()

    def _refused(self, exc: APIError, started: float) -> None:
        """Count a refusal by its reason (the error's code) and trace it."""
        self.metrics.refused(exc.code)
        self.tracing.refused(exc.code, started)

    def _observe(self, ticket: Ticket) -> None:
        """A settled request's latencies, tokens and spans (beside its ledger row)."""
        t = ticket.timeline
        if t is None:
            return
        try:  # what operators see must never fail the request it describes
            self.metrics.finished(t, prompt_tokens=ticket.prompt_tokens,
                                  completion_tokens=ticket.completion_tokens,
                                  cached_tokens=ticket.cached_tokens,
                                  sequences=t.sequences, status=ticket.status)
            self.tracing.finished(t, status=ticket.status, prompt_tokens=ticket.prompt_tokens,
                                  completion_tokens=ticket.completion_tokens)
        except Exception:
            log.exception("could not record a request's metrics or spans")

    # --- 1. at authentication -----------------------------------------------------------------
    async def enter(self, principal: Principal, *, endpoint: str, counting: Counting = "now",
                    inference: bool = False, after_response: bool = False) -> RequestContext:
        """Count the request (now, meanwhile for a GET, or deferred to admission) and, for an
        inference request, refuse it early if it cannot be admitted."""
        limiter = self.limiter
        started = time.monotonic()
        try:
            if counting == "defer":
                quota, task = limiter.deferred(principal), None
            elif counting == "meanwhile":
                quota, task = await limiter.count_meanwhile(principal)
            else:
                quota, task = await limiter.count_request(principal), None
            ctx = RequestContext(principal, quota, endpoint, counting=task,
                                 after_response=after_response, arrived=started)
            if inference:
                self._refuse_early(ctx)
        except REFUSALS as exc:
            self._refused(exc, started)
            raise
        return ctx

    def _refuse_early(self, ctx: RequestContext) -> None:
        """What the count's snapshot already shows cannot be admitted: no slot free, or no
        token left this window. Admission checks again atomically; this only spares the work."""
        snap, q = ctx.quota.snapshot, ctx.quota.query
        if snap is None or not self.limiter.enabled:
            return
        usage = snap.usage
        if q.concurrency is not None and usage.slots_in_use >= q.concurrency:
            raise RateLimitError(
                f"Rate limit reached for concurrent requests: your organization already has "
                f"{usage.slots_in_use} of {q.concurrency} requests running.",
                code="concurrency_limit_exceeded", retry_after=CONCURRENCY_RETRY_S,
                headers=self.limiter.headers(ctx.quota))
        if q.tokens_per_hour and usage.tokens_used >= q.tokens_per_hour:
            raise RateLimitError(
                f"Rate limit reached for tokens per hour: your organization has used all "
                f"{q.tokens_per_hour} of its tokens per hour.", code="tokens_per_hour_exceeded",
                retry_after=usage.tokens_reset_at - time.time(),
                headers=self.limiter.headers(ctx.quota))

    def max_tokens_for(self, ctx: RequestContext, prompt_tokens: int, n: int,
                       requested: int | None, default: int, param: str) -> int:
        return self.limiter.max_tokens_for(ctx.principal, prompt_tokens, n, requested,
                                           default=default, param=param)

    # --- 2. admission ------------------------------------------------------------------------
    async def open(self, ctx: RequestContext, estimate: int, *, model: str,
                   request_id: str, sequences: int = 1) -> Ticket:
        """A slot per sequence decoded at once (`sequences`: n x prompts, each holds a batch
        slot of the engine as a request of its own would) and the reservation, billed to the
        ledger when the ticket settles. The
        ticket joins `ctx.tickets` before anything can cancel the caller, so `close` can always
        settle it (a slot is never lost)."""
        principal, ledger, endpoint = ctx.principal, self.ledger, ctx.endpoint

        def bill(t: Ticket) -> None:
            ledger.record(UsageRow(
                request_id=request_id, org_id=principal.org_id, key_id=principal.key_id,
                model=model, endpoint=endpoint, prompt_tokens=t.prompt_tokens,
                completion_tokens=t.completion_tokens, cached_tokens=t.cached_tokens,
                status=t.status,
                latency_ms=int((time.monotonic() - t.started) * 1000),
                created_at=datetime.now(timezone.utc)))

        timeline = Timeline(model, endpoint, arrived=ctx.arrived,
                            admission_started=time.monotonic())
        with anyio.CancelScope(shield=True):
            try:
                ticket = await self.limiter.admit(ctx.quota, estimate, sequences)
            except REFUSALS as exc:
                self._refused(exc, timeline.admission_started)
                raise
            timeline.admitted = time.monotonic()
            ticket.timeline = timeline
            ticket.after_response = ctx.after_response
            ticket.on_settle.append(bill)
            ticket.on_settle.append(self._observe)
            ctx.tickets.append(ticket)
        self.tracing.admitted(timeline)
        return ticket

    @asynccontextmanager
    async def admit(self, ctx: RequestContext, estimate: int, *, model: str,
                    request_id: str, sequences: int = 1) -> AsyncIterator[Ticket]:
        """`async with gate.admit(ctx, estimate, ...) as ticket`: settled however the block
        ends (done, failed, cancelled)."""
        ticket = await self.open(ctx, estimate, model=model, request_id=request_id,
                                 sequences=sequences)
        async with metered(ticket):
            yield ticket

    # --- 4. the transport's side -------------------------------------------------------------
    async def response_starts(self, ctx: RequestContext) -> APIError | None:
        """Before an HTTP response's first byte: a GET counted meanwhile may turn out refused
        (that refusal is then the response), and a deferred count that never reached admission
        is counted now."""
        if (counting := ctx.counting) is not None:
            ctx.counting = None
            try:
                await counting
            except APIError as err:
                if isinstance(err, REFUSALS):
                    self._refused(err, ctx.arrived)
                return err
        if ctx.quota.pending:
            await self.limiter.count_pending(ctx.quota)
        return None

    def headers(self, ctx: RequestContext) -> dict[str, str]:
        """The rate-limit headers from the request's latest snapshot: no storage read."""
        return self.limiter.headers(ctx.quota)

    async def release(self, ctx: RequestContext) -> None:
        """Write the releases that settled tickets left for after the response (Redis)."""
        for ticket in ctx.tickets:
            if (release := ticket.release) is not None:
                ticket.release = None
                with anyio.CancelScope(shield=True):
                    try:
                        await release()
                    except Exception as exc:  # the lease runs out by itself
                        log.warning("could not release a request's slot (%s: %s); its lease "
                                    "will lapse", type(exc).__name__, exc)

    async def close(self, ctx: RequestContext) -> None:
        """The safety net of every transport, run whatever happened: a count still in flight
        is awaited, tickets whose request ended before it could settle them are settled as
        cancelled and releases are written."""
        if (counting := ctx.counting) is not None:
            ctx.counting = None
            await asyncio.gather(counting, return_exceptions=True)
        for ticket in ctx.tickets:
            if not ticket.done:
                ticket.status = "cancelled"
                await settle(ticket)
        await self.release(ctx)


@asynccontextmanager
async def metered(ticket: Ticket) -> AsyncIterator[Ticket]:
    """Settle the ticket however the block ends: done, failed, cancelled or disconnected."""
    try:
        yield ticket
    except BaseException as exc:
        ticket.status = "cancelled" if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) \
            else "error"
        raise
    finally:
        await settle(ticket)


async def settle(ticket: Ticket) -> None:
    """Settle a ticket, shielded so that the cancellation that ended the request cannot skip
    its store call."""
    if ticket.done:
        return
    with anyio.CancelScope(shield=True):
        await ticket.settle()


__all__ = ["Gate", "RequestContext", "metered", "settle", "ServiceUnavailableError"]
