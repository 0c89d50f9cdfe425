"""Where rate-limit state lives, behind one small async protocol with at most three calls per
request.

A request touches its limits at most three times, each one call to the store (one round trip
when the store is Redis): `authenticate` (count the request against its key's requests per
minute and read everything the rate-limit headers need), `admit` (atomically check tokens per
hour and concurrency, then take a slot and reserve the tokens) and `settle` (release the slot and
refund what was reserved but not used, if the reservation's token window is still the live one).
An inference request folds the first into the second (`admit(..., count=True)`), so it makes
two. Each call returns a fresh snapshot, so the response headers are computed from the last one
without another read; `RedisStore.settle` is the exception: it returns once its release is
written to Redis and reads the reply in the background (None: the limiter applies the
request's own settlement to the admission's snapshot), which takes its round trip off the
request's path.

The protocol is async so that Redis round trips run on the event loop (redis.asyncio) instead of
hopping to a worker thread and back for each one. `MemoryStore` keeps counters in the `limits`
library's MemoryStorage (moving window for requests per minute, a fixed-window counter for
tokens per hour) and concurrency slots in a dict; its methods never await, so each runs to
completion on the loop without a thread hop, and a check and the reservation that follows it
are one atomic step within the process (the lock guards against callers on other threads).
`RedisStore` (redis_store.py) does the same in Redis for several replicas.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Literal, Protocol

from limits.storage import MemoryStorage

RPM_WINDOW_S = 60


@dataclass(frozen=True)
class Query:
    """One principal's limits, as a store needs them (None: not limited)."""

    org_id: str
    key_id: str
    rpm: int | None
    tokens_per_hour: int | None
    concurrency: int | None

    @property
    def counted(self) -> bool:
        """Whether anything about this principal is counted at all."""
        return bool(self.rpm or self.tokens_per_hour or self.concurrency is not None)


@dataclass(frozen=True)
class Requests:
    """The key's requests-per-minute window after this request was counted."""

    remaining: int
    reset_at: float  # epoch seconds on this host's clock


@dataclass(frozen=True)
class Usage:
    """The organisation's token window and running requests."""

    tokens_used: int
    tokens_reset_at: float  # epoch seconds on this host's clock
    slots_in_use: int


@dataclass(frozen=True)
class Snapshot:
    requests: Requests | None
    usage: Usage


@dataclass(frozen=True)
class Admission:
    refused: Literal["requests", "tokens", "concurrency"] | None
    usage: Usage
    window: str  # identity of the token window the reservation was counted in ("" if none)
    requests: Requests | None = None  # the key's window, when admit also counted the request


def slot_members(member: str, sequences: int) -> list[str]:
    """The slots one request holds: one per sequence it decodes at once (n choices of each
    prompt), named after its member."""
    return [member, *(f"{member}/{i}" for i in range(1, max(1, sequences)))]


class Store(Protocol):
    async def authenticate(self, q: Query, member: str) -> tuple[bool, Snapshot]: ...
    async def peek(self, q: Query) -> Snapshot: ...
    async def admit(self, q: Query, estimate: int, member: str, count: bool,
                    sequences: int = 1) -> Admission: ...
    # None: the release was sent and its reply is not awaited (the caller estimates the usage)
    async def settle(self, q: Query, member: str, window: str, delta: int,
                     sequences: int = 1) -> Usage | None: ...
    async def renew(self, held: dict[str, str]) -> None: ...
    async def close(self) -> None: ...


EXPIRE_EVERY_S = 1.0


class _MemoryStorage(MemoryStorage):
    """`limits`' MemoryStorage, dropping expired entries at most once a second. Its own
    schedule starts a new Timer thread whenever the last one has run (10 ms later), so with
    requests more than 10 ms apart every request started a thread and waited for it to be
    scheduled: 250 µs at p50 per admission in process, and 0.6 ms per request added through
    HTTP on 2 busy cores, against 37 µs back to back. Counters still expire exactly (they are
    checked when read), and a moving window's entries are counted by time, not by presence."""

    _next_expiry = 0.0

    def _MemoryStorage__schedule_expiry(self) -> None:  # the base class's private hook
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRE_EVERY_S
            super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]


