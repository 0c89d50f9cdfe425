"""Serving benchmark: Bastion vs llama_cpp.server on a bundled chat model (Gemma 3 270M or
SmolLM2-135M-Instruct), read against the decode ceiling measured in the same run.

Every server gets the same streaming /v1/completions load at several concurrency levels, one
server after the other so they never compete for the CPU. With --baseline, other versions of
Bastion (their src/ trees) run in the same way, for before/after comparisons. See bench/README.md.
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import psutil
import random

ADMIN_KEY = "sk-bench-local-admin-key"  # loopback only; not a secret
PROMPTS = ("Once upon a time", "The history of the city began", "It was a cold morning when",
           "Long ago, in a small village by the sea,", "The old lighthouse keeper had a secret:",
           "Nobody expected the letter to arrive on a Sunday.")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Filler for --prompt-words: every request draws its own words, so no two prompts share a
# prefix that a prompt cache could reuse, and TTFT includes a real prefill.
WORDS = ("river stone window garden market letter morning silver forest candle bridge winter "
         "harbor lantern meadow village painter story island mountain teacher kitchen music "
         "summer yellow engine basket ladder orange blanket castle doctor feather mirror "
         "pocket rabbit saddle thunder valley wagon anchor butter cotton dragon eagle farmer "
         "glass hammer jacket kettle lemon needle ocean pepper quilt rocket shadow tiger").split()
MODELS = {"gemma": "gemma-3-270m", "smollm2": "smollm2-135m-instruct"}


@dataclass
class RequestResult:
    ttft_ms: float | None
    tokens: int
    seconds: float
    error: str | None


@dataclass
class Server:
    name: str
    cmd: list[str]  # "{port}" is filled in at start
    env: dict[str, str]
    ready_path: str
    headers: dict[str, str]
    model: str | None  # None: the first id that /v1/models lists


def _sum(proc: psutil.Process, what: Callable[[psutil.Process], float]) -> float:
    """`what` summed over a process and its children, skipping any that just exited."""
    total = 0.0
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        tree = [proc]
    for p in tree:
        try:
            total += what(p)
        except psutil.Error:
            pass
    return total


def _proc_cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _cpu_now(server: psutil.Process) -> tuple[float, float, float]:
    """CPU seconds: busy machine-wide (hypervisor steal included), used by the server tree, used
    by this script itself (not its children: the server is one)."""
    t = psutil.cpu_times()
    guest = getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)  # already in user time
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0) - guest
    return busy, _sum(server, _proc_cpu), _proc_cpu(psutil.Process())


class Monitor(threading.Thread):
    """Peak RSS of the server's process tree, sampled in the background so the load loop stays
    untouched; plus the CPU share used by anything that is neither the server nor this script,
    because on 2 cores a busy neighbour wrecks llama.cpp's spinning threads and the numbers."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.proc, self.interval, self.peak = psutil.Process(pid), interval, 0.0
        self._halt = threading.Event()
        self._t0, self._cpu0 = time.perf_counter(), _cpu_now(self.proc)

    def sample(self) -> float:
        rss = _sum(self.proc, lambda p: p.memory_info().rss) / 2**20
        self.peak = max(self.peak, rss)
        return rss

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> tuple[float, float]:
        """(peak RSS in MiB, CPU used by other processes in % of all cores)."""
        self._halt.set()
        self.join()
        self.sample()
        busy, server, me = (b - a for a, b in zip(self._cpu0, _cpu_now(self.proc)))
        span = (time.perf_counter() - self._t0) * (os.cpu_count() or 1)
        return self.peak, max(0.0, busy - server - me) / span * 100


@contextmanager
def running(server: Server, log_path: Path, timeout: float) -> Iterator[tuple[str, int]]:
    """Start the server in its own session (so a terminal Ctrl-C reaches only us), wait until it
    answers, yield (base URL, pid); always SIGTERM it afterwards, SIGKILL if it lingers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base, cmd = f"http://127.0.0.1:{port}", [a.replace("{port}", str(port)) for a in server.cmd]
    print(f"[{server.name}] {' '.join(cmd)}", file=sys.stderr)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, **server.env}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{server.name} exited with {proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} not ready after {timeout:.0f}s; see {log_path}")
            try:
                if httpx.get(base + server.ready_path, timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield base, proc.pid
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired, KeyboardInterrupt):
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> RequestResult:
    """One streamed completion; a token is an SSE chunk with non-empty text. Not streamed:
    the usage's completion tokens, and no TTFT."""
    t0 = time.perf_counter()
    ttft, tokens, done, error = None, 0, False, None
    if not body.get("stream"):
        try:
            resp = await client.post("/v1/completions", json=body)
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {resp.content[:200]!r}"
            else:
                tokens = resp.json()["usage"]["completion_tokens"]
        except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        return RequestResult(ttft, tokens, time.perf_counter() - t0, error)
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
                    elif (chunk.get("choices") or [{}])[0].get("text"):
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
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


