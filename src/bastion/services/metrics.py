"""GET /metrics as a use case: who may scrape, and the gauges read at scrape time (engines'
queues, the ledger's backlog, fine-tuning jobs by state) beside what the app recorded as it
ran (telemetry/metrics.py). One process, one set of metrics: each replica (each `bastion
serve`) is its own scrape target, and Prometheus sums them."""

from __future__ import annotations

import hmac
import logging
from typing import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool

from bastion.errors import AuthorizationError
from bastion.finetune.jobs import count_by_status
from bastion.services.auth import authenticate
from bastion.services.context import Services

log = logging.getLogger("bastion.metrics")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


async def authorize_scrape(services: Services, token: str) -> None:
    """The metrics token (BASTION_METRICS_TOKEN), or a key of the server administrator: the
    metrics cover every organisation (their models' names among them), so an organisation's
    own admin key is not enough."""
    expected = services.settings.metrics_token
    if expected is not None and hmac.compare_digest(
            token.encode(), expected.get_secret_value().encode()):
        return
    principal = await authenticate(services, token)
    if not principal.is_server_admin:
        raise AuthorizationError(
            "Only the server administrator's key or the metrics token "
            "(BASTION_METRICS_TOKEN) may read /metrics.")


async def scrape(services: Services) -> tuple[bytes, str]:
    """The exposition text and its content type; in a worker thread, since reading the
    fine-tuning jobs is a database query."""
    return await run_in_threadpool(generate_latest, services.metrics.registry), CONTENT_TYPE_LATEST


def _histogram(name: str, doc: str, sizes: dict[int, int], model: str,
               family: HistogramMetricFamily | None) -> HistogramMetricFamily:
    family = family or HistogramMetricFamily(name, doc, labels=["model_name"])
    buckets = []
    for bound in BATCH_BUCKETS:
        seen = sum(n for size, n in sizes.items() if size <= bound)
        buckets.append((str(float(bound)), seen))
    buckets.append(("+Inf", sum(sizes.values())))
    family.add_metric([model], buckets, sum_value=sum(s * n for s, n in sizes.items()))
    return family


class ServerState(Collector):
    """The gauges of what the server is doing now, read only when Prometheus asks."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def describe(self) -> list[Metric]:
        """Nothing: registering must not run a scrape (collect queries the database)."""
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._engines()
        s = self.services
        yield GaugeMetricFamily("bastion_requests_in_flight",
                                "Requests being answered now (HTTP and WebSocket inferences): "
                                "what a SIGTERM waits for.", value=s.lifecycle.in_flight)
        yield GaugeMetricFamily("bastion_concurrency_slots_held",
                                "Concurrency slots of the organisations' plans that this "
                                "replica's running requests hold (0 when idle: none leaked).",
                                value=s.limiter.slots_held)
        yield GaugeMetricFamily("bastion_websocket_connections",
                                "WebSockets (/v1/ws) open now.", value=s.lifecycle.sockets)
        yield GaugeMetricFamily("bastion_usage_ledger_queue_depth",
                                "Usage rows recorded and not yet written to the database.",
                                value=s.ledger.pending)
        syncs = CounterMetricFamily("bastion_model_catalog_syncs",
                                    "Syncs of the organisations' models from the database, by "
                                    "what asked: periodic, listing, miss (a request for a model "
                                    "this replica did not serve).", labels=["reason"])
        for reason, n in sorted(s.org_models.syncs.items()):
            syncs.add_metric([reason], n)
        yield syncs
        jobs = GaugeMetricFamily("bastion_fine_tuning_jobs",
                                 "Fine-tuning jobs of every organisation, by state.",
                                 labels=["status"])
        try:
            with s.sessions() as session:
                for status, n in count_by_status(session).items():
                    jobs.add_metric([status], n)
            yield jobs
        except Exception as exc:  # the database is down: the rest of the scrape still answers
            log.warning("metrics: could not count fine-tuning jobs: %s", exc)

    def _engines(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "vllm:num_requests_running",
            "Sequences decoding now (a request with n choices runs n; an upstream's requests "
            "in flight).", labels=["model_name"])
        waiting = GaugeMetricFamily("vllm:num_requests_waiting",
                                    "Requests queued for a free sequence slot or batch.",
                                    labels=["model_name"])
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc",
                               "Fraction of the KV cache in use (1 = full), where the engine "
                               "reports it.", labels=["model_name"])
        slots = GaugeMetricFamily("bastion_engine_sequence_slots",
                                  "Sequences an engine can decode at once.", labels=["model_name"])
        replicas = GaugeMetricFamily("bastion_upstream_replicas_up",
                                     "An upstream model's replicas passing their health check.",
                                     labels=["model_name"])
        passes = CounterMetricFamily("bastion_embedding_forward_passes",
                                     "Forward passes of an embedding model.", labels=["model_name"])
        sequences = CounterMetricFamily("bastion_embedding_inputs",
                                        "Inputs embedded.", labels=["model_name"])
        batch: HistogramMetricFamily | None = None
        seen: set[int] = set()
        for d in self.services.catalog.all():
            if id(d.engine) in seen:
                continue
            seen.add(id(d.engine))
            stats = d.engine.stats()
            model = [d.id]
            if "running_sequences" in stats or "in_flight" in stats:
                running.add_metric(model, stats.get("running_sequences", stats.get("in_flight", 0)))
            if "waiting_requests" in stats or "queued" in stats:
                waiting.add_metric(model, stats.get("waiting_requests", stats.get("queued", 0)))
            if "slots" in stats:
                slots.add_metric(model, stats["slots"])
            if stats.get("kv_cache_cells"):
                kv.add_metric(model, stats.get("kv_cache_used_cells", 0) / stats["kv_cache_cells"])
            if "replicas_up" in stats:
                replicas.add_metric(model, stats["replicas_up"])
            if "forward_passes" in stats:
                passes.add_metric(model, stats["forward_passes"])
                sequences.add_metric(model, stats.get("sequences_done", 0))
            sizes = getattr(d.engine, "batch_sizes", dict)()
            if sizes:
                batch = _histogram("bastion_embedding_batch_size",
                                   "Inputs per forward pass of an embedding model.", sizes,
                                   d.id, batch)
        yield from (running, waiting, kv, slots, replicas, passes, sequences)
        if batch is not None:
            yield batch


def install(services: Services) -> None:
    """Register the scrape-time gauges into the app's registry (once, at startup)."""
    services.metrics.registry.register(ServerState(services))
