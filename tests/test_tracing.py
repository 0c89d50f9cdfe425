"""OpenTelemetry traces from a real server started with OTEL_EXPORTER_OTLP_ENDPOINT, received by
a tiny OTLP/HTTP receiver in this test that decodes the protobuf export requests: one server span
per request, with admission, queue-and-prefill and decode as its children, in order."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import httpx
import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from conftest import (ADMIN_KEY, MODEL, RunningServer, bearer, make_tenant, start_server,
                      stop_server)
from polling import poll

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def attrs(kvs: Any) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out


class Receiver:
    """An OTLP/HTTP traces endpoint on a free loopback port, keeping every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Span]] = []  # (resource attributes, span)
        self.paths: list[str] = []
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                received.paths.append(self.path)
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    resource = attrs(rs.resource.attributes)
                    for ss in rs.scope_spans:
                        received.spans.extend((resource, s) for s in ss.spans)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def server_span(self, path: str, status: int) -> Span | None:
        for _, s in self.spans:
            a = attrs(s.attributes)
            if s.kind == Span.SPAN_KIND_SERVER and a.get("url.path") == path \
                    and a.get("http.response.status_code") == status:
                return s
        return None

    def children(self, parent: Span) -> dict[str, Span]:
        return {s.name: s for _, s in self.spans
                if s.trace_id == parent.trace_id and s.parent_span_id == parent.span_id}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def srv(receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    s = start_server(tmp_path_factory.mktemp("tracing"), "--parallel", "2", "--no-worker",
                     env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                          "OTEL_BSP_SCHEDULE_DELAY": "100"})
    yield s
    stop_server(s)


def test_a_chat_request_is_one_trace_with_its_phases(srv: RunningServer,
                                                     receiver: Receiver) -> None:
    r = httpx.post(srv.api + "/chat/completions", timeout=120,
                   headers={**bearer(ADMIN_KEY),
                            "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
                   json={"model": MODEL, "max_tokens": 8, "temperature": 0,
                         "messages": [{"role": "user", "content": "Say hello."}]})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]

    def exported() -> bool:
        span = receiver.server_span("/v1/chat/completions", 200)
        return span is not None and len(receiver.children(span)) >= 3

    assert poll(exported, timeout=30, interval=0.1), [s.name for _, s in receiver.spans]
    assert set(receiver.paths) == {"/v1/traces"}
    server = receiver.server_span("/v1/chat/completions", 200)
    assert server is not None
    resource = next(res for res, s in receiver.spans if s.span_id == server.span_id)
    assert resource["service.name"] == "bastion"
    # the client's trace continues (W3C traceparent): this span is its child
    assert server.trace_id.hex() == CLIENT_TRACE and server.parent_span_id.hex() == CLIENT_SPAN
    a = attrs(server.attributes)
    assert a["http.route"] == "/v1/chat/completions"
    assert a["gen_ai.request.model"] == MODEL
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]

    kids = receiver.children(server)
    assert set(kids) == {"admission", "queue_and_prefill", "decode"}
    adm, prefill, decode = kids["admission"], kids["queue_and_prefill"], kids["decode"]
    # in order, inside the request's span, none negative
    times = [server.start_time_unix_nano, adm.start_time_unix_nano, adm.end_time_unix_nano,
             prefill.start_time_unix_nano, prefill.end_time_unix_nano,
             decode.start_time_unix_nano, decode.end_time_unix_nano, server.end_time_unix_nano]
    assert times == sorted(times), times
    assert prefill.end_time_unix_nano == decode.start_time_unix_nano  # the first token
    assert attrs(decode.attributes)["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attrs(prefill.attributes)["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    for span in (adm, prefill, decode):
        assert span.status.code != Status.STATUS_CODE_ERROR


def test_a_streamed_request_ends_its_span_after_the_stream(srv: RunningServer,
                                                           receiver: Receiver) -> None:
    sdk = openai.OpenAI(base_url=srv.api, api_key=ADMIN_KEY, max_retries=0, timeout=120)
    stream = sdk.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                    temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text

    def exported() -> bool:
        span = receiver.server_span("/v1/completions", 200)
        return span is not None and "decode" in receiver.children(span)

    assert poll(exported, timeout=30, interval=0.1)
    server = receiver.server_span("/v1/completions", 200)
    decode = receiver.children(server)["decode"]
    assert decode.end_time_unix_nano <= server.end_time_unix_nano
    assert server.trace_id.hex() != CLIENT_TRACE  # no traceparent sent: a trace of its own


def test_a_refused_request_has_a_failed_admission_span(srv: RunningServer,
                                                       receiver: Receiver) -> None:
    _, key = make_tenant(srv.api, rate_limit=1, name="traced")
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    assert httpx.post(srv.api + "/chat/completions", headers=bearer(key["key"]), json=body,
                      timeout=120).status_code == 200
    r = httpx.post(srv.api + "/chat/completions", headers=bearer(key["key"]), json=body)
    assert r.status_code == 429

    def exported() -> bool:
        span = receiver.server_span("/v1/chat/completions", 429)
        return span is not None and "admission" in receiver.children(span)

    assert poll(exported, timeout=30, interval=0.1)
    kids = receiver.children(receiver.server_span("/v1/chat/completions", 429))
    assert set(kids) == {"admission"}  # nothing ran after the refusal
    adm = kids["admission"]
    assert adm.status.code == Status.STATUS_CODE_ERROR
    assert attrs(adm.attributes)["bastion.admission.refused"] == "requests_per_minute_exceeded"
