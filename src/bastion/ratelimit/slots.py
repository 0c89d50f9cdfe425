"""Concurrency slots: in process by default; in Redis, as leases, when replicas share limits.

A Redis slot is a member of a sorted set scored by its lease's expiry. Running requests renew
their leases; a replica that dies stops renewing, so its slots expire after one lease instead
of being held forever.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
local n = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[3])
if cap >= 0 and n >= cap then return -n - 1 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return n + 1
"""


class Slots(Protocol):
    def acquire(self, org_id: str, member: str, cap: int | None) -> tuple[bool, int]: ...
    def release(self, org_id: str, member: str) -> None: ...
    def count(self, org_id: str) -> int: ...
    def renew(self, held: dict[str, str]) -> None: ...


class MemorySlots:
    def __init__(self) -> None:
        self._held: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def acquire(self, org_id: str, member: str, cap: int | None) -> tuple[bool, int]:
        with self._lock:
            held = self._held.setdefault(org_id, set())
            if cap is not None and len(held) >= cap:
                return False, len(held)
            held.add(member)
            return True, len(held)

    def release(self, org_id: str, member: str) -> None:
        with self._lock:
            held = self._held.get(org_id)
            if held is not None:
                held.discard(member)
                if not held:
                    del self._held[org_id]

    def count(self, org_id: str) -> int:
        return len(self._held.get(org_id, ()))

    def renew(self, held: dict[str, str]) -> None:
        pass


class RedisSlots:
    def __init__(self, client: Any, lease_s: float, prefix: str = "bastion:slots:") -> None:
        self.client = client
        self.lease_s = lease_s
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)

    def acquire(self, org_id: str, member: str, cap: int | None) -> tuple[bool, int]:
        now = time.time()
        n = int(self._acquire(keys=[self.prefix + org_id],
                              args=[now, now + self.lease_s, -1 if cap is None else cap, member,
                                    int(self.lease_s * 4) + 1]))
        return (n > 0, n if n > 0 else -n - 1)

    def release(self, org_id: str, member: str) -> None:
        self.client.zrem(self.prefix + org_id, member)

    def count(self, org_id: str) -> int:
        return int(self.client.zcount(self.prefix + org_id, time.time(), "+inf"))

    def renew(self, held: dict[str, str]) -> None:
        """held: member -> org id. Only members still present are renewed (XX)."""
        if not held:
            return
        expiry = time.time() + self.lease_s
        pipe = self.client.pipeline(transaction=False)
        for member, org_id in held.items():
            pipe.zadd(self.prefix + org_id, {member: expiry}, xx=True)
            pipe.expire(self.prefix + org_id, int(self.lease_s * 4) + 1)
        pipe.execute()
