"""One pipelined connection to Redis for the limiter's scripts: each call is written at once and
its reply matched in order (Redis answers a connection's commands in the order they came),
parsed by hiredis as the bytes arrive.

Why not redis-py's asyncio connection for these calls: its reply goes through a StreamReader,
a parser object and a few coroutine layers before the caller wakes, and each call needs a
connection of its own from a pool. With the event loop idle between calls, as on a server
between requests, one admission script took 180 µs at p50 through it against 100 µs here (in
process, uvloop, loopback Redis); inside the server under the admission benchmark, 295 against
223 µs. A release that nobody waits for is one `transport.write` here, its reply a callback.
(Through HTTP the gain is within the noise of a Redis that wakes slowly: bench/README.md.)

Connecting is still redis-py's: a connection of the client's own pool is opened (TCP, Unix
socket, TLS, Sentinel's master lookup), authenticated and switched to its database by
redis-py, and only then is its transport handed to this protocol. So every URL that `limits`
accepts keeps working, and none of that is written here.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import hiredis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


_NOT_YET = object()  # hiredis's "no whole reply yet" (its default, False, is also RESP3's false)

# Replies after which this connection must not be used again: a failover made the server a
# replica (redis-py's Sentinel connections disconnect on them too).
_RECONNECT_ON = ("READONLY", "MASTERDOWN")


class _Replies(asyncio.Protocol):
    """The connection's reading side: replies go to the oldest waiting call. A call that has
    waited longer than `timeout_s` means Redis has stalled: the connection is dropped and every
    waiting call fails, so that requests are refused (503) instead of hanging."""

    def __init__(self, transport: asyncio.Transport, timeout_s: float) -> None:
        self.transport = transport
        self.timeout_s = timeout_s
        self.reader = hiredis.Reader(notEnoughData=_NOT_YET)
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.lost: Exception | None = None
        self.streams: tuple[Any, ...] = ()  # kept alive, unused: see RedisPipe._connect
        self._timer: asyncio.TimerHandle | None = None

    @property
    def usable(self) -> bool:
        return self.lost is None and not self.transport.is_closing()

    def call(self, packed: bytes) -> asyncio.Future[Any]:
        if self.lost is not None:
            raise self.lost
        loop = asyncio.get_running_loop()
        self.transport.write(packed)
        future = loop.create_future()
        self.waiting.append((future, time.monotonic() + self.timeout_s))
        if self._timer is None:
            self._timer = loop.call_later(self.timeout_s, self._check)
        return future

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not _NOT_YET:
                future, _ = self.waiting.popleft()
                if not isinstance(reply, hiredis.ReplyError):
                    if not future.done():  # done: its caller went away
                        future.set_result(reply)
                    continue
                text = str(reply)
                error = NoScriptError(text) if text.startswith("NOSCRIPT") else \
                    ResponseError(text)
                if not future.done():
                    future.set_exception(error)
                if text.startswith(_RECONNECT_ON):
                    self._fail(ConnectionError(f"Redis can no longer take writes here: {text}"))
                    return
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self._fail(ConnectionError(f"unexpected data from Redis: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"Redis closed the connection ({exc or 'end of stream'})"))

    def _check(self) -> None:
        self._timer = None
        if not self.waiting:
            return
        deadline = self.waiting[0][1]
        if time.monotonic() >= deadline:
            self._fail(RedisTimeoutError(f"Redis did not answer within {self.timeout_s:g} s"))
        else:
            self._timer = asyncio.get_running_loop().call_later(deadline - time.monotonic(),
                                                                self._check)

    def _fail(self, exc: Exception) -> None:
        if self.lost is None:
            self.lost = exc
        self.transport.abort()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)


class RedisPipe:
    """Calls on one connection, (re)opened on first use after a failure."""

    def __init__(self, pool: Any, timeout_s: float) -> None:
        self.pool = pool  # redis-py's asyncio ConnectionPool: it connects and authenticates
        self.timeout_s = timeout_s
        self._replies: _Replies | None = None
        self._connecting: asyncio.Task[_Replies] | None = None
        self._closed = False

    async def _open(self) -> _Replies:
        for _ in range(3):  # a connection that dies as it opens is replaced, within reason
            if self._closed:
                raise ConnectionError("the rate limiter's Redis connection is closed")
            replies = self._replies
            if replies is not None and replies.usable:
                return replies
            connecting = self._connecting
            if connecting is None:  # one connection attempt, shared by whoever waits for it
                connecting = self._connecting = asyncio.ensure_future(self._connect())
                connecting.add_done_callback(self._connected)
            # shielded: a caller that is cancelled (its client left) does not cancel the
            # attempt that the others wait for; a failed attempt fails them all, once
            await asyncio.shield(connecting)
        raise ConnectionError("Redis closed every new connection at once")

    def _connected(self, task: asyncio.Task[_Replies]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved here too: nobody may be waiting any more

    async def _connect(self) -> _Replies:
        conn = self.pool.make_connection()
        await conn.connect()  # TCP or Unix socket, TLS, AUTH, SELECT: all redis-py's
        streams = conn._reader, conn._writer
        transport = streams[1].transport
        replies = _Replies(transport, self.timeout_s)
        transport.set_protocol(replies)
        # The transport is ours from here. redis-py's connection forgets it (it closes it when
        # garbage-collected), and the streams live as long as the protocol: a StreamWriter
        # closes its transport when it is collected.
        conn._writer = conn._reader = None
        replies.streams = streams
        if self._closed:  # closed while this connected
            replies._fail(ConnectionError("the rate limiter's Redis connection is closed"))
        self._replies = replies
        return replies

    async def send(self, *args: Any) -> asyncio.Future[Any]:
        """Write one command now; the returned future holds its reply (or its failure)."""
        replies = await self._open()
        return replies.call(pack(args))

    async def call(self, *args: Any) -> Any:
        return await (await self.send(*args))

    async def close(self) -> None:
        """Final: calls still waiting fail now, later ones at once."""
        self._closed = True
        if self._replies is not None:
            self._replies._fail(ConnectionError("the rate limiter's Redis connection is closed"))
            self._replies = None
