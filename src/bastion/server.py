"""Runs the app under uvicorn with a graceful SIGTERM: stop admitting, drain, then abort."""

from __future__ import annotations

import asyncio
import json
import logging
from types import FrameType

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bastion.errors import InvalidRequestError

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


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (its parser in C took 10 % less of the event loop per
    request than h11's in Python), answering a request that its parser refuses with OpenAI's
    error body instead of uvicorn's plain text."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(INVALID_HTTP.body()).encode()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n",
                 b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def serve(app: FastAPI, host: str, port: int, drain_timeout: float, log_level: str) -> None:
    # JSON logs: uvicorn's loggers keep no formatter of their own, so they reach the root
    # logger's JSON handler (telemetry/logs.py) like every other line
    json_logs = app.state.settings.log_format == "json"
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=HttpProtocol,
                            timeout_graceful_shutdown=5, access_log=False,
                            log_config=None if json_logs else uvicorn.config.LOGGING_CONFIG,
                            ws_max_size=app.state.settings.max_body_bytes)
    DrainingServer(config, app, drain_timeout).run()
