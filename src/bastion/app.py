"""create_app(settings) -> FastAPI. The lifespan opens the database and loads the engines."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from bastion import __version__
from bastion.api import (audit_logs, chat, completions, embeddings, files, fine_tuning, health,
                         keys, metrics, models, organizations, responses, schema, usage, ws)
from bastion.models.org_models import OrgModels
from bastion.models.catalog import load_catalog
from bastion.files.store import BlobStore
from bastion.finetune import embedded
from bastion.config import Settings
from bastion.db.session import make_engine, migrate, session_factory, startup_lock
from bastion.engines.base import EngineError
from bastion.errors import error_response, install_error_handlers
from bastion.admission.draining import Lifecycle
from bastion.admission.gate import Gate
from bastion.http.admission import AdmissionBinding
from bastion.http.origin import ClientOrigin
from bastion.http.request_id import RequestId
from bastion.http.root_paths import RootPaths, api_resources
from bastion.http.telemetry import RequestTelemetry
from bastion.gatekeeper import Gatekeeper
from bastion.services.context import Services
from bastion.admission.limiter import Limiter
from bastion.usage.ledger import Ledger
from bastion.services.common import as_api_error
from bastion.services.metrics import install as install_scrape
from bastion.telemetry.metrics import Metrics
from bastion.telemetry.tracing import Tracing
from bastion.tenancy.keys import KeyLookup, bootstrap
from bastion.web.router import install as install_dashboard

log = logging.getLogger("bastion")
# Every router of the API (the dashboard's are web/'s): /openapi.json describes their routes
API_MODULES = (chat, completions, embeddings, models, organizations, keys, audit_logs, usage,
               files, fine_tuning, health, metrics, ws, responses, schema)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = make_engine(settings.resolved_database_url)
        app.state.db = db
        app.state.key_lookup = KeyLookup(db)
        app.state.sessions = session_factory(db)
        # one replica at a time: two starting together on a fresh database would both
        # create the schema and a default organisation
        with startup_lock(db):
            migrate(db, locked=True)
            generated = bootstrap(app.state.sessions, settings.admin_key)
        if generated:
            print(f"\n  Bastion created an admin API key. It is shown only this once:\n\n"
                  f"      {generated}\n", flush=True)
        app.state.limiter = Limiter(settings.redis_url,
                                    token_window_s=settings.token_window_seconds,
                                    enabled=settings.rate_limits,
                                    slot_lease_s=settings.slot_lease_seconds)
        await app.state.limiter.start()
        app.state.ledger = Ledger(db)
        app.state.catalog = await run_in_threadpool(load_catalog, settings)
        await app.state.catalog.start()
        app.state.blobs = BlobStore(settings.files_dir)
        app.state.org_models = OrgModels(app.state.catalog, app.state.sessions, settings)
        await app.state.org_models.sync("startup")
        app.state.services = Services(
            settings=settings, lifecycle=app.state.lifecycle, db=db,
            sessions=app.state.sessions, key_lookup=app.state.key_lookup,
            limiter=app.state.limiter,
            gate=Gate(app.state.limiter, app.state.ledger, recorded, tracing),
            ledger=app.state.ledger, catalog=app.state.catalog,
            blobs=app.state.blobs, org_models=app.state.org_models,
            metrics=recorded, tracing=tracing)
        install_scrape(app.state.services)
        sync_task = asyncio.create_task(app.state.org_models.run(settings.worker_poll_seconds))
        worker = embedded.start(settings) if settings.worker else None
        log.info("serving %s", ", ".join(d.id for d in app.state.catalog.visible(None))
                 or "no models")
        try:
            yield
        finally:
            sync_task.cancel()
            await app.state.org_models.close()
            if worker is not None:
                await run_in_threadpool(embedded.stop, worker)
            await app.state.catalog.stop()
            await run_in_threadpool(app.state.catalog.close)  # joins engine threads
            await run_in_threadpool(app.state.ledger.close)  # writes what is still queued
            await app.state.limiter.close()
            app.state.key_lookup.close()
            db.dispose()
            await run_in_threadpool(tracing.shutdown)  # exports the spans still batched

    # No unauthenticated docs: every route but /health and /ready needs a key (the OpenAPI
    # document too: api/schema.py serves it to any valid key).
    # OpenTelemetry only when OTEL_EXPORTER_OTLP_ENDPOINT is set: then FastAPI makes each
    # request's server span with this provider (its dependency and endpoint spans stay off) and
    # the gate adds admission, queue-and-prefill and decode (telemetry/tracing.py). Otherwise
    # nothing leaves the machine, and FastAPI's check for a configured provider, which would
    # run on every request, is off. FastAPI's own OpenTelemetry metrics stay off: Prometheus's
    # /metrics has them.
    recorded = Metrics()  # what requests record as they run; /metrics renders it
    tracing = Tracing.from_environment(__version__)
    app = FastAPI(title="Bastion", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None,
                  telemetry={"tracing": True, "tracer_provider": tracing.provider,
                             "metrics": False, "logs": False, "operation_spans": False}
                  if tracing.enabled else {"tracing": False, "metrics": False, "logs": False})
    app.state.settings = settings
    app.state.metrics = recorded
    app.state.lifecycle = Lifecycle()
    install_error_handlers(app)

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return error_response(as_api_error(exc))

    api = API_MODULES
    for module in api:
        app.include_router(module.router)
    install_dashboard(app)
    app.add_middleware(AdmissionBinding)
    app.add_middleware(Gatekeeper, lifecycle=app.state.lifecycle, max_body=settings.max_body_bytes,
                       upload_paths=frozenset({"/v1/files", "/v1/models", "/dashboard/files",
                                                    "/dashboard/models"}))
    # /chat/completions is /v1/chat/completions (see the module for why a rewrite)
    app.add_middleware(RootPaths, resources=api_resources(
        route.path for module in api for route in module.router.routes))
    # counts every answer; with JSON logs it writes the request's line (then RequestId's
    # plain access line is off: one line per request)
    app.add_middleware(ClientOrigin)  # where a request came from, for the audit log
    app.add_middleware(RequestTelemetry, metrics=recorded,
                       log_requests=settings.log_format == "json")
    app.add_middleware(RequestId, access_log=settings.access_log
                       and settings.log_format != "json")  # outermost: every answer
    return app
