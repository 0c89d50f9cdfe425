"""API keys: generation, hashing, verification and the first-start bootstrap."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bastion.db.tables import ApiKey, Organization, utcnow

KEY_PREFIX = "sk-bst-"
VISIBLE_CHARS = 12
ALL_PERMISSIONS = ("inference", "training", "models", "admin")


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved once per request from the bearer token."""

    key_id: str
    org_id: str
    permissions: frozenset[str] = field(default_factory=frozenset)
    is_server_admin: bool = False
    rate_limit: int | None = None

    def can(self, permission: str) -> bool:
        return self.is_server_admin or "admin" in self.permissions or permission in self.permissions


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def mask(raw: str) -> str:
    """What may appear in logs or messages: the visible prefix only."""
    return raw[:VISIBLE_CHARS] + "…" if len(raw) > VISIBLE_CHARS else "…"


def verify(session: Session, raw: str) -> Principal | None:
    digest = hash_key(raw)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return Principal(key_id=row.id, org_id=row.org_id, permissions=frozenset(row.permissions),
                     is_server_admin=row.is_server_admin, rate_limit=row.rate_limit)


def bootstrap(factory: sessionmaker[Session], admin_key: str | None) -> str | None:
    """Create the default organisation and the server's admin key on first start.

    Returns a generated key (to be printed once) or None when nothing new was generated.
    """
    with factory.begin() as session:
        org = session.scalar(select(Organization).order_by(Organization.created_at).limit(1))
        if org is None:
            org = Organization(id=new_id("org"), name="Default", plan="dedicated")
            session.add(org)
            session.flush()
        if admin_key:
            digest = hash_key(admin_key)
            if session.scalar(select(ApiKey).where(ApiKey.key_hash == digest)) is None:
                session.add(_admin_row(org.id, admin_key, "Admin key (BASTION_ADMIN_KEY)"))
            return None
        has_admin = session.scalar(select(ApiKey).where(ApiKey.is_server_admin.is_(True),
                                                        ApiKey.revoked_at.is_(None)).limit(1))
        if has_admin is not None:
            return None
        raw = generate_key()
        session.add(_admin_row(org.id, raw, "Admin key"))
        return raw


def _admin_row(org_id: str, raw: str, name: str) -> ApiKey:
    return ApiKey(id=new_id("key"), org_id=org_id, name=name, prefix=raw[:VISIBLE_CHARS],
                  key_hash=hash_key(raw), permissions=list(ALL_PERMISSIONS),
                  is_server_admin=True, created_at=utcnow())
