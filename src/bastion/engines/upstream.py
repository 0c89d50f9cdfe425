"""The upstream engine: a model that other OpenAI-compatible servers generate (vLLM, TGI,
llama.cpp server, Ollama, another Bastion), one or more replicas of it.

It is a *passthrough* engine: it takes OpenAI request bodies, not tokens (the upstream renders
its own chat template), so serving/passthrough.py, not the token path, drives it. Bastion keeps
everything in front of the model: auth, limits, image checks, the ledger.

Replicas: each request goes to the least busy replica that is up. A replica that refuses the
connection (nothing was sent yet, so nothing can have run twice) is marked down and the request
tried on the next; a background loop checks every replica (GET {url}/models) and brings it back.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx

from bastion.config import UpstreamSpec
from bastion.engines.base import Capabilities, ModelInfo
from bastion.errors import BadGatewayError, UpstreamError, UpstreamUnavailableError

log = logging.getLogger("bastion.upstream")
DEFAULT_CONTEXT = 4096  # when neither the configuration nor the upstream says
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)


@dataclass
class Replica:
    url: str  # base URL, e.g. http://gpu1:8000/v1
    up: bool = True
    busy: int = 0  # requests in flight from this Bastion

    @property
    def root(self) -> str:
        """The server root, where vLLM and llama.cpp serve /tokenize and /health."""
        return self.url[:-3] if self.url.endswith("/v1") else self.url


class UpstreamEngine:
    passthrough = True  # takes OpenAI bodies, not tokens: see serving/passthrough.py

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self.name = spec.id
        self.upstream_model = spec.model or spec.id
        caps = set(spec.capabilities)
        self.capabilities = Capabilities(chat="chat" in caps, completion="completion" in caps,
                                         embeddings="embeddings" in caps, vision="vision" in caps)
        self.info = ModelInfo(context_length=spec.context_length or DEFAULT_CONTEXT,
                              parameters=None, vocab_size=0, created=int(time.time()))
        self.replicas = [Replica(url) for url in spec.urls]
        self.max_parallel = 128  # n is the upstream's to limit
        self.image_tokens = spec.image_tokens
        self._can_tokenize: bool | None = {"auto": None, "vllm": True, "none": False}[spec.tokenize]
        self._turn = itertools.count()
        self._client: httpx.AsyncClient | None = None
        self._health: asyncio.Task[None] | None = None
        headers = {"User-Agent": "Bastion"}
        if spec.api_key is not None:
            headers["Authorization"] = f"Bearer {spec.api_key.get_secret_value()}"
        self._headers = headers

    # --- lifecycle (the app's lifespan calls these in its event loop) ---------------------------
    async def start(self) -> None:
        """Open the connection pool, check every replica once, then keep checking."""
        spec = self.spec
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per upstream call
        self._client = httpx.AsyncClient(
            headers=self._headers, follow_redirects=False,
            timeout=httpx.Timeout(connect=spec.connect_timeout, read=spec.read_timeout,
                                  write=spec.read_timeout, pool=spec.connect_timeout),
            limits=httpx.Limits(max_connections=spec.max_connections * len(self.replicas),
                                max_keepalive_connections=64))
        await self.check_replicas()
        self._health = asyncio.create_task(self._health_loop(), name=f"health:{self.name}")

    async def stop(self) -> None:
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def close(self) -> None:
        """Nothing to join: stop() released the pool in the event loop."""

    def abort_all(self, message: str) -> None:
        """Past the drain timeout: nothing runs here to abort. The server then cancels the
        requests still streaming, which closes their upstream connections (and so ends their
        generation upstream)."""
        busy = sum(r.busy for r in self.replicas)
        if busy:
            log.warning("%s: %d upstream request(s) still running at shutdown", self.name, busy)

    def stats(self) -> dict[str, int]:
        return {"replicas_up": sum(r.up for r in self.replicas),
                "in_flight": sum(r.busy for r in self.replicas)}

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.spec.health_interval)
            try:
                await self.check_replicas()
            except Exception:  # never let the loop die
                log.exception("health check of %s failed", self.name)

    async def check_replicas(self) -> None:
        await asyncio.gather(*(self._check(r) for r in self.replicas))

    async def _check(self, replica: Replica) -> None:
        """Up when the server answers at all (below 500); the first 200 also tells the
        context length where vLLM (max_model_len) or Bastion (context_length) reports it."""
        client = self._require_client()
        try:
            resp = await client.get(f"{replica.url}/models",
                                    timeout=max(1.0, self.spec.connect_timeout))
        except httpx.HTTPError as exc:
            self._mark(replica, False, f"{type(exc).__name__}")
            return
        if resp.status_code in (401, 403):
            log.warning("upstream %s refuses Bastion's API key (HTTP %d)", replica.url,
                        resp.status_code)
        self._mark(replica, resp.status_code < 500, f"HTTP {resp.status_code}")
        if resp.status_code == 200 and self.spec.context_length is None:
            self._read_context(resp)

    def _read_context(self, resp: httpx.Response) -> None:
        try:
            cards = resp.json().get("data", [])
        except (ValueError, AttributeError):
            return
        for card in cards if isinstance(cards, list) else []:
            if isinstance(card, dict) and card.get("id") == self.upstream_model:
                length = card.get("max_model_len") or card.get("context_length")
                if isinstance(length, int) and length > 0 and length != self.info.context_length:
                    log.info("%s: the upstream reports a context of %d tokens", self.name, length)
                    self.info = ModelInfo(length, None, 0, self.info.created)

    def _mark(self, replica: Replica, up: bool, why: str) -> None:
        if replica.up != up:
            log.warning("upstream replica %s of %s is %s (%s)", replica.url, self.name,
                        "up" if up else "down", why)
        replica.up = up

    def _require_client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise UpstreamUnavailableError(f"The model '{self.name}' is not started yet.")
        return self._client

    # --- requests -------------------------------------------------------------------------------
    def _pick(self, tried: set[int]) -> Replica | None:
        """The least busy replica that is up and not tried yet; ties take turns."""
        turn = next(self._turn)
        live = [(r.busy, (i - turn) % len(self.replicas), i)
                for i, r in enumerate(self.replicas) if r.up and i not in tried]
        return self.replicas[min(live)[2]] if live else None

    @asynccontextmanager
    async def _open(self, url_of: Any, payload: dict[str, Any]) -> AsyncIterator[httpx.Response]:
        """POST to a replica and yield the response once its status is known to be a success.
        A replica that cannot be connected to is marked down and the next one tried."""
        client = self._require_client()
        tried: set[int] = set()
        while True:
            replica = self._pick(tried)
            if replica is None:
                raise UpstreamUnavailableError(
                    f"The model '{self.name}' is unavailable: none of its "
                    f"{len(self.replicas)} upstream server{'s' * (len(self.replicas) > 1)} "
                    f"can be reached. Try again shortly.")
            tried.add(self.replicas.index(replica))
            replica.busy += 1
            try:
                request = client.build_request("POST", url_of(replica), json=payload)
                try:
                    resp = await client.send(request, stream=True)
                except CONNECT_ERRORS as exc:
                    self._mark(replica, False, type(exc).__name__)
                    continue
                except httpx.TimeoutException as exc:
                    raise BadGatewayError(f"The upstream server of '{self.name}' timed out "
                                          f"({type(exc).__name__}).") from None
                except httpx.HTTPError as exc:
                    raise BadGatewayError(f"The upstream server of '{self.name}' failed "
                                          f"({type(exc).__name__}).") from None
                try:
                    if resp.status_code >= 400:
                        raise await self._refusal(resp)
                    yield resp
                finally:
                    await resp.aclose()
                return
            finally:
                replica.busy -= 1

    async def _refusal(self, resp: httpx.Response) -> Exception:
        """The upstream's error, as the error Bastion's client sees."""
        try:
            body = json.loads(await resp.aread())
        except (ValueError, httpx.HTTPError):
            body = None
        return relayed(resp.status_code, body, self.name)

    async def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed request: the upstream's JSON answer."""
        async with self._open(lambda r: f"{r.url}/{path}", payload) as resp:
            try:
                data = json.loads(await resp.aread())
            except ValueError:
                raise BadGatewayError(f"The upstream server of '{self.name}' sent a response "
                                      f"that is not JSON.") from None
            except httpx.HTTPError as exc:
                raise self._broken(exc) from None
        if not isinstance(data, dict):
            raise BadGatewayError(f"The upstream server of '{self.name}' sent an unexpected "
                                  f"response.")
        return data

    async def open_stream(self, path: str, payload: dict[str, Any]
                          ) -> AsyncIterator[dict[str, Any]]:
        """Connect and check the status now (so that a refusal is an HTTP error, not an
        event), then return the stream's chunks. The iterator is already started, so even one
        dropped unread is closed (asyncio finalises it), and closing it closes the connection:
        that is how vLLM or Bastion upstream learn that the client went away."""
        chunks = self._stream(path, payload)
        await chunks.__anext__()  # None: connected and accepted
        return chunks  # type: ignore[return-value]

    async def _stream(self, path: str, payload: dict[str, Any]
                      ) -> AsyncIterator[dict[str, Any] | None]:
        async with self._open(lambda r: f"{r.url}/{path}", payload) as resp:
            yield None
            try:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise BadGatewayError(f"The upstream server of '{self.name}' sent an "
                                              f"event that is not JSON.") from None
                    if not isinstance(chunk, dict):
                        raise BadGatewayError(f"The upstream server of '{self.name}' sent an "
                                              f"unexpected event.")
                    if "error" in chunk or chunk.get("object") == "error":
                        raise relayed(500, chunk, self.name)
                    yield chunk
            except httpx.HTTPError as exc:
                raise self._broken(exc) from None

    def _broken(self, exc: httpx.HTTPError) -> BadGatewayError:
        return BadGatewayError(f"The upstream server of '{self.name}' stopped answering in the "
                               f"middle of a response ({type(exc).__name__}).")

    async def count_prompt(self, payload: dict[str, Any]) -> int | None:
        """The exact prompt length from the upstream's vLLM-style POST /tokenize (chat
        `messages` or completion `prompt`), or None where it has none: then admission uses an
        upper bound. Probed once with tokenize="auto"."""
        if self._can_tokenize is False:
            return None
        body = {"model": self.upstream_model, **payload}
        try:
            async with self._open(lambda r: f"{r.root}/tokenize", body) as resp:
                data = json.loads(await resp.aread())
        except UpstreamError as exc:
            if exc.status in (404, 405, 501) and self._can_tokenize is None:
                log.info("%s: the upstream has no /tokenize; prompts are estimated", self.name)
                self._can_tokenize = False
            return None
        except (BadGatewayError, ValueError, httpx.HTTPError):
            return None
        count = data.get("count") if isinstance(data, dict) else None
        if not isinstance(count, int):
            if self._can_tokenize is None:
                self._can_tokenize = False
            return None
        self._can_tokenize = True
        return count