def prompt_for(n: int, words: int) -> str:
    """The n-th request's prompt: a story opening, after `words` filler words of its own."""
    if not words:
        return PROMPTS[n % len(PROMPTS)]
    rng = random.Random(n)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + ". " + PROMPTS[n % len(PROMPTS)]


def end_of_generation_bias(gguf: Path) -> dict[str, int]:
    """logit_bias that keeps every end-of-generation token out: each request then generates
    exactly max_tokens, as the ceilings do (an early end would spread the fixed costs of a
    request, prefill and HTTP, over fewer tokens on every server alike). Both servers apply
    logit_bias to the logits before sampling, as OpenAI does."""
    from bastion.engines.llamacpp.model import LlamaModel

    vocab = LlamaModel(gguf, n_seq=1, ctx_per_seq=1, n_batch=1, threads=1, vocab_only=True)
    try:
        return {str(t): -100 for t in range(vocab.n_vocab) if vocab.is_eog(t)}
    finally:
        vocab.close()


async def run_level(base: str, server: Server, model: str, concurrency: int, per_client: int,
                    max_tokens: int, words: int = 0,
                    logit_bias: dict[str, int] | None = None,
                    stream: bool = True) -> dict[str, Any]:
    """`concurrency` clients, each sending `per_client` requests back to back."""
    async def client_loop(k: int) -> list[RequestResult]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=base, headers=server.headers, trust_env=False,
                                     timeout=600.0, limits=limits) as client:
            out = []
            for i in range(per_client):
                n = k * per_client + i
                out.append(await one_request(client, {
                    "model": model, "prompt": prompt_for(1000 * concurrency + n, words),
                    "max_tokens": max_tokens, "temperature": 0.8, "stream": stream,
                    "seed": 1000 * concurrency + n, **({"logit_bias": logit_bias}
                                                       if logit_bias else {})}))
            return out

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*map(client_loop, range(concurrency))) for r in rs]
    wall = time.perf_counter() - t0
    ttfts = [r.ttft_ms for r in results if r.ttft_ms is not None and r.error is None]
    errors = [r.error for r in results if r.error]
    for e in errors[:3]:
        print(f"    error: {e}", file=sys.stderr)
    tokens = sum(r.tokens for r in results)
    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors),
            "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "tokens_per_request": tokens / max(1, len(results) - len(errors)),
            "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p99_ms": percentile(ttfts, 0.99),
            "raw": [asdict(r) for r in results]}


