"""The bridge between an engine's own decoding thread and the event loop that serves a request:
the thread pushes lists of events into a sink, then DONE or an EngineError; the request reads
them as an async iterator, and a reader that goes away cancels its job at once."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from bastion.engines.base import EngineError, Event

DONE = object()  # pushed to a sink after the last event of a request
Sink = Callable[[object], None]


async def events_from_thread(submit: Callable[[Sink], Any],
                             cancel: Callable[[Any], None]) -> AsyncIterator[Event]:
    """`submit(sink)` hands a job to the thread and returns its handle; `cancel(handle)` runs
    if the consumer stops reading before DONE."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[object] = asyncio.Queue()

    def sink(item: object) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, item)
        except RuntimeError:  # the loop is gone; nobody is listening any more
            pass

    handle = submit(sink)
    done = False
    try:
        while True:
            item = await inbox.get()
            if item is DONE:
                done = True
                return
            if isinstance(item, EngineError):
                done = True
                raise item
            for event in item:  # type: ignore[attr-defined]
                yield event
    finally:
        if not done:  # the consumer went away: free the job's sequences at once
            cancel(handle)
