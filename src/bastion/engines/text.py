"""Incremental text: UTF-8-safe detokenisation and stop sequences with a hold-back buffer."""

from __future__ import annotations

import codecs


class Utf8Stream:
    """Turns token byte pieces into text without ever splitting a UTF-8 character."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        return self._decoder.decode(piece)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Holds back just enough text that a stop sequence split across tokens is still caught."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop sequence was hit)."""
        if not self.stops:
            return text, False
        self._buf += text
        hit = -1
        for stop in self.stops:
            i = self._buf.find(stop)
            if i != -1 and (hit == -1 or i < hit):
                hit = i
        if hit != -1:
            out, self._buf = self._buf[:hit], ""
            return out, True
        keep = self._held_suffix()
        cut = len(self._buf) - keep
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out

    def _held_suffix(self) -> int:
        """Length of the longest tail of the buffer that could still grow into a stop."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self._buf)), best, -1):
                if self._buf.endswith(stop[:k]):
                    best = k
                    break
        return best
