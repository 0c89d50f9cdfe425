"""The limiter: admits a request against its organisation's plan and its key's rate, and
settles the reservation to the real usage when the request ends, however it ends.

Counters live in a `limits` storage: memory by default, Redis (BASTION_REDIS_URL) when replicas
must share them; concurrency slots live beside them (see slots.py). If Redis cannot be
reached the limiter fails closed: requests get a 503 that says why, never unlimited service.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import anyio

from limits import RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from bastion.errors import InvalidRequestError, RateLimitError, ServiceUnavailableError
from bastion.ratelimit.headers import Window, rate_limit_headers
from bastion.ratelimit.slots import MemorySlots, RedisSlots, Slots
from bastion.tenancy.keys import Principal

log = logging.getLogger("bastion.ratelimit")
T = TypeVar("T")
CONCURRENCY_RETRY_S = 1.0  # a slot frees when some running request ends: poll again soon
# The token counter's own ceiling: the plan's cap is compared by hand, so that the counter's
# key does not change with the plan (a plan change must not hand out a fresh hour).
TOKEN_COUNTER_CEILING = 10**15
_ids = itertools.count()


@dataclass
class Ticket:
    """One admitted request. `settle` is idempotent: the first call wins."""

    limiter: "Limiter"
    principal: Principal
    reserved: int
    member: str = ""
    window_reset: float = 0.0  # the token window this reservation was counted in
    started: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: str = "ok"
    done: bool = False
    on_settle: list[Callable[["Ticket"], None]] = field(default_factory=list)

    def settle(self) -> None:
        if self.done:
            return
        self.done = True
        self.limiter._settle(self)
        for callback in self.on_settle:
            callback(self)


class Limiter:
    def __init__(self, storage_url: str | None = None, token_window_s: int = 3600,
                 enabled: bool = True, slot_lease_s: float = 30.0) -> None:
        self.enabled = enabled  # off: admit everything, count nothing (BASTION_RATE_LIMITS=false)
        self.token_window_s = token_window_s
        # Timeouts: an unreachable Redis must fail requests closed, not hang them.
        self.storage: Storage = (storage_from_string(storage_url, socket_timeout=2,
                                                     socket_connect_timeout=2)
                                 if storage_url else MemoryStorage())
        self.remote = storage_url is not None
        self.slots: Slots = (RedisSlots(self.storage.get_connection(), slot_lease_s)  # type: ignore[attr-defined]
                             if self.remote else MemorySlots())
        self.moving = MovingWindowRateLimiter(self.storage)
        self.fixed = FixedWindowRateLimiter(self.storage)
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # slot member -> org id, renewed while running
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        if self.remote:
            self._renewer = threading.Thread(target=self._renew_loop, args=(slot_lease_s / 3,),
                                             name="slot-leases", daemon=True)
            self._renewer.start()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Call one of the limiter's methods from the event loop: in a worker thread when its
        storage is remote (a network round trip must not hold up the loop), inline otherwise."""
        if self.remote:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args))
        return fn(*args)

    def close(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)

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

    # --- admission ------------------------------------------------------------------------------
    def count_request(self, principal: Principal) -> None:
        """Every authenticated request counts against its key's requests per minute."""
        rpm = self._rpm_item(principal)
        if not self.enabled or rpm is None:
            return
        try:
            if self.moving.hit(rpm, principal.key_id):
                return
            stats = self.moving.get_window_stats(rpm, principal.key_id)
        except Exception as exc:
            raise self._unavailable(exc) from exc
        raise RateLimitError(
            f"Rate limit reached for requests per minute on this API key: "
            f"{principal.rate_limit} per minute.", code="requests_per_minute_exceeded",
            retry_after=stats.reset_time - time.time(), headers=self.headers(principal))

    def admit(self, principal: Principal, estimate: int) -> Ticket:
        """Take a slot and reserve `estimate` tokens, or raise a 429 naming the limit. Every
        check passes before anything is counted, so a refused request costs nothing."""
        if not self.enabled:
            return Ticket(self, principal, reserved=0)
        try:
            with self._lock:
                return self._admit(principal, estimate)
        except (RateLimitError, InvalidRequestError):
            raise
        except Exception as exc:
            raise self._unavailable(exc) from exc

    def _admit(self, principal: Principal, estimate: int) -> Ticket:
        limits = principal.limits
        now = time.time()
        tph = self._tph_item(principal)
        reset = 0.0  # end of the token window this reservation is counted in
        if tph is not None:
            left, reset = self._tokens_left(principal)
            if estimate > left:
                raise RateLimitError(
                    f"Rate limit reached for tokens per hour: this request may use {estimate} "
                    f"tokens and {left} of your organization's {limits.tokens_per_hour} tokens "
                    f"per hour remain.", code="tokens_per_hour_exceeded",
                    retry_after=reset - now, headers=self.headers(principal))
        member = f"{id(self):x}-{next(_ids)}-{now:.6f}"
        ok, used = self.slots.acquire(principal.org_id, member, limits.concurrent_requests)
        if not ok:
            raise RateLimitError(
                f"Rate limit reached for concurrent requests: your organization already "
                f"has {used} of {limits.concurrent_requests} requests running.",
                code="concurrency_limit_exceeded", retry_after=CONCURRENCY_RETRY_S,
                headers=self.headers(principal))
        self._held[member] = principal.org_id
        try:
            if tph is not None:
                self.fixed.hit(tph, principal.org_id, cost=estimate)
        except Exception:  # never keep (and keep renewing) a slot of a refused request
            self._held.pop(member, None)
            self.slots.release(principal.org_id, member)
            raise
        return Ticket(self, principal, reserved=estimate, member=member, window_reset=reset)

    def _tokens_left(self, principal: Principal) -> tuple[int, float]:
        tph = self._tph_item(principal)
        assert tph is not None and principal.limits.tokens_per_hour is not None
        stats = self.fixed.get_window_stats(tph, principal.org_id)
        used = max(0, TOKEN_COUNTER_CEILING - stats.remaining)
        return max(0, principal.limits.tokens_per_hour - used), stats.reset_time

    def _settle(self, ticket: Ticket) -> None:
        if not self.enabled:
            return
        p = ticket.principal
        tph = self._tph_item(p)
        refund = ticket.reserved - (ticket.prompt_tokens + ticket.completion_tokens)
        try:
            with self._lock:
                self._held.pop(ticket.member, None)
                self.slots.release(p.org_id, ticket.member)
                # Give back what was reserved but not used, unless the window it was counted
                # in has already closed (its counter is gone; a refund would go negative).
                if tph is not None and refund and time.time() < ticket.window_reset:
                    self.fixed.hit(tph, p.org_id, cost=-refund)
        except Exception:  # the lease runs out by itself; never fail the finished request
            log.exception("could not settle a request's limits")

    def _renew_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                with self._lock:
                    held = dict(self._held)
                self.slots.renew(held)
            except Exception:
                log.warning("could not renew concurrency leases", exc_info=True)

    def _unavailable(self, exc: Exception) -> ServiceUnavailableError:
        return ServiceUnavailableError(
            f"The rate limiter's storage cannot be reached ({type(exc).__name__}: {exc}); "
            f"requests are refused until it is back.", code="rate_limiter_unavailable")

    # --- reporting -----------------------------------------------------------------------------
    def headers(self, principal: Principal) -> dict[str, str]:
        if not self.enabled:
            return {}
        return rate_limit_headers(self.windows(principal), time.time())

    def windows(self, principal: Principal) -> dict[str, Window]:
        """Where each limit stands now (requests, tokens, concurrency): the headers and the
        dashboard's overview read the same numbers."""
        if not self.enabled:
            return {}
        now = time.time()
        windows: dict[str, Window] = {}
        rpm = self._rpm_item(principal)
        if rpm is not None:
            s = self.moving.get_window_stats(rpm, principal.key_id)
            windows["requests"] = Window(rpm.amount, s.remaining, s.reset_time)
        cap_tokens = principal.limits.tokens_per_hour
        if cap_tokens:
            left, reset = self._tokens_left(principal)
            windows["tokens"] = Window(cap_tokens, left, reset)
        cap = principal.limits.concurrent_requests
        if cap is not None:
            windows["concurrency"] = Window(cap, max(0, cap - self.slots.count(principal.org_id)),
                                            math.ceil(now + CONCURRENCY_RETRY_S))
        return windows

    def _rpm_item(self, principal: Principal) -> RateLimitItemPerMinute | None:
        return RateLimitItemPerMinute(principal.rate_limit) if principal.rate_limit else None

    def _tph_item(self, principal: Principal) -> RateLimitItemPerSecond | None:
        """The organisation's token counter for the hour (shorter only where a test sets it)."""
        if not principal.limits.tokens_per_hour:
            return None
        return RateLimitItemPerSecond(TOKEN_COUNTER_CEILING, self.token_window_s)
