"""The typed objects every transport hands to the services: what the server holds (Services,
built once by the app's lifespan) instead of loose `app.state` attributes."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from bastion.admission.draining import Lifecycle
from bastion.admission.gate import Gate
from bastion.admission.limiter import Limiter
from bastion.config import Settings
from bastion.files.store import BlobStore
from bastion.models.catalog import Catalog
from bastion.models.org_models import OrgModels
from bastion.telemetry.metrics import Metrics
from bastion.telemetry.tracing import Tracing
from bastion.tenancy.keys import KeyLookup
from bastion.usage.ledger import Ledger


@dataclass
class Services:
    """Everything a request may need that outlives it; one per app, built in its lifespan."""

    settings: Settings
    lifecycle: Lifecycle
    db: Engine
    sessions: sessionmaker[Session]
    key_lookup: KeyLookup
    limiter: Limiter
    gate: Gate
    ledger: Ledger
    catalog: Catalog
    blobs: BlobStore
    org_models: OrgModels
    metrics: Metrics = field(default_factory=Metrics)
    tracing: Tracing = field(default_factory=Tracing)