async def drive(base: str, pid: int, server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """Warm up (not measured), then run every level against one running server."""
    async with httpx.AsyncClient(base_url=base, headers=server.headers, trust_env=False,
                                 timeout=600.0) as client:
        model = server.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        warm = await one_request(client, {"model": model, "prompt": PROMPTS[0], "max_tokens": 16,
                                          "temperature": 0.8, "stream": True, "seed": 1})
    if warm.error:
        raise RuntimeError(f"{server.name} warm-up failed: {warm.error}")
    out: dict[str, Any] = {"model": model, "idle_rss_mib": Monitor(pid).sample(), "levels": {}}
    for c in args.levels:
        monitor = Monitor(pid)
        monitor.start()
        try:
            level = await run_level(base, server, model, c,
                                    args.requests_per_client or (3 if c < 8 else 2), args.max_tokens,
                                    args.prompt_words, args.logit_bias, not args.no_stream)
        finally:
            stats = monitor.stop()
        level["peak_rss_mib"], level["other_cpu_pct"] = stats
        out["levels"][c] = level
        print(f"  {server.name} c={c}: {level['tok_s']:.1f} tok/s, TTFT p50 "
              f"{fmt(level['ttft_p50_ms'])} ms, {level['errors']} errors, "
              f"{level['requests']} requests in {level['wall_s']:.1f}s", file=sys.stderr)
        if level["other_cpu_pct"] > 10:
            print(f"  WARNING: other processes used {level['other_cpu_pct']:.0f}% of the CPU "
                  "during this level; its numbers are not trustworthy", file=sys.stderr)
    return out


def fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """One row per level and server; ratios against the first server and the decode ceiling."""
    first = "bastion" if "bastion" in results else next(iter(results), None)
    lines = [f"Run {meta['timestamp']} on {meta['cpus']} CPUs ({meta['platform']}); "
             f"{meta['model_file']}, max_tokens={meta['max_tokens']}, "
             f"prompt {meta['prompt_words']} filler words + a story opening, "
             + ("streaming " if meta.get("stream", True) else "whole answers from ")
             + "/v1/completions, " + ("end-of-generation tokens biased out (every request "
             "max_tokens long)." if meta.get("eog_logit_bias") else "requests may end early."),
             "",
             f"| concurrency | server | tok/s | of decode ceiling | of workload ceiling | ÷ {first} "
             "| TTFT p50/p99 ms | tokens per request | errors | requests | other CPU % |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in meta["levels"]:
        base = results[first]["levels"].get(c) if first else None
        for name, res in results.items():
            lv = res["levels"].get(c)
            if not lv:
                continue
            bound = res.get("ceiling") or {}
            top, whole = bound.get("decode", {}).get(c), bound.get("workload", {}).get(c)
            lines.append(" | ".join([
                f"| {c}", name, f"{lv['tok_s']:.1f}",
                f"{lv['tok_s'] / top:.0%}" if top else "-",
                f"{lv['tok_s'] / whole:.0%}" if whole else "-",
                f"{lv['tok_s'] / base['tok_s']:.2f}x" if base and base["tok_s"] else "-",
                f"{fmt(lv['ttft_p50_ms'])}/{fmt(lv['ttft_p99_ms'])}",
                fmt(lv.get("tokens_per_request"), 1), str(lv["errors"]),
                str(lv["requests"]), f"{lv['other_cpu_pct']:.0f} |"]))
    for m in meta.get("ceilings") or []:
        lines += ["", f"Ceilings measured {m['when']} (`bench/decode_ceiling.py`): decode "
                  + ", ".join(f"{c} seq {v:.0f}" for c, v in sorted(m["decode"].items()))
                  + f" tok/s; workload ({meta['prompt_words'] + 10}-token prompts and "
                  f"{meta['max_tokens']} generated tokens per request, prefilled and decoded in "
                  "lock-step with nothing else running) " + ", ".join(
                      f"{c} seq {v:.1f}" for c, v in sorted(m["workload"].items())) + " tok/s"]
    if meta.get("ceilings"):
        lines += ["", "Each server's \"of ceiling\" columns divide by the mean of the two "
                  "measurements that bracket its run."]
    top_level = max(meta["levels"])
    lines += ["", "other CPU %: share of all cores used by processes other than the server and "
              "this script; above ~10% that level ran on a busy machine.", ""]
    for name, res in results.items():
        lines.append(f"- {name}: peak RSS at concurrency {top_level}: "
                     f"{res['levels'][top_level]['peak_rss_mib']:.0f} MiB (idle after warm-up "
                     f"{res['idle_rss_mib']:.0f} MiB; startup {res['startup_s']:.1f}s)")
    return "\n".join(lines) + "\n"


def decode_ceiling(model: str, data_dir: Path, threads: int,
                   prompt_tokens: int, max_tokens: int) -> dict[str, dict[int, float]]:
    """tok/s of bare llama_decode per batch size, from bench/decode_ceiling.py's table: decode
    steps alone ("decode") and whole requests of about this benchmark's shape ("workload")."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("decode_ceiling.py")),
                          "--model", model, "--data-dir", str(data_dir), "--threads", str(threads),
                          "--prompt-tokens", str(prompt_tokens), "--max-tokens", str(max_tokens)],
                         capture_output=True, text=True, check=True).stdout
    print(out, file=sys.stderr)
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    rows = [r for r in rows if r[0].strip().isdigit()]
    return {"decode": {int(r[0]): float(r[1]) for r in rows},
            "workload": {int(r[0]): float(r[3]) for r in rows}}


def bracket(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[int, float]]:
    """The mean of two ceiling measurements, per kind and batch size."""
    return {kind: {c: (before[kind][c] + after[kind][c]) / 2 for c in before[kind]}
            for kind in ("decode", "workload")}


def bastion_server(name: str, args: argparse.Namespace, data_dir: Path,
                   env: dict[str, str]) -> Server:
    return Server(name, [sys.executable, "-m", "bastion.cli", "serve", "--port", "{port}",
                         "--data-dir", str(data_dir), "--threads", str(args.threads)],
                  {"BASTION_ADMIN_KEY": ADMIN_KEY, "BASTION_DRAIN_TIMEOUT": "5", **env}, "/health",
                  {"Authorization": f"Bearer {ADMIN_KEY}"}, MODELS[args.model])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=tuple(MODELS), default="gemma")
    p.add_argument("--only", choices=("bastion", "reference"),
                   help="run only Bastion (and any --baseline) or only the reference server")
    p.add_argument("--levels", default="1,4,8,16", help="comma-separated concurrency levels",
                   type=lambda s: [int(x) for x in s.split(",") if x.strip()])
    p.add_argument("--requests-per-client", type=int, default=None,
                   help="requests each client sends (default: 3 below concurrency 8, else 2)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=0,
                   help="filler words of its own before each request's story opening")
    p.add_argument("--allow-eos", action="store_true",
                   help="let requests end early at an end-of-generation token (by default a "
                        "logit_bias keeps those out, so every request generates max_tokens)")
    p.add_argument("--no-stream", action="store_true",
                   help="whole answers instead of SSE (no TTFT): what streaming costs the machine")
    p.add_argument("--ceiling", action="store_true",
                   help="also time bare llama_decode (bench/decode_ceiling.py) in this run")
    p.add_argument("--bastion-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for this version's Bastion (repeatable)")
    p.add_argument("--baseline", action="append", default=[], metavar="LABEL=SRC",
                   help="also run another Bastion version from its src/ directory (e.g. "
                        "`git archive <commit> src | tar -x -C /tmp/base`), in the same run; several "
                        "paths joined by os.pathsep all go first on PYTHONPATH (e.g. another "
                        "llama_cpp build)")
    p.add_argument("--reverse", action="store_true",
                   help="run the servers in reverse order (reference, baselines, this version): "
                        "a second run with it balances drift across the run")
    p.add_argument("--data-dir", type=Path, default=Path.home() / ".cache" / "bastion-bench",
                   help="Bastion's data dir; the assembled GGUF is kept here between runs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--start-timeout", type=float, default=180.0)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks run

    from bastion.models.bundled import bundled_gguf, bundled_smollm2

    gguf = bundled_gguf(args.data_dir / "models") if args.model == "gemma" else bundled_smollm2()
    args.logit_bias = None if args.allow_eos else end_of_generation_bias(gguf)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    threads = str(args.threads)
    env = dict(kv.split("=", 1) for kv in args.bastion_env)
    servers = [bastion_server("bastion", args, args.data_dir, env)]
    for spec in args.baseline:
        label, src = spec.split("=", 1)
        servers.append(bastion_server(label, args, args.data_dir / f"baseline-{label}", {
            "PYTHONPATH": os.pathsep.join(str(Path(p).resolve()) for p in src.split(os.pathsep))}))
    # interrupt_requests=false: by default a queued request cuts the running stream short.
    servers.append(Server("reference", [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
        "--port", "{port}", "--n_ctx", "4096", "--n_threads", threads, "--n_threads_batch",
        threads, "--interrupt_requests", "false"], {}, "/v1/models", {}, None))
    ceilings: list[dict[str, Any]] = []

    def measure_ceiling(when: str) -> None:
        """The ceiling right before the first server and after each one: this VM's speed
        drifts by a third within minutes, so each server is held to the mean of the two
        measurements that bracket its own run."""
        if args.ceiling:  # the story openings are 5-11 tokens, each filler word about one
            ceilings.append({"when": when, **decode_ceiling(
                args.model, args.data_dir, args.threads, args.prompt_words + 10,
                args.max_tokens)})

    results: dict[str, Any] = {}
    measure_ceiling("before the first server")
    for server in reversed(servers) if args.reverse else servers:
        if args.only is None or (server.name == "reference") == (args.only == "reference"):
            log_path = args.data_dir / "logs" / stamp / f"{server.name}.log"
            t0 = time.perf_counter()
            with running(server, log_path, args.start_timeout) as (base, pid):
                startup = time.perf_counter() - t0
                results[server.name] = asyncio.run(drive(base, pid, server, args))
            results[server.name].update(startup_s=startup, log=str(log_path))
            measure_ceiling(f"after {server.name}")
            if args.ceiling:
                results[server.name]["ceiling"] = bracket(ceilings[-2], ceilings[-1])

    meta = {"timestamp": stamp, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "model_file": gguf.name,
            "max_tokens": args.max_tokens, "levels": args.levels, "threads": args.threads,
            "prompt_words": args.prompt_words, "ceilings": ceilings,
            "eog_logit_bias": sorted(map(int, args.logit_bias or {})),
            "stream": not args.no_stream,
            "requests_per_client": args.requests_per_client,
            "commands": {s.name: s.cmd for s in servers if s.name in results},
            "envs": {s.name: s.env for s in servers if s.name in results}}
    table = render(results, meta)
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"serving-{stamp}.md").write_text(table)
    (RESULTS_DIR / f"serving-{stamp}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {RESULTS_DIR}/serving-{stamp}.md and .json", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the servers were already stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
