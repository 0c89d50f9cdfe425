"""Sign in by pasting an API key, sign out. The key is verified by the API's own
authenticate() and then forgotten: the session keeps only its id."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from bastion.errors import AuthenticationError
from bastion.services.auth import authenticate
from bastion.web.deps import CheckedForm, CheckedLoginForm, Codec, ServicesDep, sign_out
from bastion.web.render import PageRoute, render
from bastion.web.session import LOGIN_COOKIE, SessionCodec, WebSession

router = APIRouter(route_class=PageRoute)


def safe_next(path: object) -> str:
    """Only a dashboard path of this server: never an open redirect."""
    if isinstance(path, str) and path.startswith("/dashboard/") and "//" not in path \
            and "\\" not in path and "/login" not in path:
        return path
    return "/dashboard/"


# Why a session ended, by the code the sign-in redirect carries. The page shows only these fixed
# texts: the query string is the attacker's to choose, so its text is never shown.
SIGN_IN_REASONS = {
    "signed_out": "you signed out.",
    "api_key_revoked": "this API key has been revoked.",
    "invalid_api_key": "this API key no longer exists.",
    "organization_deleted": "this API key's organization has been deleted.",
    "key_invalid": "this API key no longer works.",
}


def login_page(request: Request, codec: SessionCodec, *, status: int = 200, error: str = "",
               next_path: str = "") -> Response:
    form = codec.read(request, LOGIN_COOKIE) or WebSession.new()
    response = render(request, "login.html", status=status, csrf=form.csrf, error=error,
                      next=safe_next(next_path or request.query_params.get("next")),
                      reason=SIGN_IN_REASONS.get(request.query_params.get("reason", ""), ""))
    codec.write(response, request, form, LOGIN_COOKIE)
    return response


@router.get("/dashboard/login", include_in_schema=False)
async def login_form(request: Request, codec: Codec) -> Response:
    session = codec.read(request)
    if session is not None and session.key_id is not None:
        return RedirectResponse("/dashboard/", status_code=303)
    return login_page(request, codec)


@router.post("/dashboard/login", include_in_schema=False)
async def login(request: Request, codec: Codec, form: CheckedLoginForm,
                services: ServicesDep) -> Response:
    raw = str(form.get("api_key") or "").strip()
    try:
        if not raw:
            raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
        key_id = (await authenticate(services, raw)).key_id
    except AuthenticationError as exc:
        return login_page(request, codec, status=401, error=exc.message,
                          next_path=str(form.get("next") or ""))
    response = RedirectResponse(safe_next(form.get("next")), status_code=303)
    codec.write(response, request, WebSession.new(key_id))  # a new CSRF token with the sign-in
    codec.clear(response, request, LOGIN_COOKIE)
    return response


@router.post("/dashboard/logout", include_in_schema=False)
async def logout(request: Request, codec: Codec, form: CheckedForm) -> Response:
    """Ends the session everywhere, not just in this browser: a copied cookie dies too."""
    session = codec.read(request)
    if session is not None:
        await sign_out(request, codec, session)
    response = RedirectResponse("/dashboard/login", status_code=303)
    codec.clear(response, request)
    return response
