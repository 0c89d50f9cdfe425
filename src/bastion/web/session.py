"""Dashboard sessions: a signed, expiring, HttpOnly cookie that holds the signed-in key's id and
a CSRF token, never the key itself (a signature is not encryption: the cookie is readable)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer
from limits.storage import Storage
from starlette.requests import Request
from starlette.responses import Response

COOKIE = "bastion_session"
PATH = "/dashboard"
# The sign-in form's CSRF token has a cookie of its own: a visit that arrives without the
# session cookie (SameSite=Strict withholds it on a link from another site) must not
# overwrite a session that is still good.
LOGIN_COOKIE = "bastion_login"
LOGIN_PATH = "/dashboard/login"
SECRET_FILE = "dashboard-secret"


@dataclass(frozen=True)
class WebSession:
    csrf: str
    key_id: str | None = None  # None: a visitor who has not signed in yet

    @staticmethod
    def new(key_id: str | None = None) -> "WebSession":
        """A fresh CSRF token with every sign-in, so a token seen before it is worthless after."""
        return WebSession(csrf=secrets.token_urlsafe(32), key_id=key_id)

    @property
    def sid(self) -> str:
        """A name for this session that reveals nothing of its CSRF token."""
        return hashlib.sha256(self.csrf.encode()).hexdigest()[:32]

    def csrf_ok(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf.encode(), str(token).encode())


HOST_PREFIX = "__Host-"


class SessionCodec:
    """Signs sessions with a timestamp; an old cookie fails to load after max_age, whatever the
    browser does with it.

    A cookie is Secure when the request came over https, or always with `secure` (the
    BASTION_SECURE_COOKIES setting: behind a TLS proxy that talks plain HTTP to Bastion, the
    request's scheme says http). A Secure cookie is named with the `__Host-` prefix, which
    browsers accept only when it is Secure, has Path=/ and no Domain: a sibling subdomain or a
    plain-http page cannot plant or overwrite it."""

    def __init__(self, secret: str, max_age_s: int, *, secure: bool = False) -> None:
        self._s = URLSafeTimedSerializer(secret, salt="bastion.dashboard.session")
        self.max_age_s = max_age_s
        self.secure = secure

    def is_secure(self, request: Request) -> bool:
        return self.secure or request.url.scheme == "https"

    def name(self, request: Request, cookie: str = COOKIE) -> str:
        return HOST_PREFIX + cookie if self.is_secure(request) else cookie

    def _path(self, request: Request, cookie: str) -> str:
        if self.is_secure(request):
            return "/"  # __Host- requires it
        return LOGIN_PATH if cookie == LOGIN_COOKIE else PATH

    def dumps(self, session: WebSession) -> str:
        return self._s.dumps({"c": session.csrf, "k": session.key_id})

    def loads(self, raw: str | None) -> WebSession | None:
        if not raw or len(raw) > 4096:
            return None
        try:
            data = self._s.loads(raw, max_age=self.max_age_s)
        except BadSignature:  # also SignatureExpired
            return None
        if not isinstance(data, dict) or not isinstance(data.get("c"), str):
            return None
        key = data.get("k")
        return WebSession(csrf=data["c"], key_id=key if isinstance(key, str) else None)

    def read(self, request: Request, cookie: str = COOKIE) -> WebSession | None:
        return self.loads(request.cookies.get(self.name(request, cookie)))

    def write(self, response: Response, request: Request, session: WebSession,
              cookie: str = COOKIE) -> None:
        secure = self.is_secure(request)
        response.set_cookie(self.name(request, cookie), self.dumps(session),
                            max_age=self.max_age_s, path=self._path(request, cookie),
                            httponly=True, samesite="strict", secure=secure)

    def clear(self, response: Response, request: Request, cookie: str = COOKIE) -> None:
        secure = self.is_secure(request)
        response.delete_cookie(self.name(request, cookie), path=self._path(request, cookie),
                               httponly=True, samesite="strict", secure=secure)


def load_secret(data_dir: Path) -> str:
    """The signing secret kept in the data directory, made on first use. Written under a
    temporary name and linked into place, so replicas sharing the directory agree on one."""
    target = data_dir / SECRET_FILE
    if not target.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
            os.link(tmp, target)
        except FileExistsError:
            pass  # another process won the race: use its secret
        finally:
            tmp.unlink(missing_ok=True)
    return target.read_text().strip()


class SignOuts:
    """Sessions ended by signing out, so that a copy of the cookie dies with them. Kept in the
    rate limiter's storage until the session would have expired anyway: in memory by default,
    in Redis (shared by replicas) when BASTION_REDIS_URL is set."""

    def __init__(self, storage: Storage, max_age_s: int) -> None:
        self.storage = storage
        self.max_age_s = max_age_s

    def add(self, session: WebSession) -> None:
        self.storage.incr(f"bastion:dashboard:signed-out:{session.sid}", self.max_age_s)

    def ended(self, session: WebSession) -> bool:
        return self.storage.get(f"bastion:dashboard:signed-out:{session.sid}") > 0
