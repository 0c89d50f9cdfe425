"""The upstream engine: a model that other OpenAI-compatible servers generate (vLLM, TGI,
llama.cpp server, Ollama, another Bastion), one or more replicas of it.

It implements the Engine protocol like a local engine, but its prompts are messages or text,
not tokens (the upstream renders its own chat template): count_prompt asks the upstream's
/tokenize or gives an upper bound, generate posts the OpenAI body and yields the same events as
a local engine, then a Usage event with the upstream's own report. Bastion keeps everything in
front of the model: auth, limits, image checks, the ledger.

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
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx
import numpy as np

from bastion.config import Settings, UpstreamSpec
from bastion.engines import upstream_wire as wire
from bastion.engines.base import (BaseEngine, Capabilities, ChatPrompt, EmbeddingPrompt,
                                  Embeddings, Event, GenerationRequest, ModelInfo,
                                  ModelInputError, ModelUnavailable, PreparedPrompt,
                                  PromptSource, TextPrompt, UpstreamFailure, UpstreamRefused)

log = logging.getLogger("bastion.upstream")
DEFAULT_CONTEXT = 4096  # when neither the configuration nor the upstream says
SMALL_BODY = 1024 * 1024  # the most read of an error, a /models or a /tokenize answer
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


class UpstreamEngine(BaseEngine):
    @classmethod
    def from_spec(cls, spec: UpstreamSpec, settings: Settings | None = None) -> "UpstreamEngine":
        """An UpstreamSpec holds all of this engine's settings (replicas, timeouts, ...)."""
        return cls(spec)

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self.name = spec.id
        self.upstream_model = spec.model or spec.id
        caps = set(spec.capabilities)
        self.capabilities = Capabilities(chat="chat" in caps, completion="completion" in caps,
                                         embeddings="embeddings" in caps, vision="vision" in caps,
                                         constrained="chat" in caps or "completion" in caps,
                                         tools="chat" in caps, tool_family="")
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
        self._hosts = tuple(sorted({httpx.URL(url).host for url in spec.urls}, key=len,
                                   reverse=True))
        self.max_body = spec.max_response_bytes

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
            request = client.build_request("GET", f"{replica.url}/models",
                                           timeout=max(1.0, self.spec.connect_timeout))
            resp = await client.send(request, stream=True)
            try:
                body = (await self._read(resp, SMALL_BODY) if resp.status_code == 200
                        and self.spec.context_length is None else b"")
            except UpstreamFailure:
                body = b""  # an answer too large to read says nothing of the context
            finally:
                await resp.aclose()
        except httpx.HTTPError as exc:
            self._mark(replica, False, f"{type(exc).__name__}")
            return
        if resp.status_code in (401, 403):
            log.warning("upstream %s refuses Bastion's API key (HTTP %d)", replica.url,
                        resp.status_code)
        self._mark(replica, resp.status_code < 500, f"HTTP {resp.status_code}")
        if body:
            self._read_context(body)

    async def _read(self, resp: httpx.Response, limit: int) -> bytes:
        """The response's body, refused past `limit` bytes (as it arrives, so a huge or endless
        answer never sits in memory whole)."""
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._too_large(limit)
        parts, size = [], 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise self._too_large(limit)
            parts.append(chunk)
        return b"".join(parts)

    def _too_large(self, limit: int) -> UpstreamFailure:
        log.warning("an upstream server of %s sent more than %d bytes; refused", self.name, limit)
        return UpstreamFailure(f"The upstream server of '{self.name}' sent a response larger "
                               f"than this server accepts ({limit} bytes).")

    def _read_context(self, body: bytes) -> None:
        try:
            cards = json.loads(body).get("data", [])
        except (ValueError, AttributeError, RecursionError):
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
            raise ModelUnavailable(f"The model '{self.name}' is not started yet.",
                                   code="upstream_unavailable")
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
                raise ModelUnavailable(
                    f"The model '{self.name}' is unavailable: none of its "
                    f"{len(self.replicas)} upstream server{'s' * (len(self.replicas) > 1)} "
                    f"can be reached. Try again shortly.", code="upstream_unavailable")
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
                    raise UpstreamFailure(f"The upstream server of '{self.name}' timed out "
                                          f"({type(exc).__name__}).") from None
                except httpx.HTTPError as exc:
                    raise UpstreamFailure(f"The upstream server of '{self.name}' failed "
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
            body = json.loads(await self._read(resp, SMALL_BODY))
        except (ValueError, RecursionError, httpx.HTTPError, UpstreamFailure):
            body = None
        return wire.relayed(resp.status_code, body, self.name, self._hosts)

    async def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed request: the upstream's JSON answer."""
        async with self._open(lambda r: f"{r.url}/{path}", payload) as resp:
            try:
                data = json.loads(await self._read(resp, self.max_body))
            except (ValueError, RecursionError):
                raise UpstreamFailure(f"The upstream server of '{self.name}' sent a response "
                                      f"that is not JSON.") from None
            except httpx.HTTPError as exc:
                raise self._broken(exc) from None
        if not isinstance(data, dict):
            raise UpstreamFailure(f"The upstream server of '{self.name}' sent an unexpected "
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
                async for line in _lines(resp, self.max_body, self._too_large):
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except (ValueError, RecursionError):
                        raise UpstreamFailure(f"The upstream server of '{self.name}' sent an "
                                              f"event that is not JSON.") from None
                    if not isinstance(chunk, dict):
                        raise UpstreamFailure(f"The upstream server of '{self.name}' sent an "
                                              f"unexpected event.")
                    if "error" in chunk or chunk.get("object") == "error":
                        raise wire.relayed(500, chunk, self.name, self._hosts)
                    yield chunk
            except httpx.HTTPError as exc:
                raise self._broken(exc) from None

    def _broken(self, exc: httpx.HTTPError) -> UpstreamFailure:
        return UpstreamFailure(f"The upstream server of '{self.name}' stopped answering in the "
                               f"middle of a response ({type(exc).__name__}).")

    async def _tokenize(self, payload: dict[str, Any]) -> int | None:
        """The exact prompt length from the upstream's vLLM-style POST /tokenize (chat
        `messages` or completion `prompt`), or None where it has none: then admission uses an
        upper bound. Probed once with tokenize="auto"."""
        if self._can_tokenize is False:
            return None
        body = {"model": self.upstream_model, **payload}
        try:
            async with self._open(lambda r: f"{r.root}/tokenize", body) as resp:
                data = json.loads(await self._read(resp, SMALL_BODY))
        except UpstreamRefused as exc:
            if exc.status in (404, 405, 501) and self._can_tokenize is None:
                log.info("%s: the upstream has no /tokenize; prompts are estimated", self.name)
                self._can_tokenize = False
            return None
        except (UpstreamFailure, ValueError, RecursionError, httpx.HTTPError):
            return None
        count = data.get("count") if isinstance(data, dict) else None
        if not isinstance(count, int):
            if self._can_tokenize is None:
                self._can_tokenize = False
            return None
        self._can_tokenize = True
        return count


    # --- the engine protocol --------------------------------------------------------------------
    async def count_prompt(self, source: PromptSource) -> PreparedPrompt:
        """Chat and completion prompts: the upstream's exact count where it can tokenise (not
        with images), else an upper bound; embedding inputs: always an upper bound, settled
        to the upstream's report."""
        if isinstance(source, ChatPrompt):
            messages = await asyncio.to_thread(wire.wire_messages, source.messages)
            images = any(isinstance(m["content"], list) and any(
                p["type"] == "image_url" for p in m["content"]) for m in messages)
            payload = wire.chat_payload(messages, source.tools, source.tool_options)
            count = None if images else await self._tokenize(  # vLLM's takes tools, not choice
                {"messages": messages, "add_generation_prompt": True,
                 **({"tools": source.tools} if source.tools else {})})
            n = count if count is not None else wire.chat_upper_bound(
                messages, self.image_tokens, source.tools)
            return PreparedPrompt(n, exact=count is not None, payload=payload)
        if isinstance(source, TextPrompt):
            if source.pieces:
                raise ModelInputError(f"The model '{self.name}' cannot echo the prompt with "
                                      f"logprobs.", param="echo", code="unsupported_parameter")
            p = source.text
            payload = {"prompt": p}
            if source.suffix is not None:
                payload["suffix"] = source.suffix
            if isinstance(p, list):
                return PreparedPrompt(len(p), payload=payload)
            count = await self._tokenize({"prompt": p}) if source.suffix is None else None
            n = count if count is not None else wire.text_upper_bound(p, source.suffix)
            return PreparedPrompt(n, exact=count is not None, payload=payload, text=p)
        if isinstance(source, EmbeddingPrompt):
            return PreparedPrompt(sum(map(wire.input_upper_bound, source.inputs)), exact=False,
                                  payload=source.inputs)
        return await super().count_prompt(source)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        async with aclosing(await self.open(request)) as events:  # type: ignore[type-var]
            async for event in events:
                yield event

    async def open(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Connects (streamed) or gets the whole answer (not streamed, which is how servers
        such as llama.cpp's report usage) now, so that a refusal raises here; the events then
        follow. Closing the stream closes the connection: that is how the upstream learns
        that the client went away."""
        chat = "messages" in request.payload
        path = "chat/completions" if chat else "completions"
        body = wire.request_body(request, self.upstream_model)
        if not request.stream:
            data = await self.post(path, {**body, "stream": False})
            return _listed(wire.answer_events(data, chat, request.params.max_tokens, self.name))
        # usage comes from the upstream, whether or not the client asked for it
        chunks = await self.open_stream(path, {**body, "stream": True,
                                               "stream_options": {"include_usage": True}})
        return wire.stream_events(chunks, chat, self.name)  # type: ignore[arg-type]

    async def embed(self, prompt: PreparedPrompt, *,
                    dimensions: int | None = None) -> Embeddings:
        """Float vectors from the upstream (every OpenAI-compatible server has those) and its
        usage report (else the prompt's upper bound)."""
        payload: dict[str, Any] = {"model": self.upstream_model, "input": prompt.payload,
                                   "encoding_format": "float"}
        if dimensions is not None:
            payload["dimensions"] = dimensions
        data = await self.post("embeddings", payload)
        usage = wire.reported(data.get("usage"))
        try:
            items = sorted(data["data"], key=lambda d: d["index"])
            vectors = [np.asarray(d["embedding"], dtype=np.float32) for d in items]
        except (KeyError, TypeError, ValueError):
            raise UpstreamFailure(f"The upstream server of '{self.name}' sent embeddings "
                                  f"Bastion cannot read.") from None
        if len(vectors) != len(prompt.payload):
            raise UpstreamFailure(f"The upstream server of '{self.name}' sent {len(vectors)} "
                                  f"vectors for {len(prompt.payload)} inputs.")
        return Embeddings(np.stack(vectors) if vectors else np.zeros((0, 0), np.float32),
                          usage[0] if usage else prompt.n_tokens)


async def _lines(resp: httpx.Response, limit: int,
                 too_large: Any) -> AsyncIterator[str]:
    """The stream's lines (as httpx's aiter_lines splits them), refusing a line longer than
    `limit` bytes before it is whole: an upstream that never ends a line cannot fill memory."""
    pending = ""
    async for text in resp.aiter_text():
        pending += text
        *lines, pending = pending.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for line in lines:
            yield line
        if len(pending) > limit:
            raise too_large(limit)
    if pending:
        yield pending


async def _listed(events: list[Event]) -> AsyncIterator[Event]:
    for event in events:
        yield event
