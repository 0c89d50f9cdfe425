"""The limiter: admits a request against its organisation's plan and its key's rate, and
settles the reservation to the real usage when the request ends, however it ends.

Counters live in a `limits` storage (memory by default); concurrency slots are counted in
process (shared slots across replicas come with the Redis storage).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from limits import RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.storage import MemoryStorage, Storage
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from bastion.errors import InvalidRequestError, RateLimitError
from bastion.ratelimit.headers import Window, rate_limit_headers
from bastion.tenancy.keys import Principal

CONCURRENCY_RETRY_S = 1.0  # a slot frees when some running request ends: poll again soon


@dataclass
class Ticket:
    """One admitted request. `settle` is idempotent: the first call wins."""

    limiter: "Limiter"
    principal: Principal
    reserved: int
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
    def __init__(self, storage: Storage | None = None, token_window_s: int = 3600,
                 enabled: bool = True) -> None:
        self.storage = storage or MemoryStorage()
        self.token_window_s = token_window_s
        self.enabled = enabled  # off: admit everything, count nothing (BASTION_RATE_LIMITS=false)
        self.moving = MovingWindowRateLimiter(self.storage)
        self.fixed = FixedWindowRateLimiter(self.storage)
        self._slots: dict[str, int] = {}
        self._lock = threading.Lock()

    # --- what the caller may ask for ----------------------------------------------------------
    def max_tokens_for(self, principal: Principal, prompt_tokens: int, n: int,
                       requested: int | None, default: int, param: str) -> int | None:
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
    def admit(self, principal: Principal, estimate: int) -> Ticket:
        """Take a slot and reserve `estimate` tokens, or raise a 429 naming the limit. Every
        check passes before anything is counted, so a refused request costs nothing."""
        if not self.enabled:
            return Ticket(self, principal, reserved=0)
        limits = principal.limits
        now = time.time()
        rpm = self._rpm_item(principal)
        tph = self._tph_item(principal)
        with self._lock:
            if rpm is not None and not self.moving.test(rpm, principal.key_id):
                stats = self.moving.get_window_stats(rpm, principal.key_id)
                raise RateLimitError(
                    f"Rate limit reached for requests per minute on this API key: "
                    f"{principal.rate_limit} per minute.", code="requests_per_minute_exceeded",
                    retry_after=stats.reset_time - now, headers=self.headers(principal))
            if tph is not None and not self.fixed.test(tph, principal.org_id, cost=estimate):
                stats = self.fixed.get_window_stats(tph, principal.org_id)
                raise RateLimitError(
                    f"Rate limit reached for tokens per hour: this request may use {estimate} "
                    f"tokens and {max(0, stats.remaining)} of your organization's "
                    f"{limits.tokens_per_hour} tokens per hour remain.",
                    code="tokens_per_hour_exceeded", retry_after=stats.reset_time - now,
                    headers=self.headers(principal))
            used = self._slots.get(principal.org_id, 0)
            cap = limits.concurrent_requests
            if cap is not None and used >= cap:
                raise RateLimitError(
                    f"Rate limit reached for concurrent requests: your organization already "
                    f"has {used} of {cap} requests running.", code="concurrency_limit_exceeded",
                    retry_after=CONCURRENCY_RETRY_S, headers=self.headers(principal))
            self._slots[principal.org_id] = used + 1
            if rpm is not None:
                self.moving.hit(rpm, principal.key_id)
            if tph is not None:
                self.fixed.hit(tph, principal.org_id, cost=estimate)
        return Ticket(self, principal, reserved=estimate)

    def _settle(self, ticket: Ticket) -> None:
        if not self.enabled:
            return
        p = ticket.principal
        tph = self._tph_item(p)
        refund = ticket.reserved - (ticket.prompt_tokens + ticket.completion_tokens)
        with self._lock:
            left = self._slots.get(p.org_id, 1) - 1
            if left > 0:
                self._slots[p.org_id] = left
            else:
                self._slots.pop(p.org_id, None)
            if tph is not None and refund:
                self.fixed.hit(tph, p.org_id, cost=-refund)  # a negative hit gives tokens back

    # --- reporting -----------------------------------------------------------------------------
    def running(self, org_id: str) -> int:
        return self._slots.get(org_id, 0)

    def headers(self, principal: Principal) -> dict[str, str]:
        if not self.enabled:
            return {}
        now = time.time()
        windows: dict[str, Window] = {}
        rpm = self._rpm_item(principal)
        if rpm is not None:
            s = self.moving.get_window_stats(rpm, principal.key_id)
            windows["requests"] = Window(rpm.amount, s.remaining, s.reset_time)
        tph = self._tph_item(principal)
        if tph is not None:
            s = self.fixed.get_window_stats(tph, principal.org_id)
            windows["tokens"] = Window(tph.amount, max(0, s.remaining), s.reset_time)
        cap = principal.limits.concurrent_requests
        if cap is not None:
            windows["concurrency"] = Window(cap, max(0, cap - self.running(principal.org_id)),
                                            math.ceil(now + CONCURRENCY_RETRY_S))
        return rate_limit_headers(windows, now)

    def _rpm_item(self, principal: Principal) -> RateLimitItemPerMinute | None:
        return RateLimitItemPerMinute(principal.rate_limit) if principal.rate_limit else None

    def _tph_item(self, principal: Principal) -> RateLimitItemPerSecond | None:
        """Tokens per hour (the window is shorter only where a test configures it)."""
        cap = principal.limits.tokens_per_hour
        return RateLimitItemPerSecond(cap, self.token_window_s) if cap else None
