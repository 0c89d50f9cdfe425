"""Rate-limit headers: the Achiral X-RateLimit-* trio for the limit closest to running out,
plus OpenAI's x-ratelimit-*-requests / -tokens pairs."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    limit: int
    remaining: int
    reset_at: float  # epoch seconds


def duration(seconds: float) -> str:
    """OpenAI's reset format: '1s', '6m0s', '1h2m3s'."""
    s = max(0, math.ceil(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    return f"{m}m{sec}s" if m else f"{sec}s"


def rate_limit_headers(windows: dict[str, Window], now: float) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in ("requests", "tokens"):
        w = windows.get(name)
        if w is not None:
            out[f"x-ratelimit-limit-{name}"] = str(w.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(w.remaining)
            out[f"x-ratelimit-reset-{name}"] = duration(w.reset_at - now)
    if windows:
        tightest = min(windows.values(), key=lambda w: w.remaining / w.limit if w.limit else 0.0)
        out["X-RateLimit-Limit"] = str(tightest.limit)
        out["X-RateLimit-Remaining"] = str(tightest.remaining)
        out["X-RateLimit-Reset"] = str(math.ceil(tightest.reset_at))
    return out
