"""API keys: generation, hashing, verification and the first-start bootstrap."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bastion.db.tables import ApiKey, Organization, utcnow
from bastion.ids import new_id

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


def default_org(session: Session) -> Organization:
    """The organisation created on first start (made here if it does not exist yet)."""
    org = session.scalar(select(Organization).order_by(Organization.created_at).limit(1))
    if org is None:
        org = Organization(id=new_id("org"), name="Default", plan="dedicated")
        session.add(org)
        session.flush()
    return org


def create_key(session: Session, org_id: str, name: str, *, permissions: list[str],
               raw: str | None = None, is_server_admin: bool = False,
               rate_limit: int | None = None) -> tuple[ApiKey, str]:
    """Store a new key as its hash and visible prefix; the raw key is returned, never stored."""
    raw = raw or generate_key()
    row = ApiKey(id=new_id("key"), org_id=org_id, name=name, prefix=raw[:VISIBLE_CHARS],
                 key_hash=hash_key(raw), permissions=list(permissions),
                 is_server_admin=is_server_admin, rate_limit=rate_limit, created_at=utcnow())
    session.add(row)
    return row, raw


def bootstrap(factory: sessionmaker[Session], admin_key: str | None) -> str | None:
    """Create the default organisation and the server's admin key on first start.

    Returns a generated key (to be printed once) or None when nothing new was generated.
    """
    with factory.begin() as session:
        org = default_org(session)
        if admin_key:
            if session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(admin_key))) is None:
                create_key(session, org.id, "Admin key (BASTION_ADMIN_KEY)", raw=admin_key,
                           permissions=list(ALL_PERMISSIONS), is_server_admin=True)
            return None
        has_admin = session.scalar(select(ApiKey).where(ApiKey.is_server_admin.is_(True),
                                                        ApiKey.revoked_at.is_(None)).limit(1))
        if has_admin is not None:
            return None
        return create_key(session, org.id, "Admin key", permissions=list(ALL_PERMISSIONS),
                          is_server_admin=True)[1]
