"""What the upstream engine sends and reads: OpenAI request bodies built from a prepared prompt
and sampling parameters, the upstream's answers turned into Bastion's events, upper bounds for
prompts it cannot count, and its error bodies as engine errors."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from contextlib import aclosing
from typing import Any, AsyncIterator

from bastion.engines.base import (DecodedImage, Delta, EngineError, Event, Finished,
                                  GenerationRequest, TokenLogprob, UpstreamFailure,
                                  UpstreamRefused, Usage)

log = logging.getLogger("bastion.upstream")

# The upper bound when the upstream cannot count: a token is at least one byte of text, and a
# chat template adds at most this much around the messages and per message.
TEMPLATE_TOKENS = 64
MESSAGE_TOKENS = 16
PROMPT_TOKENS = 8  # BOS and the like around a completion prompt
INPUT_TOKENS = 2  # CLS/SEP or BOS/EOS around each embedding input
# Sampling parameters sent only when the client set them (the upstream keeps its defaults).
FORWARDED = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
             "seed")


def png_uri(image: DecodedImage) -> str:
    """The decoded, checked pixels as a PNG data URI: the upstream never fetches a URL."""
    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (image.width, image.height), image.rgb).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def wire_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bastion's messages as an OpenAI body's (call off the event loop: PNG encoding), with
    assistants' tool calls and tool results' call ids as the client sent them."""
    out: list[dict[str, Any]] = []
    for m in messages:
        msg: dict[str, Any] = {"role": m["role"]}
        content = m.get("content")
        if isinstance(content, list):
            msg["content"] = [
                {"type": "image_url", "image_url": {"url": png_uri(p["image"]),
                                                    "detail": p.get("detail", "auto")}}
                if p["type"] == "image" else {"type": "text", "text": p["text"]}
                for p in content]
        else:
            msg["content"] = content or ""
        for key in ("name", "tool_calls", "tool_call_id"):
            if m.get(key):
                msg[key] = m[key]
        out.append(msg)
    return out


def chat_payload(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 options: dict[str, Any]) -> dict[str, Any]:
    """The prompt's part of a chat body: the messages, and the tools with the client's
    tool_choice and parallel_tool_calls (the upstream does the tool calling)."""
    return {"messages": messages, **({"tools": tools, **options} if tools else {})}


def chat_upper_bound(messages: list[dict[str, Any]], image_tokens: int,
                     tools: list[dict[str, Any]] | None = None) -> int:
    """Tools and tool calls count as their JSON's bytes (a template writes them as such, or
    shorter)."""
    total = TEMPLATE_TOKENS + (len(json.dumps(tools).encode()) if tools else 0)
    for m in messages:
        total += MESSAGE_TOKENS + len(m.get("name", "").encode())
        if m.get("tool_calls"):
            total += len(json.dumps(m["tool_calls"]).encode())
        parts = m["content"] if isinstance(m["content"], list) else [
            {"type": "text", "text": m["content"]}]
        for p in parts:
            total += image_tokens if p["type"] == "image_url" else len(p["text"].encode())
    return total


def text_upper_bound(prompt: str, suffix: str | None) -> int:
    return len(prompt.encode()) + len((suffix or "").encode()) + PROMPT_TOKENS


def input_upper_bound(x: str | list[int]) -> int:
    return len(x) if isinstance(x, list) else len(x.encode()) + INPUT_TOKENS


def request_body(request: GenerationRequest, model: str) -> dict[str, Any]:
    """The OpenAI body for a generation: the prompt, max_tokens (so the reservation holds) and
    the sampling parameters the client set; `user` and the like stay here (privacy)."""
    p = request.params
    chat = "messages" in request.payload
    body: dict[str, Any] = {"model": model, **request.payload, "max_tokens": p.max_tokens}
    for name in FORWARDED:
        if name in p.explicit:
            body[name] = getattr(p, name)
    if "stop" in p.explicit:
        body["stop"] = list(p.stop)
    if "logit_bias" in p.explicit:
        body["logit_bias"] = {str(t): b for t, b in p.logit_bias}
    if "n" in p.explicit or request.n != 1:
        body["n"] = request.n
    if p.output is not None:  # the upstream enforces it (vLLM does)
        body["response_format"] = json.loads(p.output.wire)
    if chat:
        if "logprobs" in p.explicit:
            body["logprobs"] = p.logprobs
        if "top_logprobs" in p.explicit:
            body["top_logprobs"] = p.top_logprobs
    elif "logprobs" in p.explicit and p.logprobs:
        body["logprobs"] = p.top_logprobs
    return body


def finish_reason(reason: Any) -> str:
    """OpenAI's finish reasons that Bastion's schema knows; anything else ended normally."""
    return reason if reason in ("stop", "length", "tool_calls") else "stop"


