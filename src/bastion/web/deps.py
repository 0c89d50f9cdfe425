"""Who is looking at a page: the session cookie turned into the same Principal the API uses,
permission checks that answer with a 403 page, the CSRF check every form post passes, and the
typed Services object the pages call (the same services as the API's routes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Awaitable, Callable

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from bastion.errors import AuthenticationError, AuthorizationError, PayloadTooLargeError
from bastion.files.upload import Upload
from bastion.services.context import Services
from bastion.tenancy import orgs
from bastion.tenancy.keys import Principal, own_key, verify_id
from bastion.web.render import SignInRequired
from bastion.web.session import (COOKIE, LOGIN_COOKIE, SessionCodec, SignOuts, WebSession,
                                 load_secret)


MAX_FORM_BYTES = 64 * 1024


@dataclass(frozen=True)
class Viewer:
    """A signed-in person: their key's principal plus what the page header shows."""

    principal: Principal
    session: WebSession
    key_name: str
    key_prefix: str
    org_name: str
    plan: str

    def can(self, permission: str) -> bool:
        return self.principal.can(permission)

    @property
    def is_server_admin(self) -> bool:
        return self.principal.is_server_admin

    @property
    def csrf(self) -> str:
        return self.session.csrf


class CsrfError(AuthorizationError):
    code = "csrf_failed"


def services_of(request: Request) -> Services:
    """The one Services object the app's lifespan built."""
    return request.app.state.services


async def get_services(request: Request) -> Services:
    return services_of(request)


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_codec(request: Request) -> SessionCodec:
    """Made on first use: the secret lives in the data directory, which the lifespan creates."""
    state = request.app.state
    codec = getattr(state, "web_codec", None)
    if codec is None:
        settings = services_of(request).settings
        secret = settings.session_secret or load_secret(settings.data_dir)
        codec = state.web_codec = SessionCodec(secret, int(settings.session_hours * 3600),
                                               secure=settings.secure_cookies)
    return codec


Codec = Annotated[SessionCodec, Depends(get_codec)]


async def signed_out(request: Request, codec: SessionCodec, session: WebSession) -> bool:
    limiter = services_of(request).limiter
    return await limiter.run(SignOuts(limiter.storage, codec.max_age_s).ended, session)


async def sign_out(request: Request, codec: SessionCodec, session: WebSession) -> None:
    limiter = services_of(request).limiter
    await limiter.run(SignOuts(limiter.storage, codec.max_age_s).add, session)


async def load_viewer(request: Request, codec: Codec, services: ServicesDep) -> Viewer:
    session = codec.read(request)
    if session is None or session.key_id is None:
        raise SignInRequired(request.url.path)
    if await signed_out(request, codec, session):
        raise SignInRequired(request.url.path, "signed_out")
    factory = services.sessions
    key_id = session.key_id

    def lookup() -> Viewer:
        with factory() as s:
            principal = verify_id(s, key_id)
            key = own_key(s, principal)
            org = orgs.get(s, principal, principal.org_id)
            return Viewer(principal, session, key.name, key.prefix, org.name, org.plan)

    try:
        viewer = await run_in_threadpool(lookup)
    except AuthenticationError as exc:  # revoked key or deleted org: the session is over
        raise SignInRequired(request.url.path, exc.code or "key_invalid") from exc
    request.state.viewer = viewer
    return viewer


CurrentViewer = Annotated[Viewer, Depends(load_viewer)]


def can(permission: str) -> Callable[[Viewer], Awaitable[Viewer]]:
    """A page only keys holding `permission` may open (by link or by typing its URL)."""

    async def check(viewer: CurrentViewer) -> Viewer:
        if not viewer.can(permission):
            raise AuthorizationError(f"Your API key lacks the '{permission}' permission this "
                                     f"page needs. Sign in with a key that has it.")
        return viewer

    return check


async def server_admin(viewer: CurrentViewer) -> Viewer:
    if not viewer.is_server_admin:
        raise AuthorizationError("Only the server administrator can manage organisations.")
    return viewer


AdminViewer = Annotated[Viewer, Depends(can("admin"))]
InferenceViewer = Annotated[Viewer, Depends(can("inference"))]
ModelsViewer = Annotated[Viewer, Depends(can("models"))]
TrainingViewer = Annotated[Viewer, Depends(can("training"))]  # admin keys pass too, as on /v1
ServerAdminViewer = Annotated[Viewer, Depends(server_admin)]


def refuse_csrf() -> CsrfError:
    return CsrfError("This form was refused: its security token is missing or out of date. "
                     "Reload the page and try again.")


async def _checked(request: Request, codec: SessionCodec, cookie: str) -> FormData:
    length = request.headers.get("content-length", "")
    if not length.isdigit() or int(length) > MAX_FORM_BYTES:  # forms here are small
        raise PayloadTooLargeError(f"A dashboard form must state its Content-Length and be at "
                                   f"most {MAX_FORM_BYTES} bytes.")
    form = await request.form(max_files=0, max_fields=64)
    session = codec.read(request, cookie)
    token = form.get("csrf_token")
    if session is None or not session.csrf_ok(token if isinstance(token, str) else None):
        raise refuse_csrf()
    return form


async def checked_form(request: Request, codec: Codec) -> FormData:
    """The posted form, only if it carries this session's CSRF token."""
    return await _checked(request, codec, COOKIE)


async def checked_login_form(request: Request, codec: Codec) -> FormData:
    """The sign-in form, only if it carries the token its page was served with."""
    return await _checked(request, codec, LOGIN_COOKIE)


CheckedLoginForm = Annotated[FormData, Depends(checked_login_form)]
CheckedForm = Annotated[FormData, Depends(checked_form)]


def checked_upload(upload: Upload, request: Request, codec: SessionCodec) -> None:
    """A multipart form carries its CSRF token among its fields: checked before the file is
    validated or kept (only a signed-in session's request gets this far)."""
    session = codec.read(request)
    if session is None or not session.csrf_ok(upload.fields.get("csrf_token")):
        raise refuse_csrf()
