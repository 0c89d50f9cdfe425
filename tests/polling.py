"""Waiting for a real server to reach a state, in one place instead of deadline loops by hand.

A server settles things a moment after the response that caused them (the ledger writes in
batches, a cancelled stream frees its slot when the generation unwinds), so tests look again
until the state is reached or a timeout passes. `wait_until` fails the test at the timeout;
`poll` hands back the last value so the caller asserts on it with its own message.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def poll(fetch: Callable[[], T], until: Callable[[T], object] = bool, *, timeout: float,
         interval: float = 0.2) -> T:
    """The first value of `fetch()` that `until` accepts, or the last one once `timeout`
    seconds have passed; the caller then asserts on it (a timeout is not a failure here)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if until(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(fetch: Callable[[], T], until: Callable[[T], object] = bool, *, timeout: float,
               interval: float = 0.2,
               message: object | Callable[[T], object] = "condition not reached") -> T:
    """The first value of `fetch()` that `until` accepts (by default: the first truthy one);
    after `timeout` seconds the test fails with `message` (called with the last value when it
    is a function, so it can say what was seen instead)."""
    value = poll(fetch, until, timeout=timeout, interval=interval)
    if not until(value):
        raise AssertionError(message(value) if callable(message) else message)
    return value
