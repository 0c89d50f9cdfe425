"""Chat's stream chunks as the Responses API's typed events, in OpenAI's order: the response
created and in progress; per output item `output_item.added`, its content (a message's
`content_part.added`, `output_text.delta`s, `output_text.done`, `content_part.done`; a call's
`function_call_arguments.delta`s and `.done`), `output_item.done`; then `response.completed`
or `response.incomplete`, or `error` and `response.failed`. Every event has its
`sequence_number`."""

from __future__ import annotations

import time
from typing import Any

from bastion.protocol.responses import function_call_item, message_item, output_text
from bastion.services.response_translation import ident, incomplete_details


class StreamTranslator:
    """Holds the response being streamed (`response`, the object the last event carries)."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.seq = 0
        self.output: list[dict[str, Any]] = response["output"]
        self.open: dict[str, Any] | None = None  # the item receiving deltas
        self.calls: dict[int, dict[str, Any]] = {}  # chat's tool call index -> its item
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def _snapshot(self) -> dict[str, Any]:
        return {**self.response, "output": [dict(i) for i in self.output]}

    def start(self) -> list[dict[str, Any]]:
        return [self.event("response.created", response=self._snapshot()),
                self.event("response.in_progress", response=self._snapshot())]

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def _text(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self.open is None or self.open["type"] != "message":
            events += self._close("completed")
            events += self._open_message()
        item = self.open
        assert item is not None
        item["content"][0]["text"] += text
        events.append(self.event("response.output_text.delta", item_id=item["id"],
                                 output_index=self.output.index(item), content_index=0,
                                 delta=text, logprobs=[]))
        return events

    def _open_message(self) -> list[dict[str, Any]]:
        item = message_item(ident("msg"), "", "in_progress")
        self.output.append(item)
        self.open = item
        index = len(self.output) - 1
        return [self.event("response.output_item.added", output_index=index,
                           item={**item, "content": []}),
                self.event("response.content_part.added", item_id=item["id"],
                           output_index=index, content_index=0, part=output_text(""))]

    def _call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        fn = call.get("function") or {}
        item = self.calls.get(call.get("index", 0))
        if item is None:
            events += self._close("completed")
            item = function_call_item(ident("fc"), call.get("id") or ident("call"),
                                      fn.get("name") or "", "", "in_progress")
            self.output.append(item)
            self.calls[call.get("index", 0)] = self.open = item
            events.append(self.event("response.output_item.added",
                                     output_index=len(self.output) - 1, item=dict(item)))
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            events.append(self.event("response.function_call_arguments.delta",
                                     item_id=item["id"], output_index=self.output.index(item),
                                     delta=fn["arguments"]))
        return events

    def _close(self, status: str) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.output.index(item)
        item["status"] = status
        if item["type"] == "message":
            part = item["content"][0]
            return [self.event("response.output_text.done", item_id=item["id"],
                               output_index=index, content_index=0, text=part["text"],
                               logprobs=[]),
                    self.event("response.content_part.done", item_id=item["id"],
                               output_index=index, content_index=0, part=dict(part)),
                    self.event("response.output_item.done", output_index=index,
                               item=dict(item))]
        return [self.event("response.function_call_arguments.done", item_id=item["id"],
                           output_index=index, name=item["name"],
                           arguments=item["arguments"]),
                self.event("response.output_item.done", output_index=index, item=dict(item))]

    def finish(self, usage: dict[str, Any]) -> list[dict[str, Any]]:
        """The last events; `usage` is the response's usage (from chat's usage chunk)."""
        details = incomplete_details(self.finish_reason)
        events = []
        if not self.output:  # nothing said: an empty message, as the JSON answer has
            events += self._open_message()
        events += self._close("incomplete" if details else "completed")
        self.response.update(status="incomplete" if details else "completed",
                             incomplete_details=details, usage=usage)
        if not details:
            self.response["completed_at"] = int(time.time())
        kind = "response.incomplete" if details else "response.completed"
        return events + [self.event(kind, response=self._snapshot())]

    def fail(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        """`error` (OpenAI's error body's inside) as the stream's last events."""
        code = error.get("code") or error.get("type") or "server_error"
        if self.open is not None:
            self.open["status"] = "incomplete"
        # the response's error code is one of OpenAI's few; the error event keeps Bastion's
        kind = {"rate_limit_error": "rate_limit_exceeded",
                "invalid_request_error": "invalid_prompt"}.get(error.get("type", ""),
                                                               "server_error")
        self.response.update(status="failed", error={"code": kind,
                                                     "message": error.get("message", "")})
        return [self.event("error", code=code, message=error.get("message", ""),
                           param=error.get("param")),
                self.event("response.failed", response=self._snapshot())]
