"""What admission, authentication and the ledger cost per request.

Why: limits must be cheap enough to leave on. The same server build runs twice, side by side,
and requests alternate between the two: once with limits on (a key with a requests-per-minute
limit in an organisation whose plan limits concurrency and tokens per hour) and once with
BASTION_RATE_LIMITS=false. With --baseline, another version's pair runs alongside and the four
alternate, so before and after see the same machine. Three endpoints are timed: GET /v1/models
(authentication and the rate-limit headers), POST /v1/embeddings of one token and POST
/v1/completions with max_tokens=1 (authentication, admission, settlement and a ledger row,
around a few ms of model). With --concurrency N, every server is loaded by N clients at once
instead of one request at a time; add --rounds K to load one server at a time instead, K rounds
in a rotating order, and compare admitted requests per second (200s per second of wall time)
round by round. In-process,
the limiter's admit (counting the request) + settle + headers is timed on its own too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ADMIN_KEY, MODEL, start_server, stop_server  # noqa: E402

from bastion.admission.limiter import Limiter  # noqa: E402
from bastion.tenancy.keys import Principal  # noqa: E402
from bastion.tenancy.plans import effective_limits  # noqa: E402


# A cheap endpoint without admission, the cheapest inference request (one token to embed:
# authentication, admission, settlement and a ledger row around a few ms of model), and a
# completion of one token (the same around a decode step).
ENDPOINTS = (
    ("GET /v1/models", "GET", "/models", None),
    ("POST /v1/embeddings, 1 token", "POST", "/embeddings",
     {"model": "all-minilm-l6-v2", "input": "hi"}),
    ("POST /v1/completions max_tokens=1", "POST", "/completions",
     {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "temperature": 0}),
)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def in_process(n: int, storage_url: str | None = None) -> dict[str, float]:
    """The limiter's own cost per inference request, without HTTP: its store calls (the count
    deferred into admission, then settlement: with Redis, two round trips) and the headers."""
    limiter = Limiter(storage_url)
    await limiter.start()
    p = Principal(key_id="k", org_id="o", permissions=frozenset({"inference"}), rate_limit=10**6,
                  limits=effective_limits("spark", {"concurrent_requests": 10**4,
                                                    "tokens_per_hour": 10**12}))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        quota = limiter.deferred(p)
        ticket = await limiter.admit(quota, 100)
        ticket.completion_tokens = 50
        await ticket.settle()
        limiter.headers(quota)
        times.append((time.perf_counter() - t) * 1e6)
    await limiter.close()
    return {"p50_us": pct(times, 50), "p99_us": pct(times, 99)}


async def timed(client: httpx.AsyncClient, method: str, path: str, body: dict | None,
                n: int, concurrency: int) -> dict[str, float]:
    lat: list[float] = []
    errors = 0

    async def worker(count: int) -> None:
        nonlocal errors
        for _ in range(count):
            t = time.perf_counter()
            r = await client.request(method, path, json=body)
            lat.append((time.perf_counter() - t) * 1000)
            errors += r.status_code != 200

    start = time.perf_counter()
    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"rps": len(lat) / wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "errors": errors}


async def interleaved(servers: dict[str, tuple[str, str]], method: str, path: str,
                      body: dict | None, n: int) -> dict[str, dict[str, float]]:
    """Alternate single requests between the servers, so that all see the same machine
    (this 2-core machine's speed drifts more between runs than admission costs)."""
    clients = {mode: httpx.AsyncClient(base_url=api, timeout=60,
                                       headers={"Authorization": f"Bearer {key}"})
               for mode, (api, key) in servers.items()}
    lat: dict[str, list[float]] = {mode: [] for mode in servers}
    errors = dict.fromkeys(servers, 0)
    try:
        for c in clients.values():
            await c.request(method, path, json=body)
        modes = list(clients)
        for i in range(n):
            # each round starts with the next server: the first request of a round runs on a
            # machine that has just been idle, and a fixed order biased the first server's rows
            for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
                c = clients[mode]
                t = time.perf_counter()
                r = await c.request(method, path, json=body)
                lat[mode].append((time.perf_counter() - t) * 1000)
                errors[mode] += r.status_code != 200
    finally:
        for c in clients.values():
            await c.aclose()
    return {mode: {"rps": 1000 / statistics.mean(xs), "p50_ms": pct(xs, 50),
                   "p99_ms": pct(xs, 99), "errors": errors[mode], "lat": xs}
            for mode, xs in lat.items()}


async def concurrent(servers: dict[str, tuple[str, str]], method: str, path: str,
                     body: dict | None, n: int, clients: int) -> dict[str, dict[str, float]]:
    """Every server under `clients` concurrent clients at once, each sending n // clients
    requests: the servers share the machine as the sequential mode's alternation makes them,
    and the limiter's store (Redis) is kept busy, as on a server with traffic, instead of
    being woken from idle for every request."""
    async def one(api: str, key: str) -> tuple[list[float], int, float]:
        lat: list[float] = []
        errors = 0
        async with httpx.AsyncClient(base_url=api, timeout=60,
                                     headers={"Authorization": f"Bearer {key}"},
                                     limits=httpx.Limits(max_connections=clients)) as c:
            await c.request(method, path, json=body)

            async def worker() -> None:
                nonlocal errors
                for _ in range(n // clients):
                    t = time.perf_counter()
                    r = await c.request(method, path, json=body)
                    lat.append((time.perf_counter() - t) * 1000)
                    errors += r.status_code != 200

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            return lat, errors, time.perf_counter() - start

    runs = await asyncio.gather(*(one(api, key) for api, key in servers.values()))
    return {mode: {"rps": len(lat) / wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                   "errors": errors, "lat": sorted(lat)}
            for mode, (lat, errors, wall) in zip(servers, runs)}


async def alternating(servers: dict[str, tuple[str, str]], method: str, path: str,
                      body: dict | None, n: int, clients: int,
                      rounds: int) -> dict[str, dict[str, Any]]:
    """One server at a time under `clients` concurrent clients (n requests in all), every
    server once per round, each round starting at the next server: the servers do not share
    the CPU with each other, and the machine's drift hits every server alike. Per server: the
    median of its rounds' admitted requests per second (200s ÷ the burst's wall time), their
    range, and each round's figure, so that two servers can be compared round by round."""
    conns = {mode: httpx.AsyncClient(base_url=api, timeout=60,
                                     headers={"Authorization": f"Bearer {key}"},
                                     limits=httpx.Limits(max_connections=clients))
             for mode, (api, key) in servers.items()}
    per_round: dict[str, list[float]] = {mode: [] for mode in servers}
    lat: dict[str, list[float]] = {mode: [] for mode in servers}
    errors = dict.fromkeys(servers, 0)

    async def burst(mode: str) -> None:
        c, admitted = conns[mode], 0

        async def worker() -> None:
            nonlocal admitted
            for _ in range(n // clients):
                t = time.perf_counter()
                try:
                    r = await c.request(method, path, json=body)
                except httpx.TransportError:  # e.g. a keep-alive connection the server had
                    errors[mode] += 1  # closed while it idled through the other servers' turns
                    continue
                lat[mode].append((time.perf_counter() - t) * 1000)
                admitted += r.status_code == 200
                errors[mode] += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        per_round[mode].append(admitted / (time.perf_counter() - start))

    try:
        for c in conns.values():  # warm-up, not timed: opens `clients` connections
            await asyncio.gather(*(c.request(method, path, json=body) for _ in range(clients)))
        modes = list(conns)
        for i in range(rounds):
            for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
                await burst(mode)
    finally:
        for c in conns.values():
            await c.aclose()
    return {mode: {"rps": statistics.median(xs), "rps_min": min(xs), "rps_max": max(xs),
                   "rounds": xs, "p50_ms": pct(lat[mode], 50), "p99_ms": pct(lat[mode], 99),
                   "errors": errors[mode], "lat": sorted(lat[mode])}
            for mode, xs in per_round.items()}


def ratio_line(a: dict[str, Any], b: dict[str, Any]) -> str:
    """a ÷ b round by round (the two ran within seconds of each other): median and range."""
    ratios = [x / y for x, y in zip(a["rounds"], b["rounds"])]
    return (f"per-round ratio median {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} rounds)")


def paired(on: list[float], off: list[float], servers: int) -> float:
    """Limits on minus off within each round (they ran back to back, so this drifts less with
    the machine than a difference of medians), as the median per order of the round, averaged
    over the orders. Why per order: a request that follows one to the same server is faster
    than one that follows another server's (by about 0.3 ms for an embedding and 3 ms for a
    completion here: caches), and rounds rotate their order, so every other round one of the
    pair had that advantage. The median of all the differences then fell between two humps
    (completions: +1.26 and +1.58 ms, where the two orders gave -2.22 and +3.48, so +0.63)."""
    groups: dict[int, list[float]] = {}
    for i, (x, y) in enumerate(zip(on, off)):
        groups.setdefault(i % servers, []).append(x - y)
    return statistics.mean(pct(g, 50) for g in groups.values())


def limited_key(api: str) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    org = httpx.post(f"{api}/organizations", headers=admin,
                     json={"name": "bench", "plan": "spark"}).json()["id"]
    httpx.patch(f"{api}/organizations/{org}", headers=admin,
                json={"limits": {"concurrent_requests": 10**4, "tokens_per_hour": 10**12}})
    return httpx.post(f"{api}/organizations/{org}/api-keys", headers=admin,
                      json={"name": "bench", "permissions": ["inference"],
                            "rate_limit": 10**6}).json()["key"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--redis", action="store_true",
                    help="limits in a redis-server started for the run (default: in memory)")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="clients per server; above 1 all servers are loaded at once "
                         "(default 1: one request at a time, alternating between servers)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="with --concurrency: load one server at a time, this many rounds in a "
                         "rotating order, and report the median of the rounds' admitted req/s "
                         "(default 0: all servers loaded at once, one round)")
    ap.add_argument("--only-on", action="store_true",
                    help="start no limits-off servers (comparing versions with limits on only)")
    ap.add_argument("--endpoints", default="models,embeddings,completions",
                    help="which endpoints to time, comma-separated (default: all three)")
    ap.add_argument("--baseline", type=Path, metavar="SRC",
                    help="also run another version's servers (its src/ directory, e.g. from "
                         "`git archive <commit> src | tar -x -C /tmp/base`), limits on and off, "
                         "interleaved with this version's in the same run")
    args = ap.parse_args()
    wanted = args.endpoints.split(",")
    endpoints = [e for e in ENDPOINTS if e[2].strip("/") in wanted]
    results: dict[str, dict] = {}
    ip = asyncio.run(in_process(20_000))
    with tempfile.TemporaryDirectory() as tmp:
        redis = None
        on_env: dict[str, str] = {}
        if args.redis:
            from test_redis_limits import start_redis

            redis, url = start_redis(Path(tmp))
            on_env = {"BASTION_REDIS_URL": url}
            ip_redis = asyncio.run(in_process(5_000, url))
        versions = {"": {}}
        if args.baseline:
            versions["before: "] = {"PYTHONPATH": str(args.baseline.resolve())}
        started = {}
        for version, env in versions.items():
            started[f"{version}limits on"] = start_server(
                Path(tmp) / f"{version}on", "--parallel", "8", env={**env, **on_env},
                embeddings=True)
            if not args.only_on:
                started[f"{version}limits off"] = start_server(
                    Path(tmp) / f"{version}off", "--parallel", "8",
                    env={**env, "BASTION_RATE_LIMITS": "false"}, embeddings=True)
        try:
            servers = {mode: (srv.api, limited_key(srv.api)) for mode, srv in started.items()}
            for name, method, path, body in endpoints:
                if args.concurrency == 1:
                    run = interleaved(servers, method, path, body, args.requests)
                elif args.rounds:
                    run = alternating(servers, method, path, body, args.requests,
                                      args.concurrency, args.rounds)
                else:
                    run = concurrent(servers, method, path, body, args.requests,
                                     args.concurrency)
                for mode, row in asyncio.run(run).items():
                    results[f"{name}, {mode}"] = row
        finally:
            for srv in started.values():
                stop_server(srv)
            if redis is not None:
                redis.terminate()
                redis.wait(10)
    storage = "Redis storage (redis-server on loopback)" if args.redis else "memory storage"
    how = (f"{args.requests} sequential requests per row, alternating between the "
           f"{len(started)} servers" if args.concurrency == 1 else
           f"{args.requests} requests per row from {args.concurrency} concurrent clients per "
           f"server, all {len(started)} servers loaded at once" if not args.rounds else
           f"{args.rounds} rounds of {args.requests} requests from {args.concurrency} concurrent "
           f"clients per server and round, one server at a time in a rotating order; req/s is "
           f"the median of the rounds' admitted requests per second (min-max in brackets)")
    print(f"{os.cpu_count()} CPUs, {how}; {storage}\n")
    print("| endpoint, mode | req/s | p50 ms | p99 ms | errors |\n|---|---:|---:|---:|---:|")
    for name, r in results.items():
        rps = f"{r['rps']:.0f}" + (f" ({r['rps_min']:.0f}-{r['rps_max']:.0f})"
                                   if "rounds" in r else "")
        print(f"| {name} | {rps} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |")
    print(f"\nin-process Limiter.admit (counting) + settle + headers (memory): p50 {ip['p50_us']:.1f} µs, "
          f"p99 {ip['p99_us']:.1f} µs")
    if args.redis:
        print(f"in-process Limiter.admit (counting) + settle + headers (Redis): "
              f"p50 {ip_redis['p50_us']:.1f} µs, p99 {ip_redis['p99_us']:.1f} µs")
    for version in versions if not args.only_on else ():
        for name, *_ in endpoints:
            a = results[f"{name}, {version}limits on"]
            b = results[f"{name}, {version}limits off"]
            line = (f"{version}added by limits, {name}: p50 {a['p50_ms'] - b['p50_ms']:+.2f} ms, "
                    f"p99 {a['p99_ms'] - b['p99_ms']:+.2f} ms")
            if args.concurrency == 1:
                balanced = paired(a["lat"], b["lat"], len(started))
                line += f"; paired, order-balanced {balanced:+.2f} ms"
            else:
                line += f"; req/s {a['rps'] / b['rps'] - 1:+.1%}"
                if "rounds" in a:
                    line += f"; on/off {ratio_line(a, b)}"
            print(line)
    if args.baseline and args.rounds:
        for name, *_ in endpoints:
            for mode in ("limits on",) if args.only_on else ("limits on", "limits off"):
                a, b = results[f"{name}, {mode}"], results[f"{name}, before: {mode}"]
                print(f"this ÷ before, {name}, {mode}: admitted req/s {a['rps']:.1f} ÷ "
                      f"{b['rps']:.1f} = {a['rps'] / b['rps']:.3f}; {ratio_line(a, b)}")


if __name__ == "__main__":
    main()
