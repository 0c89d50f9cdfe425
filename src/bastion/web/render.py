"""Rendering pages: the Jinja2 environment, security headers, and PageRoute, which turns the
services' errors into HTML pages (the API renders the same errors as JSON)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Coroutine
from urllib.parse import urlencode

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from bastion.errors import APIError, validation_error
from bastion.web.session import SessionCodec

HERE = Path(__file__).parent
# No inline script or style anywhere: the policy allows only the dashboard's own files.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
       "object-src 'none'")


class SignInRequired(Exception):
    """No (valid) dashboard session: the browser goes to the sign-in page."""

    def __init__(self, next_path: str = "", reason: str = "") -> None:
        super().__init__(reason)
        self.next_path = next_path
        self.reason = reason


def _num(value: Any) -> str:
    return "—" if value is None else f"{value:,}"


def _when(value: Any, seconds: bool = False) -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, timezone.utc)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC" if seconds
                                                   else "%Y-%m-%d %H:%M UTC")


def make_templates() -> Jinja2Templates:
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(["html", "svg"]), trim_blocks=True,
                      lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["when"] = _when
    return Jinja2Templates(env=env)


def secure(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def render(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    templates: Jinja2Templates = request.app.state.web_templates
    viewer = getattr(request.state, "viewer", None)
    return templates.TemplateResponse(request, template, {"viewer": viewer, **context},
                                      status_code=status)


def error_page(request: Request, status: int, message: str) -> Response:
    titles = {400: "That did not work", 401: "Sign in again", 403: "Not allowed",
              404: "Not found", 429: "Slow down"}
    return render(request, "error.html", status=status, status_code=status, message=message,
                  title=titles.get(status, "Something went wrong"))


def sign_in_redirect(request: Request, exc: SignInRequired) -> Response:
    url = "/dashboard/login"
    params = []
    if exc.next_path.startswith("/dashboard/") and not exc.next_path.startswith("//"):
        params.append(("next", exc.next_path))
    if exc.reason:
        params.append(("reason", exc.reason))
    if params:
        url += "?" + urlencode(params)
    response = RedirectResponse(url, status_code=303)
    codec: SessionCodec | None = getattr(request.app.state, "web_codec", None)
    if exc.reason and codec is not None:  # the session named a key that no longer works
        codec.clear(response, request)
    return response


class PageRoute(APIRoute):
    """A dashboard route: errors become pages, every response carries the security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignInRequired as exc:
                response = sign_in_redirect(request, exc)
            except RequestValidationError as exc:
                response = error_page(request, 400, validation_error(exc).message)
            except APIError as exc:
                response = error_page(request, exc.status, exc.message)
            return secure(response)

        return route
