"""The playground page, and the endpoint its script streams from.

The page never holds an API key. Its script posts to /dashboard/api/chat/completions, a
same-origin endpoint that authenticates with the session cookie (HttpOnly, SameSite=Strict)
plus the session's CSRF token in a header, and then calls the API's own chat route with the
session key's principal: the same validation, limits, billing and SSE stream as
/v1/chat/completions. A script injected into the page could still spend tokens while the
session lasts, but it could not steal a key to use elsewhere."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from bastion.http.admission import enter
from bastion.http.inference import respond
from bastion.services.chat import complete_chat, open_chat_stream
from bastion.services.inference import start_chat
from bastion.web.deps import ServicesDep
from bastion.admission.gate import RequestContext
from bastion.protocol.models import card
from bastion.errors import AuthenticationError, AuthorizationError
from bastion.protocol.chat import ChatCompletion, ChatCompletionRequest
from bastion.tenancy.keys import Principal, verify_id
from bastion.web.deps import Codec, InferenceViewer, refuse_csrf, signed_out
from bastion.web.render import PageRoute, render

router = APIRouter(route_class=PageRoute)
api = APIRouter()  # JSON errors in the API's shape: the page's script shows them


@router.get("/dashboard/playground", include_in_schema=False)
def playground_page(request: Request, viewer: InferenceViewer,
                    services: ServicesDep) -> Response:
    models = [card(d) for d in services.catalog.visible(viewer.principal.org_id)
              if d.engine.capabilities.chat]
    wanted = request.query_params.get("model", "")
    selected = wanted if any(m.id == wanted for m in models) else (models[0].id if models else "")
    masked = viewer.key_prefix + "•" * 8
    missing = wanted if wanted and selected != wanted else ""  # say so, never switch silently
    return render(request, "playground.html", page="playground", models=models, selected=selected,
                  missing=missing,
                  masked_key=masked, base_url=str(request.base_url).rstrip("/") + "/v1",
                  limits=viewer.principal.limits)


async def session_key(request: Request, codec: Codec, services: ServicesDep) -> RequestContext:
    """The session's key, for a script on a dashboard page: the cookie and the CSRF header
    both, then the same checks and request counting as a bearer key on /v1."""
    session = codec.read(request)
    if session is None or session.key_id is None:
        raise AuthenticationError("Your dashboard session has ended. Sign in again.",
                                  code="session_expired")
    if not session.csrf_ok(request.headers.get("x-csrf-token")):
        raise refuse_csrf()
    if await signed_out(request, codec, session):
        raise AuthenticationError("You signed out of this session. Sign in again.",
                                  code="session_expired")
    factory = services.sessions
    key_id = session.key_id

    def lookup() -> Principal:
        with factory() as s:
            return verify_id(s, key_id)

    principal = await run_in_threadpool(lookup)
    if not principal.can("inference"):
        raise AuthorizationError("This API key lacks the 'inference' permission needed "
                                 "for the playground.")
    # through the admission gate exactly as on /v1's inference routes
    return await enter(request, services, principal, inference=True)


@api.post("/dashboard/api/chat/completions", include_in_schema=False,
          response_model=ChatCompletion)
async def playground_chat(body: ChatCompletionRequest,
                          ctx: Annotated[RequestContext, Depends(session_key)],
                          services: ServicesDep,
                          request: Request) -> ChatCompletion | StreamingResponse:
    return await respond(request, services, ctx, stream=bool(body.stream),
                         start=lambda: start_chat(services, ctx, body),
                         open_stream=open_chat_stream, complete=complete_chat)