def tool_call_deltas(choice: dict[str, Any], streamed: bool) -> tuple[dict[str, Any], ...]:
    """A choice's tool calls as OpenAI's stream deltas (index, and id, type, name where the
    upstream sent them; arguments). A whole message's calls become one delta each."""
    inner = choice.get("delta" if streamed else "message")
    calls = inner.get("tool_calls") if isinstance(inner, dict) else None
    out = []
    for k, call in enumerate(calls if isinstance(calls, list) else []):
        if not isinstance(call, dict):
            raise ValueError("a tool call that is not an object")
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        delta: dict[str, Any] = {"index": int(call.get("index", k))}
        if call.get("id"):
            delta["id"] = str(call["id"])
            delta["type"] = "function"
        function = {key: str(fn[key]) for key in ("name", "arguments") if fn.get(key) is not None}
        if streamed or function:
            delta["function"] = function
        out.append(delta)
    return tuple(out)


def choice_text(choice: dict[str, Any], chat: bool, streamed: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    inner = choice.get("delta" if streamed else "message") or {}
    return inner.get("content") or "" if isinstance(inner, dict) else ""


def logprobs_of(choice: dict[str, Any], chat: bool) -> list[TokenLogprob]:
    """The upstream's logprobs (chat's content list or the legacy columns) as Bastion's."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return []
    if chat:
        return [TokenLogprob(
            token=c["token"], bytes=_bytes(c), logprob=float(c["logprob"]),
            top=[(t["token"], _bytes(t), float(t["logprob"])) for t in c.get("top_logprobs") or []])
            for c in lp.get("content") or []]
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or []
    return [TokenLogprob(token=t, bytes=list(t.encode()), logprob=float(v or 0.0),
                         top=[(k, list(k.encode()), float(x)) for k, x in
                              ((tops[i] or {}) if i < len(tops) else {}).items()])
            for i, (t, v) in enumerate(zip(tokens, values))]


def _bytes(item: dict[str, Any]) -> list[int]:
    raw = item.get("bytes")
    return list(raw) if isinstance(raw, list) else list(str(item["token"]).encode())


def reported(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an upstream's usage object, if it has one."""
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        return usage["prompt_tokens"], int(usage.get("completion_tokens") or 0)
    return None


def split_completion(total: int, counted: dict[int, int]) -> dict[int, int]:
    """Each choice's completion tokens so that they add up to the upstream's total: the
    counted ones where they fit, the rest on the last choice."""
    out: dict[int, int] = {}
    left = total
    indexes = sorted(counted)
    for i in indexes[:-1]:
        out[i] = min(counted[i], left)
        left -= out[i]
    if indexes:
        out[indexes[-1]] = left
    return out


# What an upstream's error message may carry that is nobody's business but the operator's: its
# URLs, addresses, host:port names, file paths and tracebacks (vLLM and FastAPI put exception
# text into the message). A tenant sees the message with these cut out; the log keeps it whole.
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s*File \"", re.MULTILINE)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_ADDRESS = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?"
                      r"|\b[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*:\d{2,5}\b")
_PATH = re.compile(r"(?<![\w/.])(?:~|[A-Za-z]:)?(?:[/\\][\w.@+-]+){2,}[/\\]?")
MAX_MESSAGE = 1000


def scrubbed(message: str, hosts: tuple[str, ...] = ()) -> str | None:
    """An upstream's error message fit for the tenant, or None when nothing of it is (a
    traceback)."""
    if _TRACEBACK.search(message):
        return None
    text = _URL.sub("<url>", message)
    for host in hosts:
        if host:
            text = re.sub(re.escape(host) + r"(?::\d{1,5})?", "<upstream>", text,
                          flags=re.IGNORECASE)
    text = _ADDRESS.sub("<address>", text)
    text = _PATH.sub("<path>", text)
    text = " ".join(text.split())  # no multi-line dumps either
    return text[:MAX_MESSAGE] or None


def _for_log(message: str) -> str:
    """An upstream's message for the operator's log: whole, on one line, but of a traceback
    only its last line (the exception), so that this server's log never shows a traceback
    that is not its own."""
    if _TRACEBACK.search(message):
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        return f"{lines[-1][:2000] if lines else ''} (the upstream's traceback is left out)"
    return " ".join(message.split())[:2000]


