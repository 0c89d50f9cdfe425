"""The limiter: admits a request against its organisation's plan and its key's rate, and
settles the reservation to the real usage when the request ends, however it ends.

A request makes at most three calls to the store (store.py): one at authentication, one at
admission, one at settlement; each returns a snapshot that its `Quota` keeps, and the rate-limit
headers are computed from the latest one without another read. An inference request may defer
its count to admission (`deferred`), which then counts it in the same call: two calls in all,
and with Redis only admission waits for its round trip (settlement is sent before the response
and its reply read in the background).
The calls are async and run on the event loop (with Redis, redis.asyncio), never in a worker
thread. State is in memory by default, in Redis (BASTION_REDIS_URL) when replicas must share
it. If Redis cannot be reached the limiter fails closed: requests get a 503 that says why,
never unlimited service.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import anyio

from bastion.errors import InvalidRequestError, RateLimitError, ServiceUnavailableError
from bastion.admission.headers import Window, rate_limit_headers
from bastion.admission.store import (MemoryStore, Query, Requests, Snapshot, Store, Usage,
                                     slot_members)
from bastion.telemetry.timeline import Timeline
from bastion.tenancy.keys import Principal

log = logging.getLogger("bastion.admission")
T = TypeVar("T")
CONCURRENCY_RETRY_S = 1.0  # a slot frees when some running request ends: poll again soon


@dataclass
class Quota:
    """One authenticated request's limits and the latest snapshot of their state."""

    principal: Principal
    query: Query
    snapshot: Snapshot | None = None  # None: nothing counted (limits off or unlimited)
    pending: bool = False  # not counted yet: admission (or the response's start) counts it

    def update(self, usage: Usage, requests: Requests | None = None) -> None:
        if requests is None and self.snapshot is not None:
            requests = self.snapshot.requests
        self.snapshot = Snapshot(requests, usage)


@dataclass
class Ticket:
    """One admitted request. `settle` is idempotent: the first call wins."""

    limiter: "Limiter"
    quota: Quota
    reserved: int
    member: str = ""  # its concurrency slot ("" when concurrency is not limited)
    sequences: int = 1  # slots it holds: one per sequence decoded at once (n x prompts)
    window: str = ""  # the token window this reservation was counted in
    started: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those the engine's prefix cache reused
    status: str = "ok"
    done: bool = False
    on_settle: list[Callable[["Ticket"], None]] = field(default_factory=list)
    # An HTTP request's ticket: with Redis, its release is written after the response's last
    # byte (the Gatekeeper calls `release`), not before its first. Still before the server
    # reads anything the client sends next, so the client's next request finds the slot free.
    after_response: bool = False
    release: Callable[[], Awaitable[object]] | None = None
    timeline: Timeline | None = None  # the moments its metrics and spans are made of

    @property
    def principal(self) -> Principal:
        return self.quota.principal

    async def settle(self) -> None:
        if self.done:
            return
        self.done = True
        await self.limiter._settle(self)
        for callback in self.on_settle:
            callback(self)


