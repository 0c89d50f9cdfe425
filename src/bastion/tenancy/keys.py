"""API keys: generation, hashing, verification and the first-start bootstrap."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections import namedtuple
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, select, update
from sqlalchemy.orm import Session, sessionmaker

from bastion.db.tables import ApiKey, Organization, utcnow
from bastion.errors import AuthenticationError, NotFoundError
from bastion.ids import new_id
from bastion.tenancy.plans import PLANS, Limits, effective_limits

log = logging.getLogger("bastion.keys")

KEY_PREFIX = "sk-bst-"
VISIBLE_CHARS = 12
ENV_ADMIN_NAME = "Admin key (BASTION_ADMIN_KEY)"
GENERATED_ADMIN_NAME = "Admin key"
ALL_PERMISSIONS = ("inference", "training", "models", "admin")
LAST_USED_RESOLUTION_S = 60


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved once per request from the bearer token."""

    key_id: str
    org_id: str
    permissions: frozenset[str] = field(default_factory=frozenset)
    is_server_admin: bool = False
    rate_limit: int | None = None
    limits: Limits = PLANS["spark"]  # the smallest plan unless KeyLookup says otherwise

    def can(self, permission: str) -> bool:
        return self.is_server_admin or "admin" in self.permissions or permission in self.permissions

    def sees_org(self, org_id: str) -> bool:
        return self.is_server_admin or org_id == self.org_id


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def visible_prefix(raw: str, *, generated: bool) -> str:
    """What is stored in clear to recognise a key by: a generated key's first 12 characters
    (the public `sk-bst-` tag and 5 of its 43 random ones, about 30 of 256 bits). A key the
    operator chose (BASTION_ADMIN_KEY) may be far less random, so of it only the public tag is
    kept, if it has one: its first 12 characters could be most of the secret."""
    if generated:
        return raw[:VISIBLE_CHARS]
    return KEY_PREFIX if raw.startswith(KEY_PREFIX) else ""


# Only the columns a Principal needs, as plain rows: this runs on every request, and loading
# ORM entities into a Session cost several times the query itself.
_PRINCIPAL_COLUMNS = select(
    ApiKey.id, ApiKey.org_id, ApiKey.key_hash, ApiKey.permissions, ApiKey.is_server_admin,
    ApiKey.rate_limit, ApiKey.revoked_at, ApiKey.last_used_at, Organization.plan,
    Organization.limits_override, Organization.deleted_at).join(Organization)
_BY_HASH = _PRINCIPAL_COLUMNS.where(ApiKey.key_hash == bindparam("digest"))
_BY_ID = _PRINCIPAL_COLUMNS.where(ApiKey.id == bindparam("key_id"))

Db = Session | Connection  # a Session, or a bare Connection where no ORM object is needed


