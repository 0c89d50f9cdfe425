"""The server's logging: plain text by default, one JSON object per line with
BASTION_LOG_FORMAT=json (for a log shipper). In JSON the fields a line was logged with
(`extra=`) are top-level keys beside time, level, logger and message; the per-request line
(logger `bastion.access`, http/metrics.py) carries the request id, key and organisation ids,
model, status, tokens and latencies, never key material."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# what every LogRecord has: anything else on a record was passed by `extra=`
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message"}  # uvicorn's message with ANSI colours


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage()}
        line.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


def configure(level: str, fmt: str, text_format: str = TEXT_FORMAT) -> None:
    """The root logger's one handler (on stderr), in text or JSON."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text_format))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
