"""GET /ready as a use case: whether this replica should be sent traffic. /health stays
liveness (the process answers); readiness also asks whether models are loaded and whether the
database and Redis (when configured) answer, each within a few seconds."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from bastion.services.context import Services

log = logging.getLogger("bastion.ready")
CHECK_TIMEOUT_S = 5.0


def _select_one(services: Services) -> None:
    with services.db.connect() as conn:
        conn.execute(text("SELECT 1"))


async def _check(name: str, work: Any) -> dict[str, Any]:
    """ok, or the failure's kind only: the details (a host name, a password in a URL) go to
    the log, since /ready answers without a key."""
    try:
        result = await asyncio.wait_for(work, CHECK_TIMEOUT_S)
    except asyncio.TimeoutError:
        log.warning("readiness: %s did not answer within %.0fs", name, CHECK_TIMEOUT_S)
        return {"ok": False, "error": f"no answer within {CHECK_TIMEOUT_S:.0f}s"}
    except Exception as exc:
        log.warning("readiness: %s failed: %s", name, exc)
        return {"ok": False, "error": type(exc).__name__}
    if result is False:
        return {"ok": False, "error": "check failed"}
    return {"ok": True}


def _state(ok: bool, error: str, **extra: Any) -> dict[str, Any]:
    return {"ok": True, **extra} if ok else {"ok": False, "error": error, **extra}


async def readiness(services: Services) -> tuple[bool, dict[str, Any]]:
    draining = services.lifecycle.draining
    models = sorted(d.id for d in services.catalog.visible(None))
    checks: dict[str, dict[str, Any]] = {
        "accepting": _state(not draining, "draining: the server is shutting down"),
        "models": _state(bool(models), "no model is loaded", loaded=models),
        "database": await _check("the database", run_in_threadpool(_select_one, services)),
    }
    limiter = services.limiter
    if limiter.remote:
        checks["redis"] = await _check("Redis", limiter.run(limiter.storage.check))
    failed = [name for name, check in checks.items() if not check["ok"]]
    body: dict[str, Any] = {"status": "not_ready" if failed else "ready", "checks": checks}
    if failed:
        body["failed"] = failed
    return not failed, body
