"""Soak: a real Bastion server holds 1,000 idle clients for 10 minutes beside a steady load,
then must be back to where it started once they leave.

Why: leaks show only over time and under many open connections: memory that grows with every
request or socket, a concurrency slot or an engine sequence that one way of ending a request
never gives back, a token reservation that is never settled. Issue 15's bar: RssAnon (the
server's process tree, from /proc/<pid>/status: the heap, not the mapped model files) grows
less than 5 % from the end of warm-up to the end of the run; no slot leaked; the tokens/hour
counters equal the ledger exactly once all clients have left.

What runs (see bench/README.md, "Soak"):
- idle clients, connected at --connect-rate per second and held for the whole run:
  * --sse (500) stalled SSE readers: each opens a streaming chat completion (--sse-max-tokens
    tokens) on a raw socket with a small receive buffer, reads one chunk of it every
    --sse-read-every seconds on average (each stream its own pace, 0.25 to 1.75 times that, so
    that streams end spread over the run), and opens the next when it ends;
  * --ws (500) idle WebSockets on /v1/ws: authenticate with {"type": "auth"}, send one tiny
    non-streaming inference (max_tokens 1), then only an application ping every
    --ws-ping-every seconds (the client library answers the server's protocol pings);
- --load (4) clients sending chat completions back to back with --load-max-tokens, each
  rotating through HTTP streaming, HTTP JSON, WebSocket streaming and WebSocket JSON.

Tenants: the clients are spread round-robin over --orgs (10) organisations made through the
admin API at start, one inference key each (on the `seed` plan with two overrides: 1,000
concurrent requests, so that the plan never refuses the idle clients, and 10^12 tokens per
hour, so that the tokens/hour counter is kept (a plan without one counts nothing) but never
refuses; each key 100,000 requests per minute, so that that window is counted too). The
limits are counted as for any tenant; they only never bind.

After the run every client closes its connection; after --settle seconds the script polls
/metrics until the server is idle and checks: no request in flight, no concurrency slot held,
no engine sequence running or waiting, no WebSocket open, the ledger's queue empty; and for
every organisation, the limiter's tokens in the current window (x-ratelimit-limit-tokens minus
x-ratelimit-remaining-tokens on its key's GET /v1/usage) equals the ledger's prompt +
completion tokens for that organisation (the same response's body).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import resource
import signal
import socket
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import httpx
import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import ADMIN_KEY, RESULTS_DIR, Monitor, Server, running  # noqa: E402

MODEL = "smollm2-135m-instruct"
BAR_PCT = 5.0
LOAD_MODES = ("http_stream", "http_json", "ws_stream", "ws_json")
QUESTIONS = ("Name three colours.", "What is a harbour?", "Say hello politely.",
             "Give one fact about the moon.", "What do bees make?", "Name a large river.")


# --- bookkeeping ---------------------------------------------------------------------------------
@dataclass
class Tally:
    """Requests by kind, how they ended, and the tokens their usage reported."""

    requests: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # "<kind>: <what>"
    prompt_tokens: Counter[str] = field(default_factory=Counter)
    completion_tokens: Counter[str] = field(default_factory=Counter)
    left_open: Counter[str] = field(default_factory=Counter)  # cut short when clients left
    first_error: dict[str, str] = field(default_factory=dict)

    def error(self, kind: str, what: str, detail: str = "") -> None:
        name = f"{kind}: {what}"
        self.errors[name] += 1
        self.first_error.setdefault(name, detail[:300])

    def usage(self, kind: str, usage: dict[str, Any] | None) -> None:
        if usage:
            self.prompt_tokens[kind] += usage.get("prompt_tokens", 0)
            self.completion_tokens[kind] += usage.get("completion_tokens", 0)


@dataclass
class State:
    """Who is connected now, and who has connected at least once."""

    sse_open: int = 0
    ws_open: int = 0
    sse_seen: set[int] = field(default_factory=set)
    ws_seen: set[int] = field(default_factory=set)


@dataclass
class Tenant:
    org_id: str
    key_id: str
    key: str


def rss_anon_kib(pid: int) -> tuple[int, int]:
    """RssAnon summed over the process and its children (KiB), and how many processes."""
    try:
        pids = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        pids = [pid]
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass  # a child that just exited
    return total, len(pids)


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise this process's open-file limit (the server inherits it) to `needed` if the hard
    limit allows; returns the (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        print(f"WARNING: open files limited to {soft}, the run needs about {needed}",
              file=sys.stderr)
    return soft, hard


# --- tenants ---------------------------------------------------------------------------------
async def make_tenants(admin: httpx.AsyncClient, n: int, stamp: str) -> list[Tenant]:
    out = []
    for i in range(n):
        r = await admin.post("/v1/organizations", json={"name": f"soak-{stamp}-{i}", "plan": "seed"})
        r.raise_for_status()
        org = r.json()["id"]
        r = await admin.patch(f"/v1/organizations/{org}", json={"limits": {
            "concurrent_requests": 1000, "tokens_per_hour": 10**12}})
        r.raise_for_status()
        r = await admin.post(f"/v1/organizations/{org}/api-keys", json={
            "name": f"soak-{i}", "permissions": ["inference"], "rate_limit": 100_000})
        r.raise_for_status()
        key = r.json()
        out.append(Tenant(org, key["id"], key["key"]))
    return out


# --- stalled SSE readers -------------------------------------------------------------------------
async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    line = await reader.readline()
    if not line:
        raise ConnectionError("closed before the response's status line")
    status = int(line.split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]
                      ) -> AsyncIterator[bytes]:
    """The body, one HTTP chunk at a time (readexactly: not bounded by the reader's limit)."""
    if "chunked" not in headers.get("transfer-encoding", ""):
        n = int(headers.get("content-length", "0"))
        if n:
            yield await reader.readexactly(n)
        return
    while True:
        size_line = await reader.readline()
        if not size_line:
            raise asyncio.IncompleteReadError(b"", None)
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()  # the empty trailer
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def sse_client(i: int, host: str, port: int, tenant: Tenant, args: argparse.Namespace,
                     tally: Tally, state: State) -> None:
    """Open a streaming chat completion, read it one chunk per --sse-read-every seconds (a
    reader that stalls, holding its connection), then open the next; until cancelled."""
    for n in itertools.count():
        body = json.dumps({
            "model": MODEL, "max_tokens": args.sse_max_tokens, "temperature": 0.7,
            "seed": i * 100_000 + n, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": QUESTIONS[(i + n) % len(QUESTIONS)]}]},
            separators=(",", ":")).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Authorization: Bearer {tenant.key}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        writer: asyncio.StreamWriter | None = None
        opened = False
        tally.requests["sse"] += 1
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=4096)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            writer.write(head + body)
            await writer.drain()
            status, headers = await read_head(reader)
            if status != 200:
                text = b"".join([c async for c in body_chunks(reader, headers)])
                tally.error("sse", f"HTTP {status}", text.decode(errors="replace"))
                await asyncio.sleep(5 + random.random() * 5)
                continue
            state.sse_open += 1
            opened = True
            state.sse_seen.add(i)
            # each stream its own pace (0.25 to 1.75 x --sse-read-every), so that the streams
            # end, and their readers open the next, spread over the run instead of in waves
            pace = args.sse_read_every * random.uniform(0.25, 1.75)
            buf, usage, done, failed = b"", None, False, None
            async for data in body_chunks(reader, headers):
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            continue
                        chunk = json.loads(payload)
                        if "error" in chunk:
                            failed = json.dumps(chunk["error"])[:300]
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                await asyncio.sleep(pace)  # the stall: the rest waits unread
            tally.usage("sse", usage)
            if failed:
                tally.error("sse", "error event in the stream", failed)
            elif not done:
                tally.error("sse", "stream ended without [DONE]")
            else:
                tally.ok["sse"] += 1
        except asyncio.CancelledError:
            if opened:
                tally.left_open["sse"] += 1
            raise
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            tally.error("sse", type(exc).__name__, str(exc))
            await asyncio.sleep(2 + random.random() * 3)
        finally:
            if opened:
                state.sse_open -= 1
            if writer is not None:
                writer.close()


# --- idle WebSockets -----------------------------------------------------------------------------
async def recv_json(ws: ClientConnection, timeout: float) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def ws_open(url: str, key: str) -> ClientConnection:
    ws = await connect(url, proxy=None, open_timeout=120, ping_interval=20, ping_timeout=120,
                       close_timeout=5, max_size=2**22)
    await ws.send(json.dumps({"type": "auth", "api_key": key}))
    reply = await recv_json(ws, 120)
    if reply.get("type") != "authenticated":
        await ws.close()
        raise RuntimeError(f"auth failed: {json.dumps(reply)[:200]}")
    return ws


async def ws_inference(ws: ClientConnection, rid: str, body: dict[str, Any],
                       timeout: float) -> dict[str, Any]:
    """Send one inference; its `done` or `error` message (token messages are skipped)."""
    await ws.send(json.dumps({"type": "inference", "id": rid, **body}))
    while True:
        m = await recv_json(ws, timeout)
        if m.get("id") == rid and m.get("type") in ("done", "error"):
            return m


async def ws_client(i: int, url: str, tenant: Tenant, args: argparse.Namespace, tally: Tally,
                    state: State) -> None:
    """Authenticate, one tiny request, then idle with an application ping now and then;
    reconnect if the socket closes."""
    first = True
    while True:
        ws: ClientConnection | None = None
        try:
            ws = await ws_open(url, tenant.key)
            state.ws_open += 1
            state.ws_seen.add(i)
            if first and args.ws_first_request:
                first = False
                tally.requests["ws_first"] += 1
                m = await ws_inference(ws, "first", {
                    "model": MODEL, "max_tokens": 1, "stream": False,
                    "messages": [{"role": "user", "content": "Hi"}]}, 600)
                if m["type"] == "done":
                    tally.ok["ws_first"] += 1
                    tally.usage("ws_first", m.get("usage"))
                else:
                    tally.error("ws_first", m.get("error", {}).get("code") or "error",
                                json.dumps(m)[:300])
            for n in itertools.count():
                await asyncio.sleep(args.ws_ping_every * (0.5 + random.random()))
                await ws.send(json.dumps({"type": "ping", "id": n}))
                m = await recv_json(ws, 120)
                if m.get("type") != "pong":
                    tally.error("ws_idle", "not a pong", json.dumps(m)[:300])
        except asyncio.CancelledError:
            raise
        except (ConnectionClosed, InvalidHandshake, OSError, asyncio.TimeoutError,
                RuntimeError) as exc:
            tally.error("ws_idle", type(exc).__name__, str(exc))
            await asyncio.sleep(2 + random.random() * 3)
        finally:
            if ws is not None:
                state.ws_open -= 1
                await ws.close()


# --- steady load ---------------------------------------------------------------------------------
async def load_client(k: int, base: str, tenant: Tenant, args: argparse.Namespace,
                      tally: Tally) -> None:
    """Back to back, rotating HTTP streaming / JSON and WebSocket streaming / JSON."""
    url = base.replace("http://", "ws://") + "/v1/ws"
    ws: ClientConnection | None = None
    async with httpx.AsyncClient(base_url=base, timeout=600, trust_env=False,
                                 headers={"Authorization": f"Bearer {tenant.key}"}) as client:
        try:
            for n in itertools.count():
                mode = LOAD_MODES[(k + n) % len(LOAD_MODES)]
                body = {"model": MODEL, "max_tokens": args.load_max_tokens, "temperature": 0.8,
                        "seed": k * 1_000_000 + n, "messages": [
                            {"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}]}
                tally.requests[mode] += 1
                try:
                    if mode.startswith("ws"):
                        if ws is None:
                            ws = await ws_open(url, tenant.key)
                        m = await ws_inference(ws, str(n), {**body,
                                                            "stream": mode == "ws_stream"}, 600)
                        if m["type"] != "done":
                            tally.error(mode, m.get("error", {}).get("code") or "error",
                                        json.dumps(m)[:300])
                            continue
                        usage = m.get("usage")
                    elif mode == "http_json":
                        r = await client.post("/v1/chat/completions", json=body)
                        if r.status_code != 200:
                            tally.error(mode, f"HTTP {r.status_code}", r.text)
                            continue
                        usage = r.json().get("usage")
                    else:
                        usage, done, failed = None, False, None
                        async with client.stream("POST", "/v1/chat/completions", json={
                                **body, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
                            if r.status_code != 200:
                                tally.error(mode, f"HTTP {r.status_code}",
                                            (await r.aread()).decode(errors="replace"))
                                continue
                            async for line in r.aiter_lines():
                                data = line[5:].strip() if line.startswith("data:") else ""
                                if data == "[DONE]":
                                    done = True
                                elif data:
                                    chunk = json.loads(data)
                                    failed = failed or chunk.get("error")
                                    usage = chunk.get("usage") or usage
                        if failed or not done:
                            tally.error(mode, "error event" if failed else "no [DONE]",
                                        json.dumps(failed)[:300])
                            continue
                    tally.ok[mode] += 1
                    tally.usage(mode, usage)
                except asyncio.CancelledError:
                    tally.left_open[mode] += 1
                    raise
                except (httpx.HTTPError, ConnectionClosed, InvalidHandshake, OSError,
                        asyncio.TimeoutError, RuntimeError, ValueError) as exc:
                    tally.error(mode, type(exc).__name__, str(exc))
                    if ws is not None and mode.startswith("ws"):
                        await ws.close()
                        ws = None
                    await asyncio.sleep(1)
        finally:
            if ws is not None:
                await ws.close()


# --- the server's state --------------------------------------------------------------------------
METRIC = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels as written)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and (m := METRIC.match(line)):
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def idle_problems(metrics: dict[str, float]) -> list[str]:
    """What is not back to zero: requests, slots, sequences, sockets, unwritten ledger rows."""
    watched = ("bastion_requests_in_flight", "bastion_concurrency_slots_held",
               "bastion_websocket_connections", "bastion_usage_ledger_queue_depth",
               "vllm:num_requests_running", "vllm:num_requests_waiting")
    problems = [f"{name} = {v:g}" for name, v in metrics.items()
                if name.split("{")[0] in watched and v != 0]
    for name in watched[:3]:  # the gauges this check needs must exist
        if name not in metrics:
            problems.append(f"{name} missing from /metrics")
    return problems


async def wait_idle(admin: httpx.AsyncClient, timeout: float) -> tuple[dict[str, float], list[str], float]:
    """Poll /metrics until nothing is in flight (or the timeout): (metrics, problems, seconds)."""
    t0 = time.monotonic()
    while True:
        metrics = parse_metrics((await admin.get("/metrics")).text)
        problems = idle_problems(metrics)
        if not problems or time.monotonic() - t0 > timeout:
            return metrics, problems, time.monotonic() - t0
        await asyncio.sleep(1)


async def token_counters(base: str, tenants: list[Tenant], since: int) -> list[dict[str, Any]]:
    """Per organisation: the limiter's tokens in its window against the ledger's tokens."""
    rows = []
    for t in tenants:
        async with httpx.AsyncClient(base_url=base, timeout=60, trust_env=False,
                                     headers={"Authorization": f"Bearer {t.key}"}) as c:
            r = await c.get("/v1/usage", params={"start_time": since})
        r.raise_for_status()
        total = r.json()["total"]
        limit = int(r.headers["x-ratelimit-limit-tokens"])
        limiter = limit - int(r.headers["x-ratelimit-remaining-tokens"])
        ledger = total["prompt_tokens"] + total["completion_tokens"]
        rows.append({"org_id": t.org_id, "limiter_tokens": limiter, "ledger_tokens": ledger,
                     "ledger_requests": total["requests"], "exact": limiter == ledger})
    return rows


# --- the run -------------------------------------------------------------------------------------
async def soak(base: str, pid: int, args: argparse.Namespace, stamp: str) -> dict[str, Any]:
    split = urlsplit(base)
    host, port = split.hostname or "127.0.0.1", split.port or 80
    ws_url = base.replace("http://", "ws://") + "/v1/ws"
    tally, state = Tally(), State()
    samples: list[dict[str, Any]] = []
    admin = httpx.AsyncClient(base_url=base, timeout=120, trust_env=False,
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    since = int(time.time()) - 1
    tenants = await make_tenants(admin, args.orgs, stamp)
    t0 = time.monotonic()

    def sample(phase: str) -> dict[str, Any]:
        kib, procs = rss_anon_kib(pid)
        s = {"t_s": round(time.monotonic() - t0, 1), "phase": phase,
             "rss_anon_mib": round(kib / 1024, 1), "processes": procs,
             "sse_open": state.sse_open, "ws_open": state.ws_open,
             "requests": sum(tally.requests.values())}
        samples.append(s)
        return s

    phase = "warm-up"

    async def sampler() -> None:
        while True:
            sample(phase)
            await asyncio.sleep(args.sample_every)

    sample("before clients")
    monitor = Monitor(pid, interval=args.sample_every)  # other processes' share of the CPU
    monitor.start()
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(sampler())]
    load = [asyncio.create_task(load_client(k, base, tenants[k % len(tenants)], args, tally))
            for k in range(args.load)]
    idle: list[asyncio.Task[None]] = []
    kinds = ["sse"] * args.sse + ["ws"] * args.ws
    random.Random(0).shuffle(kinds)  # connect both kinds together
    sse_i = ws_i = 0
    for n, kind in enumerate(kinds):
        tenant = tenants[n % len(tenants)]
        if kind == "sse":
            idle.append(asyncio.create_task(sse_client(sse_i, host, port, tenant, args, tally,
                                                       state)))
            sse_i += 1
        else:
            idle.append(asyncio.create_task(ws_client(ws_i, ws_url, tenant, args, tally, state)))
            ws_i += 1
        await asyncio.sleep(1 / args.connect_rate)
    print(f"[soak] {len(idle)} idle clients started in {time.monotonic() - t0:.0f}s",
          file=sys.stderr)

    # warm-up ends at --warmup-minutes, once every idle client has connected at least once
    warm_deadline = t0 + args.warmup_minutes * 60
    while (time.monotonic() < warm_deadline or len(state.sse_seen) < args.sse
           or len(state.ws_seen) < args.ws):
        if time.monotonic() > t0 + args.minutes * 60 / 2:
            print("WARNING: not every idle client connected in the first half of the run; "
                  "warm-up ends anyway", file=sys.stderr)
            break
        await asyncio.sleep(1)
    phase = "soak"
    warm = sample("end of warm-up")
    print(f"[soak] warm-up over at {warm['t_s']:.0f}s: RssAnon {warm['rss_anon_mib']:.0f} MiB, "
          f"{state.sse_open} SSE + {state.ws_open} WS open", file=sys.stderr)
    end_at = t0 + args.minutes * 60
    next_report = time.monotonic() + 60
    while (now := time.monotonic()) < end_at:
        await asyncio.sleep(min(1.0, end_at - now))
        if time.monotonic() >= next_report:
            next_report += 60
            s = samples[-1]
            print(f"[soak] {s['t_s']:.0f}s: RssAnon {s['rss_anon_mib']:.0f} MiB, "
                  f"{s['sse_open']} SSE + {s['ws_open']} WS open, {s['requests']} requests, "
                  f"{sum(tally.errors.values())} errors", file=sys.stderr)
    end = sample("end")
    phase = "leaving"
    held = {"sse": state.sse_open, "ws": state.ws_open}
    for task in [*load, *idle]:
        task.cancel()
    await asyncio.gather(*load, *idle, return_exceptions=True)
    await asyncio.sleep(args.settle)
    metrics, problems, waited = await wait_idle(admin, args.idle_timeout)
    health = (await admin.get("/health")).json().get("models", {})
    engines = {m: {k: v for k, v in s.items() if k in ("running_sequences", "waiting_requests",
                                                       "slots")} for m, s in health.items()}
    for m, s in engines.items():
        if s.get("running_sequences") or s.get("waiting_requests"):
            problems.append(f"/health: {m} {s}")
    counters = await token_counters(base, tenants, since)
    after = sample("after clients left")
    tasks[0].cancel()
    _, other_cpu = monitor.stop()
    await admin.aclose()

    soak_samples = [s for s in samples if s["phase"] in ("end of warm-up", "soak", "end")]
    slope = None
    if len(soak_samples) >= 3:
        xs = [s["t_s"] / 60 for s in soak_samples]
        ys = [s["rss_anon_mib"] for s in soak_samples]
        slope = statistics.linear_regression(xs, ys).slope
    growth = (end["rss_anon_mib"] - warm["rss_anon_mib"]) / warm["rss_anon_mib"] * 100
    return {
        "rss_anon_mib": {"before_clients": samples[0]["rss_anon_mib"],
                         "warm": warm["rss_anon_mib"], "warm_at_s": warm["t_s"],
                         "end": end["rss_anon_mib"], "end_at_s": end["t_s"],
                         "peak": max(s["rss_anon_mib"] for s in soak_samples),
                         "after_leaving": after["rss_anon_mib"], "growth_pct": growth,
                         "slope_mib_per_min": slope, "pass": growth < BAR_PCT},
        "held_at_end": held, "other_cpu_pct": other_cpu,
        "tally": {k: dict(v) if isinstance(v, Counter) else v
                  for k, v in tally.__dict__.items()},
        "idle_check": {"problems": problems, "waited_s": waited, "engines": engines,
                       "gauges": {k: v for k, v in metrics.items() if k.split("{")[0] in (
                           "bastion_requests_in_flight", "bastion_concurrency_slots_held",
                           "bastion_websocket_connections", "bastion_usage_ledger_queue_depth",
                           "vllm:num_requests_running", "vllm:num_requests_waiting")},
                       "pass": not problems},
        "token_counters": counters,
        "tokens_pass": all(r["exact"] for r in counters),
        "samples": samples,
    }


# --- the report ----------------------------------------------------------------------------------
def render(r: dict[str, Any], meta: dict[str, Any]) -> str:
    rss, t, idle = r["rss_anon_mib"], r["tally"], r["idle_check"]
    kinds = sorted(t["requests"], key=lambda k: (k not in ("sse", "ws_first"), k))
    errors = sum(t["errors"].values())
    prompt, completion = sum(t["prompt_tokens"].values()), sum(t["completion_tokens"].values())
    exact = sum(c["exact"] for c in r["token_counters"])
    ok = "PASS" if rss["pass"] else "FAIL"
    slope = "-" if rss["slope_mib_per_min"] is None else f"{rss['slope_mib_per_min']:+.2f}"
    lines = [
        f"# Soak, {meta['timestamp']}", "",
        f"{meta['cpus']} CPUs, {meta['minutes']} min, {MODEL}; idle: {meta['sse']} stalled SSE "
        f"readers + {meta['ws']} idle WebSockets over {meta['orgs']} organisations (held at the "
        f"end: {r['held_at_end']['sse']} SSE + {r['held_at_end']['ws']} WS); load: "
        f"{meta['load']} clients, max_tokens {meta['load_max_tokens']}. Other processes used "
        f"{r['other_cpu_pct']:.0f} % of the CPU.", "",
        "| measure | value |", "|---|---|",
        f"| RssAnon before clients | {rss['before_clients']:.0f} MiB |",
        f"| RssAnon at end of warm-up ({rss['warm_at_s']:.0f} s) | {rss['warm']:.0f} MiB |",
        f"| RssAnon at end ({rss['end_at_s']:.0f} s) | {rss['end']:.0f} MiB |",
        f"| growth warm-up → end (bar < {BAR_PCT:g} %) | {rss['growth_pct']:+.1f} % {ok} |",
        f"| slope after warm-up (least squares) | {slope} MiB/min |",
        f"| peak RssAnon during the soak | {rss['peak']:.0f} MiB |",
        f"| RssAnon after clients left | {rss['after_leaving']:.0f} MiB |",
        f"| requests | {sum(t['requests'].values())} |",
        f"| errors | {errors} |",
        f"| tokens (prompt + completion, as reported) | {prompt} + {completion} |",
        f"| idle after clients left ({idle['waited_s']:.0f} s) | "
        f"{'PASS' if idle['pass'] else 'FAIL: ' + '; '.join(idle['problems'])} |",
        f"| tokens/hour counters = ledger | {exact}/{len(r['token_counters'])} organisations "
        f"{'PASS' if r['tokens_pass'] else 'FAIL'} |", "",
        "| kind | requests | ok | errors | cut short at the end | prompt tokens | "
        "completion tokens |", "|---|---:|---:|---:|---:|---:|---:|"]
    for k in kinds:
        errs = sum(v for e, v in t["errors"].items() if e.startswith(k + ":"))
        lines.append(f"| {k} | {t['requests'][k]} | {t['ok'].get(k, 0)} | {errs} | "
                     f"{t['left_open'].get(k, 0)} | {t['prompt_tokens'].get(k, 0)} | "
                     f"{t['completion_tokens'].get(k, 0)} |")
    if t["errors"]:
        lines += ["", "| error | count | first |", "|---|---:|---|"]
        for e, v in sorted(t["errors"].items(), key=lambda kv: -kv[1]):
            first = t["first_error"].get(e, "").replace("|", "\\|").replace("\n", " ")[:160]
            lines.append(f"| {e} | {v} | {first} |")
    lines += ["", "| organisation | limiter tokens | ledger tokens | ledger requests | exact |",
              "|---|---:|---:|---:|---|"]
    for c in r["token_counters"]:
        lines.append(f"| {c['org_id']} | {c['limiter_tokens']} | {c['ledger_tokens']} | "
                     f"{c['ledger_requests']} | {'yes' if c['exact'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="the whole run, warm-up included")
    p.add_argument("--warmup-minutes", type=float, default=1.0,
                   help="RssAnon's baseline is taken after this, once every idle client is in")
    p.add_argument("--sse", type=int, default=500, help="stalled SSE readers")
    p.add_argument("--ws", type=int, default=500, help="idle WebSockets")
    p.add_argument("--load", type=int, default=4, help="clients of the steady load")
    p.add_argument("--orgs", type=int, default=10, help="organisations the clients spread over")
    p.add_argument("--sse-max-tokens", type=int, default=8)
    p.add_argument("--sse-read-every", type=float, default=40.0,
                   help="mean seconds a stalled reader waits between two chunks it reads (a "
                        "stream of 8 tokens is 12 chunks: about 8 minutes)")
    p.add_argument("--ws-ping-every", type=float, default=30.0,
                   help="mean seconds between an idle socket's application pings")
    p.add_argument("--no-ws-first-request", dest="ws_first_request", action="store_false",
                   help="idle sockets send no inference at all")
    p.add_argument("--load-max-tokens", type=int, default=16)
    p.add_argument("--connect-rate", type=float, default=25.0,
                   help="idle clients started per second")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds to wait after every client has left, before the checks")
    p.add_argument("--idle-timeout", type=float, default=60.0,
                   help="longest wait for the server to be idle after the settle time")
    p.add_argument("--data-dir", type=Path, default=Path.home() / ".cache" / "bastion-soak")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="llama.cpp threads; default half the CPUs: the 1,000 clients need a "
                        "core, and llama.cpp's spinning threads crawl on an oversubscribed one")
    p.add_argument("--start-timeout", type=float, default=300.0)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped
    nofile = raise_nofile(2 * (args.sse + args.ws + args.load) + 1024)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    server = Server("bastion-soak", [
        sys.executable, "-m", "bastion.cli", "serve", "--port", "{port}",
        "--data-dir", str(args.data_dir), "--threads", str(args.threads)],
        {"BASTION_ADMIN_KEY": ADMIN_KEY, "BASTION_DRAIN_TIMEOUT": "5"}, "/health",
        {"Authorization": f"Bearer {ADMIN_KEY}"}, MODEL)
    log_path = args.data_dir / "logs" / stamp / f"{server.name}.log"
    with running(server, log_path, args.start_timeout) as (base, pid):
        result = asyncio.run(soak(base, pid, args, stamp))
    log_text = log_path.read_text(errors="replace")
    result["log"] = {"path": str(log_path), "tracebacks": log_text.count("Traceback"),
                     "errors": len(re.findall(r"^ERROR", log_text, re.M))}
    meta = {"timestamp": stamp, "cpus": os.cpu_count(), "nofile": nofile,
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    table = render(result, meta)
    table += (f"\nServer log: {result['log']['tracebacks']} tracebacks, "
              f"{result['log']['errors']} ERROR lines ({log_path}).\n")
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"soak-{stamp}.md").write_text(table)
    (RESULTS_DIR / f"soak-{stamp}.json").write_text(
        json.dumps({"meta": meta, "results": result}, indent=2))
    print(f"wrote {RESULTS_DIR}/soak-{stamp}.md and .json", file=sys.stderr)
    ok = result["rss_anon_mib"]["pass"] and result["idle_check"]["pass"] and result["tokens_pass"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the server was already stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
