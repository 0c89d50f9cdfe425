"""/v1/ws: the chat API over one WebSocket.

The Achiral document's protocol ({"type": "auth"}, {"type": "inference"}, "token" and "done"
messages), extended where users need it: an optional client `id` echoed on every message so one
socket runs several generations at once, `cancel`, `ping`/`pong`, and `error` messages that carry
the same error body as HTTP. Only the transport differs from POST /v1/chat/completions: the same
validation, permission check, rate limits, admission and ledger run for every inference.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from bastion.http.json_text import lone_surrogate
from bastion.services.auth import authenticate, check_permission
from bastion.errors import (APIError, AuthenticationError, InvalidRequestError,
                            ServiceUnavailableError, validation_error)
from bastion.protocol.chat import ChatCompletionRequest
from bastion.admission.gate import RequestContext
from bastion.admission.limiter import Ticket
from bastion.services.chat import open_chat_stream
from bastion.services.common import error_payload
from bastion.services.inference import start_chat
from bastion.services.context import Services
from bastion.tenancy.keys import Principal

router = APIRouter()
log = logging.getLogger("bastion.ws")
POLICY_VIOLATION = 1008  # RFC 6455 close code for an unauthenticated socket
# Before a socket has authenticated, anyone may hold it: an auth message is small, and a
# client gets a few tries at its key, not a key-guessing loop on one connection.
MAX_UNAUTHENTICATED_FRAME = 16 * 1024
MAX_AUTH_ATTEMPTS = 3
RequestId = str | int | None


@router.websocket("/v1/ws")
async def websocket_api(ws: WebSocket) -> None:
    lifecycle = ws.app.state.services.lifecycle
    lifecycle.sockets += 1
    try:
        await Connection(ws).serve()
    finally:
        lifecycle.sockets -= 1


class Connection:
    """One socket: authenticates once, then runs each inference message as its own task."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.services: Services = ws.app.state.services
        self.settings = self.services.settings
        self.principal: Principal | None = None
        self._key = ""  # verified again before each inference: revocation is immediate
        self.running: dict[RequestId, asyncio.Task[None]] = {}
        self._send_lock = asyncio.Lock()
        self.closed = False
        self.auth_failures = 0

    async def serve(self) -> None:
        await self.ws.accept()
        if header := self.ws.headers.get("authorization"):
            scheme, _, token = header.partition(" ")
            try:
                if scheme.lower() != "bearer" or not token.strip():
                    raise AuthenticationError("The Authorization header must be "
                                              "'Bearer YOUR_API_KEY'.", code="invalid_api_key")
                self._key = token.strip()
                self.principal = await authenticate(self.services, self._key)
            except APIError as err:
                await self.send_error(err, None)
                await self.ws.close(POLICY_VIOLATION)
                return
            await self.send({"type": "authenticated"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.ws_auth_timeout
        try:
            while True:
                wait = None if self.principal else max(0.0, deadline - loop.time())
                try:
                    message = await asyncio.wait_for(self.ws.receive(), wait)
                except asyncio.TimeoutError:
                    await self.send_error(AuthenticationError(
                        f"No {{\"type\": \"auth\"}} message within "
                        f"{self.settings.ws_auth_timeout:g} seconds; closing.",
                        code="auth_timeout"), None)
                    await self.ws.close(POLICY_VIOLATION)
                    return
                if message["type"] == "websocket.disconnect":
                    return
                if self.principal is None and len(message.get("text") or message.get("bytes")
                                                  or "") > MAX_UNAUTHENTICATED_FRAME:
                    await self.refuse(InvalidRequestError(
                        f"Before authenticating, a message may be at most "
                        f"{MAX_UNAUTHENTICATED_FRAME} bytes; closing.",
                        code="message_too_large"))
                    return
                if message.get("text") is None:
                    await self.send_error(InvalidRequestError(
                        "Binary frames are not supported: send JSON text messages.",
                        code="invalid_message"), None)
                    continue
                await self.handle(message["text"])
                if self.principal is None and self.auth_failures >= MAX_AUTH_ATTEMPTS:
                    await self.refuse(AuthenticationError(
                        f"{MAX_AUTH_ATTEMPTS} failed auth attempts on this socket; closing.",
                        code="too_many_auth_attempts"))
                    return
        except WebSocketDisconnect:
            return
        finally:
            self.closed = True  # closing the socket cancels its generations, freeing slots
            tasks = list(self.running.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def refuse(self, err: APIError) -> None:
        """Say why, then close an unauthenticated socket as a policy violation."""
        await self.send_error(err, None)
        await self.ws.close(POLICY_VIOLATION)

    # --- messages ------------------------------------------------------------------------------
    async def handle(self, text: str) -> None:
        if lone_surrogate(text.encode("utf-8", "surrogatepass")):
            await self.send_error(InvalidRequestError(
                "The message holds a lone UTF-16 surrogate escape (such as \\ud800), which is "
                "not valid Unicode text.", code="invalid_json"), None)
            return
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError) as exc:
            what = str(exc) if isinstance(exc, ValueError) else "it is nested too deeply"
            await self.send_error(InvalidRequestError(f"The message is not valid JSON: {what}.",
                                                      code="invalid_json"), None)
            return
        if not isinstance(msg, dict):
            await self.send_error(InvalidRequestError("A message must be a JSON object.",
                                                      code="invalid_message"), None)
            return
        rid = msg.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))
                                or (isinstance(rid, str) and len(rid) > 256)):
            await self.send_error(InvalidRequestError(
                "'id' must be a string (at most 256 characters) or an integer.", param="id",
                code="invalid_value"), None)
            return
        kind = msg.get("type")
        try:
            if kind == "ping":
                await self.send({"type": "pong", **_tag(rid)})
            elif kind == "auth":
                await self.auth(msg, rid)
            elif kind == "inference":
                await self.start_inference(msg, rid)
            elif kind == "cancel":
                await self.cancel(rid)
            else:
                raise InvalidRequestError(
                    f"Unknown message type {kind!r}: expected auth, inference, cancel or ping.",
                    param="type", code="invalid_message")
        except APIError as err:
            await self.send_error(err, rid)

    async def auth(self, msg: dict[str, Any], rid: RequestId) -> None:
        if self.principal is not None:
            raise InvalidRequestError("This socket is already authenticated.",
                                      code="already_authenticated")
        key = msg.get("api_key")
        if not isinstance(key, str) or not key:
            self.auth_failures += 1
            raise AuthenticationError("The auth message needs an 'api_key' string.",
                                      code="missing_api_key")
        try:
            self.principal = await authenticate(self.services, key)
        except AuthenticationError:
            self.auth_failures += 1
            raise
        self._key = key
        await self.send({"type": "authenticated", **_tag(rid)})

    async def start_inference(self, msg: dict[str, Any], rid: RequestId) -> None:
        if self.principal is None:
            raise AuthenticationError(
                'Authenticate first: send {"type": "auth", "api_key": "YOUR_API_KEY"}.',
                code="not_authenticated")
        if rid in self.running:
            raise InvalidRequestError(f"A request with id {rid!r} is already running on this "
                                      f"socket.", param="id", code="duplicate_id")
        if len(self.running) >= self.settings.ws_max_requests:
            raise InvalidRequestError(
                f"At most {self.settings.ws_max_requests} requests may run at once on one "
                f"socket.", code="too_many_requests")
        if self.services.lifecycle.draining:
            raise ServiceUnavailableError("The server is shutting down and accepts no new "
                                          "requests; retry on another replica.")
        body = {k: v for k, v in msg.items() if k not in ("type", "id")}
        body.setdefault("stream", True)
        try:
            request = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_error(RequestValidationError(exc.errors())) from None
        # The key again (revoked since? plan changed?), counted like an HTTP request.
        self.principal = await authenticate(self.services, self._key)
        check_permission(self.principal, "inference")
        ctx = await self.services.gate.enter(self.principal, endpoint="/v1/ws", inference=True)
        try:
            task = asyncio.create_task(self.generate(request, rid, ctx))
        except BaseException:
            await self.services.gate.close(ctx)
            raise
        self.running[rid] = task
        task.add_done_callback(lambda _: self.running.pop(rid, None))

    async def cancel(self, rid: RequestId) -> None:
        task = self.running.get(rid)
        if task is None:
            raise InvalidRequestError(f"No running request with id {rid!r} on this socket.",
                                      param="id", code="not_found")
        task.cancel()

    # --- one generation ------------------------------------------------------------------------
    async def generate(self, body: ChatCompletionRequest, rid: RequestId,
                       ctx: RequestContext) -> None:
        lifecycle = self.services.lifecycle
        gate = self.services.gate
        lifecycle.enter()
        finish: dict[int, str] = {}
        texts: dict[int, str] = {}
        calls: dict[int, list[dict[str, Any]]] = {}
        tag = _tag(rid)
        try:
            prep, ticket = await start_chat(self.services, ctx, body)
            async for chunk in await open_chat_stream(prep, ticket):
                for choice in chunk["choices"]:
                    index, content = choice["index"], choice["delta"].get("content")
                    if content:
                        if body.stream:
                            await self.send({"type": "token", **tag, "index": index,
                                             "content": content})
                        else:
                            texts[index] = texts.get(index, "") + content
                    for delta in choice["delta"].get("tool_calls") or []:
                        _add_call(calls.setdefault(index, []), delta)
                    if choice["finish_reason"]:
                        finish[index] = choice["finish_reason"]
            await self.send(self._done(tag, prep.id, prep.deployment.id, ticket, finish, texts,
                                       body.stream, calls))
        except asyncio.CancelledError:
            if ctx.tickets and not self.closed:  # cancelled by the client: say how far it got
                await gate.close(ctx)
                await self.send({"type": "done", **tag, "finish_reason": "cancelled",
                                 "usage": _usage(ctx.tickets[0])})
        except Exception as exc:  # the same error body as HTTP, tagged with the request's id
            if not self.closed:
                await self.send({"type": "error", **tag, **error_payload(exc)})
        finally:
            await gate.close(ctx)
            lifecycle.leave()

    @staticmethod
    def _done(tag: dict[str, Any], completion_id: str, model: str, ticket: Ticket,
              finish: dict[int, str], texts: dict[int, str], streamed: bool,
              calls: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
        """The tool calls of an answer come whole in `done` (as `message.tool_calls`)."""
        done: dict[str, Any] = {"type": "done", **tag, "completion_id": completion_id,
                                "model": model, "finish_reason": finish.get(0),
                                "usage": _usage(ticket)}
        if len(finish) > 1 or not streamed:
            done["choices"] = [{"index": i, "finish_reason": finish.get(i),
                                **({} if streamed else {"content": texts.get(i, "")}),
                                **({"tool_calls": calls[i]} if i in calls else {})}
                               for i in sorted(finish)]
        if not streamed and len(finish) == 1:
            done["content"] = texts.get(0, "")
        if len(finish) == 1 and 0 in calls:
            done["tool_calls"] = calls[0]
        return done

    # --- sending -------------------------------------------------------------------------------
    async def send(self, message: dict[str, Any]) -> None:
        if self.ws.application_state != WebSocketState.CONNECTED:
            return
        async with self._send_lock:  # generations of one socket send from their own tasks
            try:
                await self.ws.send_text(json.dumps(message, separators=(",", ":")))
            except (WebSocketDisconnect, RuntimeError):
                self.closed = True

    async def send_error(self, err: APIError, rid: RequestId) -> None:
        await self.send({"type": "error", **_tag(rid), **err.body()})


def _add_call(calls: list[dict[str, Any]], delta: dict[str, Any]) -> None:
    """Reassemble a streamed tool call: its first delta names it, later ones add arguments."""
    if "id" in delta:
        calls.append({"id": delta["id"], "type": "function",
                      "function": {"name": delta["function"]["name"], "arguments": ""}})
    calls[delta["index"]]["function"]["arguments"] += delta["function"].get("arguments", "")


def _tag(rid: RequestId) -> dict[str, Any]:
    return {} if rid is None else {"id": rid}


def _usage(ticket: Ticket) -> dict[str, Any]:
    return {"prompt_tokens": ticket.prompt_tokens,
            "completion_tokens": ticket.completion_tokens,
            "total_tokens": ticket.prompt_tokens + ticket.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": ticket.cached_tokens}}
