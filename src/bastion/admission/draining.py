"""Requests in flight, so that a SIGTERM can drain them; shared by every transport."""

from __future__ import annotations

import asyncio


class Lifecycle:
    """Counts requests in flight so that a SIGTERM can wait for them before aborting the rest."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.sockets = 0  # WebSockets open now (the metrics' gauge), authenticated or not
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
