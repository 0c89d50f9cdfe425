"""The server's Prometheus metrics, one registry per app (never prometheus_client's global one:
nothing here is a module-level singleton). The names of what vLLM also measures are vLLM's own
(`vllm:` prefix, `model_name` label), so that dashboards built for vLLM read Bastion unchanged;
what only Bastion has is `bastion_`-prefixed. Gauges that describe the server's state now
(sequences running, ledger queue, jobs by state) are read at scrape time by a collector that the
services layer registers (services/metrics.py), not kept up to date on the request path."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from bastion.telemetry.timeline import Timeline

# vLLM's own buckets for these histograms, so that its dashboards' quantiles mean the same
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0, 300.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
MODEL = ("model_name",)


class Metrics:
    """Every metric that is recorded as things happen; `registry` is what /metrics renders."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "bastion_http_requests", "HTTP requests answered, by route template and status.",
            ("method", "route", "status"), registry=r)
        self.http_latency = Histogram(
            "bastion_http_request_duration_seconds",
            "From the request's arrival to its response's last byte (a stream's whole length).",
            ("method", "route", "status"), buckets=HTTP_BUCKETS, registry=r)
        self.refusals = Counter(
            "bastion_admission_refusals",
            "Requests the admission gate refused, by reason (the error's code).",
            ("reason",), registry=r)
        self.model_requests = Counter(
            "bastion_model_requests",
            "Admitted generation and embedding requests by how they ended: ok, error, cancelled.",
            ("model_name", "endpoint", "status"), registry=r)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "From the request's authentication to its first generated token.",
            MODEL, buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "A request's mean time per output token after the first, per sequence.",
            MODEL, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "From the request's authentication to the end of its generation (or embedding).",
            MODEL, buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt (and embedding input) tokens processed, as billed.",
            MODEL, registry=r)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated, as billed.", MODEL, registry=r)
        self.cache_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            MODEL, registry=r)
        self.cache_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache (usage's cached tokens).", MODEL,
            registry=r)
        self.request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens", "Prompt tokens per request.", MODEL,
            buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens", "Generated tokens per request.", MODEL,
            buckets=TOKEN_BUCKETS, registry=r)

    def refused(self, reason: str | None) -> None:
        self.refusals.labels(reason or "unknown").inc()

    def http(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method, route, str(status))
        self.http_requests.labels(*labels).inc()
        self.http_latency.labels(*labels).observe(seconds)

    def finished(self, t: Timeline, *, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int = 0, sequences: int = 1, status: str = "ok") -> None:
        """One admitted request ended, however it ended: what it cost and how long it took."""
        model = t.model
        self.model_requests.labels(model, t.endpoint, status).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.cache_queries.labels(model).inc(prompt_tokens)
        self.cache_hits.labels(model).inc(cached_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        self.request_prompt_tokens.labels(model).observe(prompt_tokens)
        self.e2e.labels(model).observe(time.monotonic() - t.arrived)
        if t.first_token is None:  # an embedding, or nothing generated
            return
        self.request_generation_tokens.labels(model).observe(completion_tokens)
        self.ttft.labels(model).observe(t.first_token - t.arrived)
        per_sequence = completion_tokens / max(sequences, 1)
        if per_sequence > 1 and t.last_token is not None:
            self.tpot.labels(model).observe((t.last_token - t.first_token) / (per_sequence - 1))