class KeyLookup:
    """The caller behind a raw key, or an AuthenticationError saying precisely why not; and
    whether its key's last use is due to be recorded (touch). A read only, so that it may run
    where a write could wait for a lock.

    It runs on every request, so the query goes through the driver's own cursor, and only its
    values pass through the columns' SQLAlchemy types (a Core `execute` cost 65 microseconds
    here, this 11). With SQLite it runs inline on the event loop (`inline`), on a connection
    of its own: SQLite answers from its page cache in less time than the hop to a worker
    thread takes, a read never waits for a writer in WAL mode, and each statement reads the
    newest commit (a revoked key is refused at once). A networked database is asked from a
    worker thread, through the pool."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        compiled = _BY_HASH.compile(dialect=engine.dialect)
        self.sql = str(compiled)
        self.positional = compiled.positional
        columns = list(_BY_HASH.selected_columns)
        self.convert = [c.type.dialect_impl(engine.dialect).result_processor(engine.dialect, None)
                        for c in columns]
        self.Row = namedtuple("_KeyRow", [c.key for c in columns])  # type: ignore[misc]
        self.inline = engine.dialect.name == "sqlite"
        self._own: Any = None  # the event loop's connection (inline only), opened on first use

    def close(self) -> None:
        if self._own is not None:
            self._own.close()  # back to the pool, which the engine's dispose() then closes
            self._own = None

    def _fetch(self, conn: Any, params: Any) -> Any:
        cursor = conn.cursor()
        try:
            cursor.execute(self.sql, params)
            return cursor.fetchone()
        finally:
            cursor.close()  # ends the statement, and with it SQLite's read

    def __call__(self, raw: str) -> tuple[Principal, bool]:
        digest = hash_key(raw)
        params = (digest,) if self.positional else {"digest": digest}
        if self.inline:
            if self._own is None:
                self._own = self.engine.raw_connection()
            values = self._fetch(self._own, params)
        else:
            conn = self.engine.raw_connection()
            try:
                values = self._fetch(conn, params)
            finally:
                conn.close()  # back to the pool, which rolls back what the driver began
        found = None if values is None else self.Row(
            *(f(v) if f else v for f, v in zip(self.convert, values)))
        if found is None or not hmac.compare_digest(found.key_hash, digest):
            raise AuthenticationError("Incorrect API key provided. You can find your API keys "
                                      "in the dashboard or create one with `bastion keys "
                                      "create`.", code="invalid_api_key")
        return _principal(found), _stale(found.last_used_at)


def verify_id(db: Db, key_id: str) -> Principal:
    """The caller behind a key already verified once (a dashboard session holds its id, never
    the key): refused the same way as KeyLookup once the key is revoked or its org deleted."""
    found = db.execute(_BY_ID, {"key_id": key_id}).first()
    if found is None:
        raise AuthenticationError("This API key no longer exists.", code="invalid_api_key")
    principal = _principal(found)
    if _stale(found.last_used_at):
        touch(db, principal.key_id)
    return principal


def touch(db: Db, key_id: str) -> None:
    """Record that the key was used now (at most once a minute per key: see _stale)."""
    db.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=utcnow()))
    db.commit()


def _stale(last: datetime | None) -> bool:
    if last is None:
        return True
    now = utcnow()
    last = last if last.tzinfo else last.replace(tzinfo=now.tzinfo)
    return (now - last).total_seconds() > LAST_USED_RESOLUTION_S


def _principal(row: Any) -> Principal:
    if row.revoked_at is not None:
        raise AuthenticationError("This API key has been revoked.", code="api_key_revoked")
    if row.deleted_at is not None:
        raise AuthenticationError("This API key's organization has been deleted.",
                                  code="organization_deleted")
    return Principal(key_id=row.id, org_id=row.org_id, permissions=frozenset(row.permissions),
                     is_server_admin=row.is_server_admin, rate_limit=row.rate_limit,
                     limits=effective_limits(row.plan, row.limits_override))


def own_key(session: Session, principal: Principal) -> ApiKey:
    """The caller's own key (its name and visible prefix, for the dashboard to show)."""
    row = session.get(ApiKey, principal.key_id)
    if row is None:
        raise AuthenticationError("This API key no longer exists.", code="invalid_api_key")
    return row


def list_keys(session: Session, principal: Principal, org_id: str) -> list[ApiKey]:
    """The organisation's keys; the server administrator's own keys only to the server admin."""
    query = select(ApiKey).where(ApiKey.org_id == org_id)
    if not principal.is_server_admin:
        query = query.where(ApiKey.is_server_admin.is_(False))
    return list(session.scalars(query.order_by(ApiKey.created_at)))


