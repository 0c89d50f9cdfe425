"""OpenTelemetry traces, off unless the standard OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set; then spans go by OTLP over HTTP/protobuf, batched.

FastAPI makes each request's server span (the app hands it this provider); the gate and the
service layer add its children from a request's Timeline, with the moments they measured:
  admission          the gate taking a concurrency slot and reserving tokens (or refusing);
  queue_and_prefill  from the hand-over to the engine to the first generated token: the wait
                     for a free sequence slot and the prompt's prefill together, because the
                     engines do not report when a sequence leaves their queue;
  decode             from the first generated token to the last;
  embed              an embedding request's hand-over to its vectors.
The SDK is an optional dependency (`pip install 'bastion[otel]'`)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from bastion.telemetry.timeline import Timeline

log = logging.getLogger("bastion.tracing")


def _enabled_by_environment() -> bool:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class _Clock:
    """Monotonic-clock moments as the wall-clock nanoseconds spans want, through one reading
    of both clocks, so that spans made together line up exactly."""

    def __init__(self) -> None:
        self.mono, self.ns = time.monotonic(), time.time_ns()

    def ns_at(self, moment: float) -> int:
        return self.ns - round((self.mono - moment) * 1e9)


class Tracing:
    """The app's tracer provider and Bastion's tracer; both None when tracing is off."""

    def __init__(self, provider: Any = None) -> None:
        self.provider = provider
        self.tracer: trace.Tracer | None = (
            provider.get_tracer("bastion") if provider is not None else None)

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @classmethod
    def from_environment(cls, version: str) -> "Tracing":
        if not _enabled_by_environment():
            return cls()
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not "
                        "installed (pip install 'bastion[otel]'): tracing is off")
            return cls()
        attributes = {"service.version": version}
        named = "OTEL_SERVICE_NAME" in os.environ or \
            "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
        if not named:
            attributes["service.name"] = "bastion"
        provider = TracerProvider(resource=Resource.create(attributes))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("tracing: spans are exported by OTLP/HTTP")
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is still batched, then stop."""
        if self.provider is not None:
            self.provider.shutdown()

    # --- spans, from the moments a Timeline recorded ----------------------------------------
    def _span(self, clock: _Clock, name: str, parent: Any, start: float, end: float,
              attributes: dict[str, Any], error: str | None = None) -> None:
        assert self.tracer is not None
        span = self.tracer.start_span(name, context=parent, attributes=attributes,
                                      start_time=clock.ns_at(start))
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=clock.ns_at(end))

    def refused(self, reason: str | None, started: float) -> None:
        """An admission span for a request the gate refused."""
        if self.tracer is None:
            return
        self._span(_Clock(), "admission", otel_context.get_current(), started, time.monotonic(),
                   {"bastion.admission.refused": reason or "unknown"}, error=reason)

    def admitted(self, t: Timeline) -> None:
        """The admission span; the request's context is kept for the spans that follow."""
        if self.tracer is None:
            return
        t.parent = otel_context.get_current()
        self._span(_Clock(), "admission", t.parent, t.admission_started, t.admitted,
                   {"gen_ai.request.model": t.model})

    def finished(self, t: Timeline, *, status: str, prompt_tokens: int,
                 completion_tokens: int) -> None:
        if self.tracer is None or t.parent is None or not t.submitted:
            return
        clock = _Clock()
        end = clock.mono
        error = None if status == "ok" else status
        request_span = trace.get_current_span(t.parent)
        if request_span.is_recording():
            request_span.set_attributes({"gen_ai.request.model": t.model,
                                         "gen_ai.usage.input_tokens": prompt_tokens,
                                         "gen_ai.usage.output_tokens": completion_tokens})
        if t.first_token is None:
            name = "embed" if t.endpoint.endswith("/embeddings") else "queue_and_prefill"
            self._span(clock, name, t.parent, t.submitted, end,
                       {"gen_ai.usage.input_tokens": prompt_tokens}, error)
            return
        self._span(clock, "queue_and_prefill", t.parent, t.submitted, t.first_token,
                   {"gen_ai.usage.input_tokens": prompt_tokens})
        self._span(clock, "decode", t.parent, t.first_token, t.last_token or end,
                   {"gen_ai.usage.output_tokens": completion_tokens,
                    "bastion.sequences": t.sequences}, error)
