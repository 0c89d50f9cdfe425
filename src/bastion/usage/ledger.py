"""Batched ledger writes: requests only enqueue; a writer thread inserts once a second, so a
crash loses at most the last second of rows, and a duplicate request id is never counted twice."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import Engine, insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bastion.db.tables import UsageRecord

log = logging.getLogger("bastion.usage")
FLUSH_INTERVAL_S = 1.0
MAX_BATCH = 1000


@dataclass(frozen=True)
class UsageRow:
    request_id: str
    org_id: str
    key_id: str
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    status: str
    latency_ms: int
    created_at: datetime


class Ledger:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._rows: queue.SimpleQueue[UsageRow | None] = queue.SimpleQueue()
        self._flushed = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="usage-ledger", daemon=True)
        self._thread.start()

    def record(self, row: UsageRow) -> None:
        with self._flushed:
            self._pending += 1
        self._rows.put(row)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything recorded so far is in the database."""
        with self._flushed:
            return self._flushed.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self._rows.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[UsageRow] = []
            try:
                first = self._rows.get(timeout=FLUSH_INTERVAL_S)
            except queue.Empty:
                continue
            if first is None:
                stopping = True
            else:
                batch.append(first)
            while len(batch) < MAX_BATCH:
                try:
                    item = self._rows.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    continue
                batch.append(item)
            if batch:
                self._write(batch)

    def _write(self, batch: list[UsageRow]) -> None:
        values = [asdict(r) for r in batch]
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            stmt = sqlite_insert(UsageRecord).on_conflict_do_nothing()
        elif dialect == "postgresql":
            stmt = pg_insert(UsageRecord).on_conflict_do_nothing()
        else:
            stmt = insert(UsageRecord)
        try:
            with self.engine.begin() as conn:
                conn.execute(stmt, values)
        except Exception:  # the ledger must never take a request down; keep serving
            log.exception("could not write %d usage rows", len(batch))
        finally:
            with self._flushed:
                self._pending -= len(batch)
                self._flushed.notify_all()
