"""Batched ledger writes: requests only enqueue; one writer thread inserts whatever has queued
up, retries a busy database, and never counts a duplicate request id twice.

The writer sleeps until a row arrives (nothing to write costs nothing: no wake-ups, no
transactions), then collects for COLLECT_S and writes the batch in one transaction. A row is in
the database at most COLLECT_S plus a write (two, when it arrives during one) after it was
recorded, so a hard kill loses only that much (tests/test_kill.py holds it under a second)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from bastion.db.tables import UsageRecord

log = logging.getLogger("bastion.usage")
# How long the writer collects after a row arrives. Writing each row as it came cost a
# transaction per request (at 300 requests/s, a tenth of a core beside the request path).
COLLECT_S = 0.2
MAX_BATCH = 1000
WRITE_ATTEMPTS = 10
# The endpoint of a fine-tuning job's row (one per job; its request id is the job's id).
FINE_TUNING_ENDPOINT = "/v1/fine_tuning/jobs"


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
    cached_tokens: int = 0  # of prompt_tokens, those the engine's prefix cache reused
    trained_tokens: int = 0  # a fine-tuning job's row: tokens x epochs trained


def idempotent_insert(dialect: str) -> Any:
    """An INSERT that skips a row whose (org, request id) is already there, where the database
    can say so (SQLite, PostgreSQL); elsewhere a plain INSERT."""
    return (sqlite_insert(UsageRecord).on_conflict_do_nothing() if dialect == "sqlite"
            else pg_insert(UsageRecord).on_conflict_do_nothing() if dialect == "postgresql"
            else insert(UsageRecord))


def record_in(session: Session, row: UsageRow) -> None:
    """One row written in the caller's own transaction, at most once per (org, request id):
    for usage decided by a state change (a fine-tuning job ending), billed exactly when that
    change commits, whichever process makes it and however often it is retried."""
    session.execute(idempotent_insert(session.get_bind().dialect.name).values(**asdict(row)))


class Ledger:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Idempotent inserts (a retried batch, or a retried request, never double-counts):
        # ON CONFLICT DO NOTHING where the database has it, else the plain INSERT every
        # database has, and a duplicate makes _write fall back to row by row.
        self._plain = insert(UsageRecord)
        self._insert = idempotent_insert(engine.dialect.name)
        self.duplicates = 0  # rows skipped because their request was already billed
        self._rows: queue.SimpleQueue[UsageRow | None] = queue.SimpleQueue()
        self._flushed = threading.Condition()
        self._hurry = threading.Event()  # flush(): write what has queued without collecting
        self._recorded = 0  # rows handed to the ledger so far
        self._written = 0  # rows that reached the database (or were given up on)
        self._thread = threading.Thread(target=self._run, name="usage-ledger", daemon=True)
        self._thread.start()

    def record(self, row: UsageRow) -> None:
        with self._flushed:
            self._recorded += 1
            self._rows.put(row)

    @property
    def pending(self) -> int:
        """Rows recorded and not yet written: the writer's queue (a metric)."""
        return self._recorded - self._written

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row recorded before this call is in the database (rows recorded
        later, by other requests, are not waited for)."""
        with self._flushed:
            target = self._recorded
            self._hurry.set()
            return self._flushed.wait_for(lambda: self._written >= target, timeout)

    def close(self) -> None:
        self._rows.put(None)
        self._hurry.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[UsageRow] = []
            first = self._rows.get()  # asleep until a row (or close's None) arrives
            if first is None:
                stopping = True
            else:
                batch.append(first)
                self._hurry.wait(COLLECT_S)
            self._hurry.clear()
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
        stmt = self._insert
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self.engine.begin() as conn:
                    conn.execute(stmt, values)
                break
            except IntegrityError:
                # a duplicate (request already billed) where the database has no ON CONFLICT
                # DO NOTHING: the whole statement was rolled back, so write row by row
                # and skip only the duplicates, never the batch
                self._write_each(values)
                break
            except Exception:  # e.g. "database is locked": wait and try again
                if attempt == WRITE_ATTEMPTS - 1:
                    log.exception("gave up writing %d usage rows", len(batch))
                else:
                    time.sleep(0.2 * (attempt + 1))
        with self._flushed:
            self._written += len(batch)
            self._flushed.notify_all()

    def _write_each(self, values: list[dict]) -> None:
        """One transaction per row; a row whose (org, request) is already there is skipped."""
        for row in values:
            for attempt in range(WRITE_ATTEMPTS):
                try:
                    with self.engine.begin() as conn:
                        conn.execute(self._plain, [row])
                    break
                except IntegrityError:
                    self.duplicates += 1
                    log.info("usage row of request %s refused as a duplicate; skipped",
                             row["request_id"])
                    break
                except Exception:
                    if attempt == WRITE_ATTEMPTS - 1:
                        log.exception("gave up writing the usage row of request %s",
                                      row["request_id"])
                    else:
                        time.sleep(0.2 * (attempt + 1))