def relayed(status: int, body: Any, name: str, hosts: tuple[str, ...] = ()) -> EngineError:
    """An upstream's error body (OpenAI's {"error": {...}}, vLLM's older flat
    {"object": "error", ...}, FastAPI's {"detail": ...}) as an engine error. 4xx are the
    client's to fix and keep their status, with the message scrubbed of the upstream's
    internals (URLs, `hosts`, addresses, paths, tracebacks); a refused key or an upstream
    failure is Bastion's (502), never shown to the client as its own 401, and its message stays
    in the log: the client learns only that the upstream failed."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(body, dict) and not isinstance(err, dict):
        err = body if "message" in body else {"message": body.get("detail") or body.get("error")}
    err = err if isinstance(err, dict) else {}
    message = err.get("message")
    message = message if isinstance(message, str) and message else None
    if status in (401, 403):
        log.error("the upstream of %s refused Bastion's credentials (HTTP %d)", name, status)
        return UpstreamFailure(f"The upstream server of '{name}' refused this server's "
                               f"credentials; the administrator must fix its api_key.")
    if status == 429 or status >= 500 or not 400 <= status < 500:
        log.warning("the upstream of %s failed (HTTP %d): %s", name, status,
                    _for_log(message or ""))
        return UpstreamFailure(f"The upstream server of '{name}' failed (HTTP {status}). "
                               f"Try again; if it goes on, tell the server's administrator.")
    code, param = err.get("code"), err.get("param")
    clean = scrubbed(message, hosts) if message else None
    if message and clean != message:
        log.info("the upstream of %s refused a request (HTTP %d): %s", name, status,
                 _for_log(message))
    return UpstreamRefused(clean or f"The upstream server of '{name}' refused the request "
                           f"(HTTP {status}).", status=status,
                           code=code[:64] if isinstance(code, str) else None,
                           param=param[:256] if isinstance(param, str) else None)


def answer_events(data: dict[str, Any], chat: bool, max_tokens: int, name: str) -> list[Event]:
    """A non-streamed answer as events: each choice's text, its finish, then the usage. Without
    a usage report each choice is billed its whole max_tokens (the reservation)."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise UpstreamFailure(f"The upstream server of '{name}' sent a response Bastion "
                              f"cannot read.")
    events: list[Event] = []
    finishes: dict[int, str] = {}
    try:
        for k, c in enumerate(choices):
            index = c.get("index", k)
            text, lps = choice_text(c, chat, streamed=False), logprobs_of(c, chat)
            calls = tool_call_deltas(c, streamed=False) if chat else ()
            if text or lps or calls:
                events.append(Delta(index=index, text=text, logprobs=lps, tool_calls=calls))
            finishes[index] = finish_reason(c.get("finish_reason"))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UpstreamFailure(f"The upstream server of '{name}' sent a response Bastion "
                              f"cannot read.") from None
    usage = reported(data.get("usage"))
    counts = (split_completion(usage[1], {i: 0 for i in finishes}) if usage
              else {i: max_tokens for i in finishes})
    events += [Finished(index=i, finish_reason=r, completion_tokens=counts[i])
               for i, r in finishes.items()]
    if usage:
        events.append(Usage(*usage))
    return events


async def stream_events(chunks: AsyncIterator[dict[str, Any]], chat: bool, name: str = ""
                        ) -> AsyncIterator[Event]:
    """A streamed answer as events. Each chunk with text counts as one token (vLLM and
    llama.cpp send one per token); the Finished events wait for the end of the stream, where
    the usage report comes, so that their counts add up to it."""
    counted: dict[int, int] = {}
    finishes: dict[int, str] = {}
    usage: tuple[int, int] | None = None
    async with aclosing(chunks) as stream:  # type: ignore[type-var]
        async for chunk in stream:
            usage = reported(chunk.get("usage")) or usage
            for k, c in enumerate(chunk.get("choices") or []):
                if not isinstance(c, dict):
                    continue
                index = c.get("index", k)
                text, lps = choice_text(c, chat, streamed=True), logprobs_of(c, chat)
                try:
                    calls = tool_call_deltas(c, streamed=True) if chat else ()
                except (TypeError, ValueError):
                    raise UpstreamFailure(f"The upstream server of '{name}' sent a tool call "
                                          f"Bastion cannot read.") from None
                counted.setdefault(index, 0)
                if text or lps or calls:
                    counted[index] += 1 if text or calls else 0
                    yield Delta(index=index, text=text, logprobs=lps,
                                n_tokens=1 if text or calls else 0, tool_calls=calls)
                if c.get("finish_reason"):
                    finishes[index] = finish_reason(c["finish_reason"])
    for index in counted:
        finishes.setdefault(index, "stop")
    counts = split_completion(usage[1], counted) if usage else counted
    for index in sorted(finishes):
        yield Finished(index=index, finish_reason=finishes[index],
                       completion_tokens=counts.get(index, 0))
    if usage:
        yield Usage(*usage)
