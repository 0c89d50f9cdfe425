"""Runs the app under uvicorn with a graceful SIGTERM: stop admitting, drain, then abort."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bastion.errors import InvalidRequestError

GIL_SWITCH_INTERVAL_S = 0.0005

log = logging.getLogger("bastion.server")


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT new API requests get 503 while running streams finish; after
    the drain timeout the rest end with an error event. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self.bastion_app = app
        self.drain_timeout = drain_timeout
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        lifecycle = self.bastion_app.state.lifecycle
        if lifecycle.draining:
            super().handle_exit(sig, frame)
            return
        lifecycle.draining = True
        loop = asyncio.get_event_loop()
        self._drain_task = loop.create_task(self._drain())

    async def _drain(self) -> None:
        state = self.bastion_app.state
        log.info("draining: %d request(s) in flight, waiting up to %.0fs",
                 state.lifecycle.in_flight, self.drain_timeout)
        if not await state.lifecycle.wait_idle(self.drain_timeout):
            log.warning("drain timeout: ending %d request(s) with an error", state.lifecycle.in_flight)
            for dep in state.catalog.all():
                dep.engine.abort_all("The server is shutting down; the request was interrupted.")
            await state.lifecycle.wait_idle(5.0)
        self.should_exit = True


INVALID_HTTP = InvalidRequestError(
    "The request is not valid HTTP/1.1: its request line or a header could not be parsed (for "
    "example, a header value holding a control character such as NUL or DEL). Send the API key "
    "and every other header as printable text.", code="invalid_http_request")


# A request's head (request line and headers): at most HEAD_BYTES and HEAD_FIELDS, as most
# servers bound it (nginx: 4 x 8 KiB buffers, Node: 16 KiB). llhttp itself has no limit and
# httptools gathers a header's value whole before handing it over, so bytes still arriving
# before the head is complete are bounded too (RAW_HEAD_BYTES: a read may also carry the start
# of the body).
HEAD_BYTES = 64 * 1024
HEAD_FIELDS = 256
RAW_HEAD_BYTES = 1024 * 1024
HEAD_TOO_LARGE = InvalidRequestError(
    f"The request's headers are too large: at most {HEAD_BYTES // 1024} KiB for the request "
    f"line and headers together, and at most {HEAD_FIELDS} headers.",
    code="request_header_fields_too_large")
HEAD_TOO_LARGE.status = 431


class HeadTooLarge(Exception):
    """Raised from a parser callback: httptools turns it into a parser error, answered 431."""


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (its parser in C took 10 % less of the event loop per
    request than h11's in Python), answering a request that its parser refuses with OpenAI's
    error body instead of uvicorn's plain text, and refusing a head over HEAD_BYTES."""

    _in_head = True  # between requests, or inside one's head: counting what arrives
    _raw_head = 0
    _head = 0
    _refusal: InvalidRequestError | None = None

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._raw_head += len(data)
            if self._raw_head > RAW_HEAD_BYTES:
                self._refusal = HEAD_TOO_LARGE
                self.send_400_response("request head too large")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head = 0

    def _count(self, size: int) -> None:
        self._head += size
        if self._head > HEAD_BYTES or len(self.headers) >= HEAD_FIELDS:
            self._refusal = HEAD_TOO_LARGE
            raise HeadTooLarge()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._raw_head = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def send_400_response(self, msg: str) -> None:
        err = self._refusal or INVALID_HTTP
        reason = b"Request Header Fields Too Large" if err.status == 431 else b"Bad Request"
        body = json.dumps(err.body()).encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (err.status, reason)]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n",
                 b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def serve(app: FastAPI, host: str, port: int, drain_timeout: float, log_level: str) -> None:
    # Each decoding thread takes the GIL back after every llama_decode (which runs without it);
    # with CPython's 5 ms default it can wait that long behind the event loop, once per step of
    # 10-40 ms. A shorter interval hands it over sooner (bench/README.md, "GIL switch interval").
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    # JSON logs: uvicorn's loggers keep no formatter of their own, so they reach the root
    # logger's JSON handler (telemetry/logs.py) like every other line
    json_logs = app.state.settings.log_format == "json"
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=HttpProtocol,
                            timeout_graceful_shutdown=5, access_log=False,
                            log_config=None if json_logs else uvicorn.config.LOGGING_CONFIG,
                            ws_max_size=app.state.settings.max_body_bytes)
    DrainingServer(config, app, drain_timeout).run()
