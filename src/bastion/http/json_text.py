"""What makes a request body that is to be parsed as JSON not JSON text of Unicode, though
Python's parser would let it through (the Gatekeeper's check of every API body, and the
WebSocket's of every message)."""

from __future__ import annotations

import re

# A JSON \\uXXXX escape of a UTF-16 surrogate, with the backslashes before it (an even run
# of them is escaped backslashes, not an escape)
_SURROGATE = re.compile(rb"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})")
_NUL = re.compile(rb"(\\+)u0000")
# Pure inference, where a NUL in the text is the model's business and nothing is stored; any
# other endpoint stores or looks up what it is sent, and PostgreSQL refuses a NUL in text.
NUL_ALLOWED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
               "/dashboard/api/chat/completions")


def nul_escape(body: bytes) -> bool:
    """Whether a JSON body escapes a NUL character (\\u0000, not an escaped backslash)."""
    return b"\\u0000" in body and any(len(m.group(1)) % 2 for m in _NUL.finditer(body))


def lone_surrogate(body: bytes) -> bool:
    """Whether a JSON body escapes a UTF-16 surrogate that is not half of a pair: such text
    is not Unicode (it cannot be encoded as UTF-8, so no tokenizer, database or response can
    hold it). Raw bytes cannot carry one: they would not decode as UTF-8 at all."""
    if b"\\u" not in body:
        return False
    pending_high = -1  # the end of a high surrogate escape still waiting for its low half
    for m in _SURROGATE.finditer(body):
        if len(m.group(1)) % 2 == 0:
            continue  # "\\\\ud800": an escaped backslash, then plain text
        high = m.group(2)[1:2].lower() in b"89ab"
        if pending_high >= 0:
            if high or m.start(1) != pending_high or len(m.group(1)) != 1:
                return True  # a high one not followed at once by its low half
            pending_high = -1
            continue
        if not high:
            return True  # a low half with no high one before it
        pending_high = m.end()
    return pending_high >= 0


def json_problem(body: bytes, headers: dict[bytes, bytes], path: str = "") -> str | None:
    """What makes a body that FastAPI would parse as JSON (a JSON content type, or none) not
    JSON text of Unicode, which Python's parser would otherwise let through: another encoding
    than UTF-8 (it guesses UTF-16 and UTF-32 from NUL bytes, and then no check on the raw
    bytes holds), or a lone surrogate escape."""
    content_type = headers.get(b"content-type", b"application/json").lower()
    if b"json" not in content_type:
        return None
    if b"\x00" in body:
        return "JSON text is UTF-8 and holds no NUL byte (escape it as \\u0000 in a string)."
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"it is not UTF-8 (an invalid byte at offset {exc.start})."
    if lone_surrogate(body):
        return ("it holds a lone UTF-16 surrogate escape (such as \\ud800), which is not "
                "valid Unicode text.")
    if path not in NUL_ALLOWED and nul_escape(body):
        return "it holds a NUL character (\\u0000), which no field of this endpoint may hold."
    return None