class MemoryStore:
    """Limits of one process, in `limits`' MemoryStorage (in process: about 30 µs a request)."""

    def __init__(self, token_window_s: int) -> None:
        self.storage = _MemoryStorage()
        self.window_s = token_window_s
        self._slots: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    async def authenticate(self, q: Query, member: str) -> tuple[bool, Snapshot]:
        with self._lock:
            allowed, requests = self._count(q)
            return allowed, Snapshot(requests, self._usage(q))

    def _count(self, q: Query) -> tuple[bool, Requests | None]:
        if not q.rpm:
            return True, None
        key = f"rpm/{q.key_id}"
        allowed = self.storage.acquire_entry(key, q.rpm, RPM_WINDOW_S)
        oldest, count = self.storage.get_moving_window(key, q.rpm, RPM_WINDOW_S)
        return allowed, Requests(max(0, q.rpm - count), oldest + RPM_WINDOW_S)

    async def peek(self, q: Query) -> Snapshot:
        """Where the limits stand, counting nothing (the dashboard's view)."""
        with self._lock:
            requests = None
            if q.rpm:
                oldest, count = self.storage.get_moving_window(f"rpm/{q.key_id}", q.rpm,
                                                               RPM_WINDOW_S)
                reset = oldest + RPM_WINDOW_S if count else time.time() + RPM_WINDOW_S
                requests = Requests(max(0, q.rpm - count), reset)
            return Snapshot(requests, self._usage(q))

    async def admit(self, q: Query, estimate: int, member: str, count: bool,
                    sequences: int = 1) -> Admission:
        with self._lock:  # check and reserve are one step: no other admission in between
            allowed, requests = self._count(q) if count else (True, None)
            usage = self._usage(q)
            if not allowed:
                return Admission("requests", usage, "", requests)
            if q.tokens_per_hour and usage.tokens_used + estimate > q.tokens_per_hour:
                return Admission("tokens", usage, "", requests)
            held = self._slots.setdefault(q.org_id, set())
            if q.concurrency is not None:
                if len(held) + sequences > q.concurrency:
                    return Admission("concurrency", usage, "", requests)
                held.update(slot_members(member, sequences))
            window = ""
            if q.tokens_per_hour:
                key = f"tokens/{q.org_id}"
                self.storage.incr(key, self.window_s, estimate)
                window = repr(self.storage.get_expiry(key))  # a window is known by its end
            return Admission(None, self._usage(q), window, requests)

    async def settle(self, q: Query, member: str, window: str, delta: int,
                     sequences: int = 1) -> Usage:
        with self._lock:
            held = self._slots.get(q.org_id)
            if held is not None:
                held.difference_update(slot_members(member, sequences))
                if not held:
                    del self._slots[q.org_id]
            key = f"tokens/{q.org_id}"
            # only into the window the reservation was counted in: a closed window is gone, and
            # a new one never saw the reservation
            if delta and window and self.storage.get(key) and \
                    repr(self.storage.get_expiry(key)) == window:
                self.storage.incr(key, self.window_s, max(delta, -self.storage.get(key)))
            return self._usage(q)

    async def renew(self, held: dict[str, str]) -> None:
        """Nothing to renew: a process's own memory cannot outlive it."""

    async def close(self) -> None:
        pass

    def _usage(self, q: Query) -> Usage:
        now = time.time()
        used, reset = 0, now + self.window_s
        if q.tokens_per_hour:
            key = f"tokens/{q.org_id}"
            used = self.storage.get(key)
            if used:
                reset = self.storage.get_expiry(key)
        return Usage(used, reset, len(self._slots.get(q.org_id, ())))
