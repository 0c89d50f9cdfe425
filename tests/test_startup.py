"""Replicas started at the same moment on a fresh database: migrations and the bootstrap run
once, one replica at a time (SQLite: a file lock; PostgreSQL: an advisory lock)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from conftest import (ADMIN_KEY, DB_BACKEND, RunningServer, database_rows, models_cache,
                      postgres_database, start_server, stop_server)
from polling import poll

from bastion.db.session import WAITING, make_engine, startup_lock


def test_replicas_started_together_bootstrap_once(tmp_path: Path) -> None:
    """The test holds the start-up lock while both replicas start, so that both reach it and
    wait (their logs say so, neither serves), then lets go: they run one after the other."""
    shared = tmp_path / "shared"
    (shared / "models").mkdir(parents=True)
    cached = models_cache() / "gemma-3-270m-q4_k_m.gguf"
    os.symlink(cached, shared / "models" / cached.name)  # made once, not by both threads
    url = (postgres_database(shared) if DB_BACKEND == "postgres"  # the empty database, once
           else f"sqlite:///{shared / 'bastion.db'}")
    engine = make_engine(url)
    servers: list[RunningServer] = []
    failures: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        with startup_lock(engine):
            started = [pool.submit(start_server, tmp_path, "--parallel", "1", data_dir=shared)
                       for _ in range(2)]

            def both_waiting(logs: list[str]) -> bool:
                return len(logs) == 2 and all(WAITING in log for log in logs)

            def read_logs() -> list[str]:
                logs = [p.read_text(errors="replace") for p in tmp_path.glob("server-*.log")]
                if not both_waiting(logs):
                    assert not any(f.done() for f in started), "a replica started past the lock"
                return logs

            logs = poll(read_logs, both_waiting, timeout=90, interval=0.2)
            assert len(logs) == 2 and all(WAITING in log for log in logs), logs
        for future in started:
            try:
                servers.append(future.result())
            except RuntimeError as exc:
                failures.append(str(exc)[-3000:])
    engine.dispose()
    try:
        assert not failures, failures
        orgs = database_rows(servers[0], "organizations")
        assert [o["name"] for o in orgs] == ["Default"]
        keys = database_rows(servers[0], "api_keys")
        assert len(keys) == 1 and keys[0]["is_server_admin"]
        events = database_rows(servers[0], "audit_events")  # the key's creation, once
        assert [(e["type"], e["target_id"], e["actor_type"]) for e in events] == [
            ("api_key.created", keys[0]["id"], "system")]
        for srv in servers:
            r = httpx.get(f"{srv.api}/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert r.status_code == 200
    finally:
        for srv in servers:
            stop_server(srv)  # fails on a traceback in either log
