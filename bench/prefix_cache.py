"""Prefix caching benchmark: Bastion with BASTION_PREFIX_CACHE on, then off, in one run.

1. Shared system prompt: C clients (default 8) each send Q different questions (default 4),
   one after another, under one shared ~1,500-token system prompt: TTFT p50/p90, aggregate
   completion tokens/s, cached tokens, errors.
2. 10-turn conversations (one client, one conversation after another, each on its own
   subject so none reuses another's turns): each turn's median TTFT and cached tokens.
3. A 0 % hit rate: C clients x Q completions whose prompts share no prefix (serving.py's load
   with ~200 filler words of their own each): what the cache costs when it never hits.
The two servers run one after the other so they never compete for the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import ADMIN_KEY, RESULTS_DIR, Server, percentile, run_level, running  # noqa: E402

MODEL = "gemma-3-270m"
SYSTEM = "You are the help desk of the Harbor Street library. " + " ".join(
    f"Rule {i}: shelf {i} holds books on topic number {i * 7 % 31}; it is open until "
    f"{8 + i % 5} pm on weekdays and {1 + i % 4} pm on Saturdays, and its librarian is "
    f"called {('Ana', 'Ben', 'Chen', 'Dara', 'Eli')[i % 5]}." for i in range(1, 37))
TOPICS = ("topic 14", "shelf 3", "Saturday hours", "the librarian Chen", "shelf 20",
          "topic 2", "late returns", "shelf 41")


@dataclass
class Result:
    ttft_ms: float | None
    tokens: int
    cached: int
    prompt: int
    seconds: float
    error: str | None


async def chat(client: httpx.AsyncClient, messages: list[dict[str, str]],
               max_tokens: int) -> tuple[Result, str]:
    """One streamed chat completion; a token is a chunk with content."""
    t0 = time.perf_counter()
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    ttft, tokens, cached, prompt, text, error = None, 0, 0, 0, "", None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            else:
                async for line in resp.aiter_lines():
                    data = line[5:].strip() if line.startswith("data:") else ""
                    if not data or data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = f"stream error: {chunk['error']}"
                    if chunk.get("usage"):
                        cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
                        prompt = chunk["usage"]["prompt_tokens"]
                    for c in chunk.get("choices") or []:
                        if c["delta"].get("content"):
                            tokens += 1
                            text += c["delta"]["content"]
                            if ttft is None:
                                ttft = (time.perf_counter() - t0) * 1000
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return Result(ttft, tokens, cached, prompt, time.perf_counter() - t0, error), text


async def shared_prompt(base: str, clients: int, questions: int,
                        max_tokens: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600) as client:
        await chat(client, [{"role": "user", "content": "Hi"}], 4)  # warm-up, no shared prefix

        async def one_client(k: int) -> list[Result]:
            out = []
            for q in range(questions):
                topic = TOPICS[(k + q) % len(TOPICS)]
                msgs = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"Client {k}, question {q}: tell me about {topic}."}]
                out.append((await chat(client, msgs, max_tokens))[0])
            return out

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(one_client(k) for k in range(clients)))
                   for r in rs]
        wall = time.perf_counter() - t0
    ttfts = [r.ttft_ms for r in results if r.ttft_ms is not None]
    return {"requests": len(results), "errors": sum(r.error is not None for r in results),
            "first_error": next((r.error for r in results if r.error), None),
            "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p90_ms": percentile(ttfts, 0.9),
            "tokens_per_s": sum(r.tokens for r in results) / wall, "wall_s": wall,
            "cached_tokens_mean": sum(r.cached for r in results) / len(results)}


SUBJECTS = ("lighthouses", "bridges", "clocks", "maps", "ships", "bread", "paper")


async def conversation(base: str, turns: int, max_tokens: int,
                       conversations: int) -> list[dict[str, Any]]:
    """Per turn, the median TTFT over the conversations (one sample per turn is too noisy to
    compare the 10th turn with the 1st)."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    samples: list[list[Result]] = [[] for _ in range(turns)]
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600) as client:
        for c in range(conversations):
            subject = SUBJECTS[c % len(SUBJECTS)]
            messages = [{"role": "system", "content": f"You are a patient tutor on {subject}."}]
            for t in range(turns):
                messages.append({"role": "user", "content": f"Turn {t + 1}: tell me one more "
                                                            f"fact about the history of {subject}."})
                r, text = await chat(client, messages, max_tokens)
                messages.append({"role": "assistant", "content": text})
                samples[t].append(r)
    return [{"turn": t + 1,
             "ttft_ms": percentile([r.ttft_ms for r in rs if r.ttft_ms is not None], 0.5),
             "ttft_all_ms": [r.ttft_ms for r in rs], "cached": rs[0].cached,
             "prompt": rs[0].prompt,
             "error": next((r.error for r in rs if r.error), None)}
            for t, rs in enumerate(samples)]


def fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# Prefix cache, {meta['timestamp']}", "",
             f"{meta['cpus']} CPUs; {meta['clients']} clients x {meta['questions']} questions "
             f"under one {meta['system_tokens']}-token system prompt; max_tokens "
             f"{meta['max_tokens']}", "",
             "| cache | requests | errors | TTFT p50 ms | TTFT p90 ms | tokens/s | cached (mean) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s = r["shared"]
        lines.append(f"| {name} | {s['requests']} | {s['errors']} | {fmt(s['ttft_p50_ms'])} | "
                     f"{fmt(s['ttft_p90_ms'])} | {fmt(s['tokens_per_s'], 1)} | "
                     f"{fmt(s['cached_tokens_mean'])} |")
    lines += ["", "0 % hit rate (no shared prefix, streaming completions):", "",
              "| cache | requests | errors | TTFT p50 ms | tokens/s |", "|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["miss"]
        lines.append(f"| {name} | {m['requests']} | {m['errors']} | {fmt(m['ttft_p50_ms'])} | "
                     f"{fmt(m['tok_s'], 1)} |")
    lines += ["", f"{meta.get('conversations', 1)} conversations; TTFT: the median per turn, "
              "prompt and cached tokens: the first conversation's", "",
              "| turn | prompt | " + " | ".join(f"TTFT ms ({n}) | cached ({n})" for n in results)
              + " |", "|---|---|" + "---|---|" * len(results)]
    names = list(results)
    for t in range(len(results[names[0]]["turns"])):
        cells = [str(results[names[0]]["turns"][t]["prompt"])]
        for n in names:
            row = results[n]["turns"][t]
            cells += [fmt(row["ttft_ms"]), str(row["cached"])]
        lines.append(f"| {t + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--conversations", type=int, default=3,
                   help="conversations of --turns turns; each turn's TTFT is their median")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--miss-words", type=int, default=200,
                   help="filler words per prompt in the 0 %% hit-rate load")
    p.add_argument("--data-dir", type=Path, default=Path.home() / ".cache" / "bastion-bench")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--start-timeout", type=float, default=180.0)
    args = p.parse_args()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    results: dict[str, Any] = {}
    for name, flag in (("on", "true"), ("off", "false")):
        server = Server(f"bastion-cache-{name}",
                        [sys.executable, "-m", "bastion.cli", "serve", "--port", "{port}",
                         "--data-dir", str(args.data_dir), "--threads", str(args.threads),
                         "--no-bundled-embeddings"],
                        {"BASTION_ADMIN_KEY": ADMIN_KEY, "BASTION_DRAIN_TIMEOUT": "5",
                         "BASTION_PREFIX_CACHE": flag, "BASTION_RATE_LIMITS": "false"},
                        "/health", {"Authorization": f"Bearer {ADMIN_KEY}"}, MODEL)
        log_path = args.data_dir / "logs" / stamp / f"{server.name}.log"
        with running(server, log_path, args.start_timeout) as (base, _pid):
            shared = asyncio.run(shared_prompt(base, args.clients, args.questions,
                                               args.max_tokens))
            turns = asyncio.run(conversation(base, args.turns, args.max_tokens,
                                             args.conversations))
            miss = asyncio.run(run_level(base, server, MODEL, args.clients, args.questions,
                                         args.max_tokens, args.miss_words))
            miss.pop("raw")
            system_tokens = httpx.post(
                base + "/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                json={"model": MODEL, "max_tokens": 1, "messages": [
                    {"role": "system", "content": SYSTEM}, {"role": "user", "content": "x"}]},
                timeout=600).json()["usage"]["prompt_tokens"]
        results[name] = {"shared": shared, "turns": turns, "miss": miss}
    meta = {"timestamp": stamp, "cpus": os.cpu_count(), "clients": args.clients,
            "questions": args.questions, "max_tokens": args.max_tokens,
            "conversations": args.conversations,
            "system_tokens": system_tokens}
    table = render(results, meta)
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"prefix-cache-{stamp}.md").write_text(table)
    (RESULTS_DIR / f"prefix-cache-{stamp}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