def relayed(status: int, body: Any, name: str) -> Exception:
    """An upstream's error body (OpenAI's {"error": {...}}, vLLM's older flat
    {"object": "error", ...}, FastAPI's {"detail": ...}) as Bastion's error. 4xx are the
    client's to fix and keep their status; a refused key or an upstream failure is Bastion's
    (502), never shown to the client as its own 401."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(body, dict) and not isinstance(err, dict):
        err = body if "message" in body else {"message": body.get("detail") or body.get("error")}
    err = err if isinstance(err, dict) else {}
    message = err.get("message")
    message = message if isinstance(message, str) and message else None
    if status in (401, 403):
        log.error("the upstream of %s refused Bastion's credentials (HTTP %d)", name, status)
        return BadGatewayError(f"The upstream server of '{name}' refused this server's "
                               f"credentials; the administrator must fix its api_key.")
    if status == 429 or status >= 500 or not 400 <= status < 500:
        what = message or f"HTTP {status}"
        return BadGatewayError(f"The upstream server of '{name}' failed: {what}")
    code, param = err.get("code"), err.get("param")
    return UpstreamError(message or f"The upstream server of '{name}' refused the request "
                         f"(HTTP {status}).", status=status,
                         code=code if isinstance(code, str) else None,
                         param=param if isinstance(param, str) else None)
