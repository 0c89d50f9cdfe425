"""Serving benchmark: Bastion vs llama_cpp.server on the bundled Gemma 3 270M.

Both servers get the same streaming /v1/completions load at several concurrency levels, one
server after the other so they never compete for the CPU. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

ADMIN_KEY = "sk-bench-local-admin-key"  # loopback only; not a secret
BASTION_MODEL = "gemma-3-270m"
PROMPTS = ("Once upon a time", "The history of the city began", "It was a cold morning when",
           "Long ago, in a small village by the sea,", "The old lighthouse keeper had a secret:",
           "Nobody expected the letter to arrive on a Sunday.")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class RequestResult:
    ttft_ms: float | None
    tokens: int
    seconds: float
    error: str | None


@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict[str, str]
    ready_path: str
    headers: dict[str, str]
    model: str | None  # None: take the first id that /v1/models lists


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssSampler(threading.Thread):
    """Peak RSS of a process tree, sampled in the background so the load loop stays untouched."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.proc, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop_event = threading.Event()

    def sample(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)
        return total

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.sample()
        return self.peak


def start(server: Server, log_path: Path) -> subprocess.Popen[bytes]:
    """A new session: Ctrl-C in the terminal reaches only us, and we stop the whole group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        return subprocess.Popen(server.cmd, env={**os.environ, **server.env}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM the group, then SIGKILL if it lingers (or if we are interrupted again)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s; see {log_path}")


async def one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> RequestResult:
    """One streamed completion; a token is an SSE chunk with non-empty text."""
    t0 = time.perf_counter()
    ttft, tokens, done, error = None, 0, False, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = f"stream error: {chunk['error']}"
                        continue
                    choices = chunk.get("choices") or [{}]
                    if choices[0].get("text"):
                        tokens += 1
                        if ttft is None:
                            ttft = (time.perf_counter() - t0) * 1000
                if error is None and not done:
                    error = "stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return RequestResult(ttft, tokens, time.perf_counter() - t0, error)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: with few samples p99 is simply the slowest one."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def run_level(base: str, server: Server, model: str, concurrency: int, per_client: int,
                    max_tokens: int) -> dict[str, Any]:
    async def client_loop(k: int) -> list[RequestResult]:
        async with httpx.AsyncClient(base_url=base, headers=server.headers, trust_env=False,
                                     timeout=httpx.Timeout(600.0), limits=httpx.Limits(
                                         max_connections=None, max_keepalive_connections=None)) as c:
            out = []
            for i in range(per_client):
                n = k * per_client + i
                out.append(await one_request(c, {
                    "model": model, "prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0.8, "stream": True, "seed": 1000 * concurrency + n}))
            return out

    t0 = time.perf_counter()
    per_client_results = await asyncio.gather(*(client_loop(k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    results = [r for rs in per_client_results for r in rs]
    ttfts = [r.ttft_ms for r in results if r.ttft_ms is not None and r.error is None]
    tokens = sum(r.tokens for r in results)
    errors = [r.error for r in results if r.error]
    for e in errors[:3]:
        print(f"    error: {e}", file=sys.stderr)
    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors),
            "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall if wall else 0.0,
            "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p99_ms": percentile(ttfts, 0.99),
            "raw": [asdict(r) for r in results]}


async def drive(base: str, server: Server, levels: list[int], args: argparse.Namespace,
                pid: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, headers=server.headers, trust_env=False) as c:
        model = server.model or (await c.get("/v1/models")).json()["data"][0]["id"]
        warm = await one_request(c, {"model": model, "prompt": PROMPTS[0], "max_tokens": 16,
                                     "temperature": 0.8, "stream": True, "seed": 1})
    if warm.error:
        raise RuntimeError(f"{server.name} warm-up failed: {warm.error}")
    out: dict[str, Any] = {"model": model, "levels": {}}
    out["idle_rss_mib"] = RssSampler(pid).sample() / 2**20
    for c in levels:
        per_client = args.requests_per_client or (3 if c < 8 else 2)
        sampler = RssSampler(pid)
        sampler.start()
        try:
            level = await run_level(base, server, model, c, per_client, args.max_tokens)
        finally:
            level_peak = sampler.stop()
        level["peak_rss_mib"] = level_peak / 2**20
        out["levels"][c] = level
        print(f"  {server.name} c={c}: {level['tok_s']:.1f} tok/s, TTFT p50 "
              f"{fmt(level['ttft_p50_ms'])} ms, {level['errors']} errors, "
              f"{level['requests']} requests in {level['wall_s']:.1f}s", file=sys.stderr)
    return out


def bench(server: Server, port: int, levels: list[int], args: argparse.Namespace,
          log_dir: Path) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"{server.name}.log"
    print(f"[{server.name}] starting: {' '.join(server.cmd)}", file=sys.stderr)
    t0 = time.perf_counter()
    proc = start(server, log_path)
    try:
        wait_ready(proc, base + server.ready_path, log_path, args.start_timeout)
        startup = time.perf_counter() - t0
        result = asyncio.run(drive(base, server, levels, args, proc.pid))
        result.update(startup_s=startup, cmd=server.cmd, log=str(log_path))
        return result
    finally:
        stop(proc)


def fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _cell(level: dict[str, Any] | None, key: str, digits: int = 0) -> str:
    return fmt(level[key], digits) if level else "-"


def _ttft(level: dict[str, Any] | None) -> str:
    return f"{_cell(level, 'ttft_p50_ms')} / {_cell(level, 'ttft_p99_ms')}" if level else "-"


def render(results: dict[str, Any], levels: list[int], meta: dict[str, Any]) -> str:
    b, r = results.get("bastion"), results.get("reference")
    lines = [f"Run {meta['timestamp']} on {meta['cpus']} CPUs ({meta['platform']}); "
             f"{meta['model_file']}, max_tokens={meta['max_tokens']}, streaming /v1/completions.",
             "", "| concurrency | bastion tok/s | reference tok/s | ratio | bastion TTFT p50/p99 ms "
             "| reference TTFT p50/p99 ms | errors (b/r) | requests (b/r) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in levels:
        lb = b["levels"].get(c) if b else None
        lr = r["levels"].get(c) if r else None
        ratio = f"{lb['tok_s'] / lr['tok_s']:.2f}x" if lb and lr and lr["tok_s"] else "-"
        lines.append(f"| {c} | {_cell(lb, 'tok_s', 1)} | {_cell(lr, 'tok_s', 1)} | {ratio} | "
                     f"{_ttft(lb)} | {_ttft(lr)} | {_cell(lb, 'errors')}/{_cell(lr, 'errors')} | "
                     f"{_cell(lb, 'requests')}/{_cell(lr, 'requests')} |")
    top = max(levels)
    lines.append("")
    for name, res in (("bastion", b), ("reference", r)):
        if res:
            lines.append(f"- {name}: peak RSS at concurrency {top}: "
                         f"{res['levels'][top]['peak_rss_mib']:.0f} MiB (idle after warm-up "
                         f"{res['idle_rss_mib']:.0f} MiB; startup {res['startup_s']:.1f}s)")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("bastion", "reference"))
    p.add_argument("--levels", default="1,4,8,16", help="comma-separated concurrency levels")
    p.add_argument("--requests-per-client", type=int, default=None,
                   help="requests each client sends (default: 3 below c=8, else 2)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--data-dir", type=Path, default=Path.home() / ".cache" / "bastion-bench",
                   help="Bastion data dir; the assembled GGUF is kept here between runs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--start-timeout", type=float, default=180.0)
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks

    from bastion.catalog.bundled import bundled_gguf

    gguf = bundled_gguf(args.data_dir / "models")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = args.data_dir / "logs" / stamp
    threads = str(args.threads)
    servers = [
        Server("bastion", [sys.executable, "-m", "bastion.cli", "serve", "--port", "{port}",
                           "--data-dir", str(args.data_dir), "--threads", threads],
               {"BASTION_ADMIN_KEY": ADMIN_KEY, "BASTION_DRAIN_TIMEOUT": "5"}, "/health",
               {"Authorization": f"Bearer {ADMIN_KEY}"}, BASTION_MODEL),
        # interrupt_requests=False: by default a queued request cuts the running stream short.
        Server("reference", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                             "--host", "127.0.0.1", "--port", "{port}", "--n_ctx", "4096",
                             "--n_threads", threads, "--n_threads_batch", threads,
                             "--interrupt_requests", "false"],
               {}, "/v1/models", {}, None),
    ]
    results: dict[str, Any] = {}
    for server in servers:
        if args.only and server.name != args.only:
            continue
        port = free_port()
        server.cmd = [a.replace("{port}", str(port)) for a in server.cmd]
        results[server.name] = bench(server, port, levels, args, log_dir)

    meta = {"timestamp": stamp, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "model_file": gguf.name,
            "max_tokens": args.max_tokens, "levels": levels,
            "requests_per_client": args.requests_per_client, "threads": args.threads}
    table = render(results, levels, meta)
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"serving-{stamp}.md").write_text(table)
    (RESULTS_DIR / f"serving-{stamp}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {RESULTS_DIR}/serving-{stamp}.md and .json", file=sys.stderr)


if __name__ == "__main__":
    main()