class Limiter:
    def __init__(self, storage_url: str | None = None, token_window_s: int = 3600,
                 enabled: bool = True, slot_lease_s: float = 30.0) -> None:
        self.enabled = enabled  # off: admit everything, count nothing (BASTION_RATE_LIMITS=false)
        self.token_window_s = token_window_s
        self.remote = storage_url is not None
        if storage_url:
            from bastion.admission.redis_store import RedisStore

            self.store: Store = RedisStore(storage_url, token_window_s, slot_lease_s)
        else:
            self.store = MemoryStore(token_window_s)
        self.storage = self.store.storage  # the `limits` storage, for other short-lived state
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}.{id(self):x}.{time.time_ns():x}"
        self._held: dict[str, str] = {}  # slot member -> org id, renewed while running
        self._renew_every = slot_lease_s / 3
        self._renewer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start renewing the leases of running requests' slots (Redis only), on this loop."""
        if self.remote and self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_loop(), name="slot-leases")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Call a blocking function of `storage` (the synchronous `limits` storage that other
        short-lived state uses) from the event loop: in a worker thread when it is remote."""
        if self.remote:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args))
        return fn(*args)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self.store.close()

    # --- what the caller may ask for ----------------------------------------------------------
    def max_tokens_for(self, principal: Principal, prompt_tokens: int, n: int,
                       requested: int | None, default: int, param: str) -> int:
        """Check tokens per request; with no max_tokens, default to what the plan still allows."""
        cap = principal.limits.tokens_per_request
        if cap is None or not self.enabled:
            return requested if requested is not None else default
        if requested is not None:
            total = prompt_tokens + n * requested
            if total > cap:
                raise InvalidRequestError(
                    f"This request needs {total} tokens ({prompt_tokens} in the prompt + "
                    f"{n} x {requested} max_tokens), more than the {cap} tokens per request "
                    f"your plan allows. Lower max_tokens to at most "
                    f"{max(0, (cap - prompt_tokens) // n)}.",
                    param="max_tokens", code="tokens_per_request_exceeded")
            return requested
        room = (cap - prompt_tokens) // n
        if room < 1:
            raise InvalidRequestError(
                f"The prompt is {prompt_tokens} tokens, which leaves no room for a completion "
                f"within the {cap} tokens per request your plan allows.",
                param=param, code="tokens_per_request_exceeded")
        return min(room, default)

    # --- the three steps of a request ---------------------------------------------------------
    async def count_request(self, principal: Principal) -> Quota:
        """Every authenticated request counts against its key's requests per minute; the same
        call reads what the response's rate-limit headers will need. Keep the Quota where the
        Gatekeeper finds it (request.state.quota): the headers then cost no storage read."""
        quota = self._quota(principal)
        if not self.enabled or not quota.query.counted:
            return quota
        await self._count(quota)
        return quota

    async def count_meanwhile(self, principal: Principal
                              ) -> tuple[Quota, asyncio.Task[None] | None]:
        """count_request, started rather than awaited, for a route without side effects:
        whoever sends the response awaits the task first (it raises the 429 or 503 that the
        response then becomes: Gatekeeper). The memory store has no round trip to overlap:
        it counts at once, and a refusal is raised here."""
        quota = self._quota(principal)
        if not self.enabled or not quota.query.counted:
            return quota, None
        if not self.remote:
            await self._count(quota)
            return quota, None
        return quota, asyncio.ensure_future(self._count(quota))

    def deferred(self, principal: Principal) -> Quota:
        """A Quota whose count waits for admission, which counts it in its own store call (one
        round trip fewer for an inference request). A request that ends before admission is
        counted when its response starts (`count_pending`)."""
        quota = self._quota(principal)
        quota.pending = self.enabled and quota.query.counted
        return quota

    async def count_pending(self, quota: Quota) -> None:
        """Count a deferred request that never reached admission; its response is already
        decided, so a refusal is not raised, only reflected in the headers."""
        if not quota.pending:
            return
        try:
            await self._count(quota)
        except (RateLimitError, ServiceUnavailableError):
            pass  # over the limit or Redis gone: the headers say what is known

    async def _count(self, quota: Quota) -> None:
        quota.pending = False
        try:
            allowed, quota.snapshot = await self.store.authenticate(quota.query, self._member())
        except Exception as exc:
            raise self._unavailable(exc) from exc
        if not allowed:
            raise self._too_many_requests(quota)

    def _too_many_requests(self, quota: Quota) -> RateLimitError:
        assert quota.snapshot is not None and quota.snapshot.requests is not None
        return RateLimitError(
            f"Rate limit reached for requests per minute on this API key: "
            f"{quota.principal.rate_limit} per minute.", code="requests_per_minute_exceeded",
            retry_after=quota.snapshot.requests.reset_at - time.time(),
            headers=self.headers(quota))

    async def admit(self, quota: Quota | Principal, estimate: int,
                    sequences: int = 1) -> Ticket:
        """Take a slot and reserve `estimate` tokens, or raise a 429 naming the limit. The store
        checks and reserves in one atomic step, so a refused request costs nothing and two
        replicas cannot both take the last room. Pass the request's Quota (from count_request
        or deferred) so that its headers follow; a deferred one is counted in the same step. A
        bare Principal works too, with a Quota of its own."""
        if isinstance(quota, Principal):
            quota = self._quota(quota)
        q, count = quota.query, quota.pending
        sequences = max(1, sequences)
        if self.enabled and q.concurrency is not None and sequences > q.concurrency:
            raise InvalidRequestError(
                f"This request decodes {sequences} sequences at once (n x prompts), more than "
                f"the {q.concurrency} concurrent requests your organization's plan allows. "
                f"Lower n or send fewer prompts per request.", param="n",
                code="concurrency_limit_exceeded")
        if not self.enabled or (not count and not q.tokens_per_hour and q.concurrency is None):
            return Ticket(self, quota, reserved=0)
        member = self._member()
        quota.pending = False
        try:
            result = await self.store.admit(q, estimate, member, count, sequences)
        except Exception as exc:
            raise self._unavailable(exc) from exc
        quota.update(result.usage, result.requests)
        now = time.time()
        if result.refused == "requests":
            raise self._too_many_requests(quota)
        if result.refused == "tokens":
            left = max(0, (q.tokens_per_hour or 0) - result.usage.tokens_used)
            raise RateLimitError(
                f"Rate limit reached for tokens per hour: this request may use {estimate} "
                f"tokens and {left} of your organization's {q.tokens_per_hour} tokens "
                f"per hour remain.", code="tokens_per_hour_exceeded",
                retry_after=result.usage.tokens_reset_at - now, headers=self.headers(quota))
        if result.refused == "concurrency":
            raise RateLimitError(
                f"Rate limit reached for concurrent requests: your organization already "
                f"has {result.usage.slots_in_use} of {q.concurrency} requests running.",
                code="concurrency_limit_exceeded", retry_after=CONCURRENCY_RETRY_S,
                headers=self.headers(quota))
        if q.concurrency is None:
            member = ""
        else:
            for name in slot_members(member, sequences):
                self._held[name] = q.org_id
        return Ticket(self, quota, reserved=estimate if q.tokens_per_hour else 0,
                      member=member, window=result.window, sequences=sequences)

    async def _settle(self, ticket: Ticket) -> None:
        if not ticket.member and not ticket.window:
            return  # nothing was taken
        for name in slot_members(ticket.member, ticket.sequences):
            self._held.pop(name, None)
        delta = ticket.prompt_tokens + ticket.completion_tokens - ticket.reserved
        delta = delta if ticket.window else 0
        usage: Usage | None = None
        if ticket.after_response and self.remote:  # written by release_settled()
            ticket.release = functools.partial(self.store.settle, ticket.quota.query,
                                               ticket.member, ticket.window, delta,
                                               ticket.sequences)
        else:
            try:
                usage = await self.store.settle(ticket.quota.query, ticket.member,
                                                ticket.window, delta, ticket.sequences)
            except Exception as exc:  # the lease runs out by itself; never fail the request
                log.warning("could not settle a request's limits (%s: %s); its slot's lease "
                            "will lapse", type(exc).__name__, exc)
                return
        snap = ticket.quota.snapshot
        if usage is None and snap is not None:  # sent or due, reply not awaited: the admission's
            # snapshot with this request's own settlement applied
            was = snap.usage
            usage = Usage(max(0, was.tokens_used + delta), was.tokens_reset_at,
                          max(0, was.slots_in_use - (ticket.sequences if ticket.member else 0)))
        if usage is not None:
            ticket.quota.update(usage)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._renew_every)
            try:
                await self.store.renew(dict(self._held))
            except Exception as exc:
                log.warning("could not renew concurrency leases (%s: %s)", type(exc).__name__, exc)

    def _member(self) -> str:
        """A name unique across replicas, for one request's entry or slot."""
        return f"{self._prefix}.{next(self._ids):x}"

    def _unavailable(self, exc: Exception) -> ServiceUnavailableError:
        return ServiceUnavailableError(
            f"The rate limiter's storage cannot be reached ({type(exc).__name__}: {exc}); "
            f"requests are refused until it is back.", code="rate_limiter_unavailable")

    def _quota(self, principal: Principal) -> Quota:
        limits = principal.limits
        return Quota(principal, Query(principal.org_id, principal.key_id, principal.rate_limit,
                                      limits.tokens_per_hour or None, limits.concurrent_requests))

    # --- reporting -----------------------------------------------------------------------------
    @property
    def slots_held(self) -> int:
        """Concurrency slots this replica's running requests hold now, by its own count (the
        metrics' gauge): 0 once every request has ended, or a slot was leaked."""
        return len(self._held)

    def headers(self, quota: Quota | None) -> dict[str, str]:
        """The rate-limit headers from the request's latest snapshot: no storage read."""
        return rate_limit_headers(self._windows(quota), time.time()) if quota else {}

    async def windows(self, principal: Principal) -> dict[str, Window]:
        """Where each limit stands now (one storage read, nothing counted): the dashboard's
        overview and the headers read the same numbers."""
        quota = self._quota(principal)
        if not self.enabled or not quota.query.counted:
            return {}
        try:
            quota.snapshot = await self.store.peek(quota.query)
        except Exception as exc:
            raise self._unavailable(exc) from exc
        return self._windows(quota)

    def _windows(self, quota: Quota) -> dict[str, Window]:
        snap = quota.snapshot
        if snap is None:
            return {}
        q, now = quota.query, time.time()
        windows: dict[str, Window] = {}
        if q.rpm and snap.requests is not None:
            windows["requests"] = Window(q.rpm, snap.requests.remaining, snap.requests.reset_at)
        if q.tokens_per_hour:
            windows["tokens"] = Window(q.tokens_per_hour,
                                       max(0, q.tokens_per_hour - snap.usage.tokens_used),
                                       snap.usage.tokens_reset_at)
        if q.concurrency is not None:
            windows["concurrency"] = Window(q.concurrency,
                                            max(0, q.concurrency - snap.usage.slots_in_use),
                                            math.ceil(now + CONCURRENCY_RETRY_S))
        return windows