def revoke_key(session: Session, principal: Principal, org_id: str, key_id: str) -> ApiKey:
    """Revocation is a row update, so every replica refuses the key on its next request. An
    organisation admin cannot see, let alone revoke, the server administrator's key."""
    row = session.get(ApiKey, key_id)
    if (row is None or row.org_id != org_id
            or (row.is_server_admin and not principal.is_server_admin)):
        raise NotFoundError(f"No API key '{key_id}' in this organization.", param="key_id")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


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
    generated = raw is None
    raw = raw or generate_key()
    row = ApiKey(id=new_id("key"), org_id=org_id, name=name,
                 prefix=visible_prefix(raw, generated=generated),
                 key_hash=hash_key(raw), permissions=list(permissions),
                 is_server_admin=is_server_admin, rate_limit=rate_limit, created_at=utcnow())
    session.add(row)
    return row, raw


def active_server_admin_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.is_server_admin.is_(True),
                                                     ApiKey.revoked_at.is_(None))))


def revoke_server_admins(session: Session, keep: str | None = None) -> list[ApiKey]:
    """Revoke every active server-admin key but `keep`, each in the audit log."""
    from bastion.tenancy.audit import record  # audit names a Principal, defined above

    now = utcnow()
    revoked = [k for k in active_server_admin_keys(session) if k.id != keep]
    for old in revoked:
        old.revoked_at = now
        record(session, None, "api_key.deleted", old.org_id, target_id=old.id,
               details={"name": old.name, "server_admin": True})
    return revoked


def rotate_server_admin(session: Session, raw: str | None = None) -> tuple[ApiKey, str]:
    """A new server-admin key (generated unless `raw` is given), every other one revoked:
    there is one server administrator's key at a time, and the old one stops working on every
    replica at its next request."""
    org = default_org(session)
    revoke_server_admins(session)
    name = GENERATED_ADMIN_NAME if raw is None else ENV_ADMIN_NAME
    row, raw = create_key(session, org.id, name, raw=raw, permissions=list(ALL_PERMISSIONS),
                          is_server_admin=True)
    session.flush()
    _record_made(session, org.id, row)
    return row, raw


def bootstrap(factory: sessionmaker[Session], admin_key: str | None) -> str | None:
    """Create the default organisation and the server's admin key on first start.

    With BASTION_ADMIN_KEY set, that key is the server administrator's: a new value revokes
    the previous one (and the generated key printed at first start), so rotating the variable
    and restarting is a rotation. A value that was revoked (`bastion keys rotate-admin` or
    `bastion keys revoke`) stays revoked. Returns a generated key (to be printed once) or None
    when nothing new was generated. A key made here is in the audit log as made by the server
    itself ("system").
    """
    with factory.begin() as session:
        org = default_org(session)
        if admin_key:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(admin_key)))
            if row is None:
                rotate_server_admin(session, admin_key)
                log.info("BASTION_ADMIN_KEY is new: the previous server-admin keys are revoked")
            elif not row.is_server_admin:
                log.error("BASTION_ADMIN_KEY is an organisation's own API key (%s), not the "
                          "server administrator's; choose another value", row.id)
            elif row.revoked_at is not None:
                log.warning("BASTION_ADMIN_KEY has been revoked; set a new value (or unset it "
                            "and use the key of `bastion keys rotate-admin`)")
            else:
                # stored before custom keys kept only their tag: forget the clear characters
                row.prefix = visible_prefix(admin_key, generated=False)
                others = revoke_server_admins(session, keep=row.id)
                if others:
                    log.warning("revoked %d other server-admin key(s): BASTION_ADMIN_KEY is the "
                                "server administrator's key", len(others))
            return None
        if active_server_admin_keys(session):
            return None
        row, raw = create_key(session, org.id, GENERATED_ADMIN_NAME,
                              permissions=list(ALL_PERMISSIONS), is_server_admin=True)
        session.flush()
        _record_made(session, org.id, row)
        return raw


def _record_made(session: Session, org_id: str, row: ApiKey) -> None:
    from bastion.tenancy.audit import record  # audit names a Principal, defined above

    record(session, None, "api_key.created", org_id, target_id=row.id,
           details={"name": row.name, "permissions": list(row.permissions),
                    "rate_limit": row.rate_limit, "server_admin": True})
