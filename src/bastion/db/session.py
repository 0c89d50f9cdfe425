"""Engine and session factory; migrations run through Alembic at start-up, one process at a
time (replicas started together on a fresh database would otherwise both create the schema and
the default organisation)."""

from __future__ import annotations

import fcntl
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"
# pg_advisory_lock key for start-up (migrations and bootstrap): any fixed 64-bit number
STARTUP_LOCK_ID = 0x62617374696F6E  # "bastion"
log = logging.getLogger("bastion.db")
WAITING = "waiting for another process to finish migrating the database"


# Request handlers reach the database from worker threads (anyio's pool has 40): a pool
# smaller than that made concurrent requests open, set up and close a connection each.
POOL = {"pool_size": 40, "max_overflow": 10}
POSTGRES_POOL = {"pool_size": 10, "max_overflow": 20}  # within max_connections=100 for 3 replicas


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        in_memory = make_url(url).database in (None, "", ":memory:")  # one shared connection
        engine = create_engine(url, connect_args={"check_same_thread": False},
                               **({} if in_memory else POOL))

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **POSTGRES_POOL)


@contextmanager
def startup_lock(engine: Engine) -> Iterator[None]:
    """Held around migrations and bootstrap, across processes sharing the database: a
    PostgreSQL advisory lock (released by the server if this process dies), or an fcntl lock on
    a file next to a SQLite database (released by the kernel likewise)."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            if not conn.execute(text("SELECT pg_try_advisory_lock(:id)"),
                                {"id": STARTUP_LOCK_ID}).scalar():
                log.info(WAITING)
                conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": STARTUP_LOCK_ID})
            conn.commit()  # the lock is the session's, not the transaction's
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": STARTUP_LOCK_ID})
                conn.commit()
        return
    database = url.database if url.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        if url.get_backend_name() != "sqlite":
            log.warning("no start-up lock for %s: start replicas one at a time",
                        url.get_backend_name())
        yield
        return
    with open(f"{database}.startup-lock", "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(WAITING)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def migrate(engine: Engine, *, locked: bool = False) -> None:
    """Bring the schema to the newest revision (idempotent). `locked`: the caller already
    holds startup_lock (taking it twice in one process would wait for itself)."""
    if not locked:
        with startup_lock(engine):
            migrate(engine, locked=True)
        return
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
