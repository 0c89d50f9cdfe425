"""Embeddings from the chat GGUF models (llama.cpp mean pooling) next to all-MiniLM-L6-v2.

One Bastion server with the bundled models; for each model, in turn: embeddings per second
with C concurrent clients sending one sentence per request, and with one client sending
batches of 64 sentences per request. Short by default (a few seconds per cell). See
bench/README.md.

    python bench/gguf_embeddings.py [--seconds 5] [--clients 8]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from embeddings import sentences  # noqa: E402  (the same sentences as bench/embeddings.py)

ADMIN_KEY = "sk-bench-local-admin-key"  # loopback only; not a secret
MODELS = ["all-minilm-l6-v2", "smollm2-135m-instruct", "gemma-3-270m"]


def start(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BASTION_ADMIN_KEY": ADMIN_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "bastion.cli", "serve", "--port", str(port),
                             "--data-dir", str(data), "--no-worker"], env=env,
                            stdout=open(data / "server.log", "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit((data / "server.log").read_text()[-3000:])
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base + "/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not start")


def rate(api: str, model: str, clients: int, per_request: int, seconds: float,
         texts: list[str]) -> tuple[float, int]:
    """Embeddings per second over `seconds`, and the errors seen."""
    stop = time.perf_counter() + seconds
    done, errors = [0], [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
            i = k
            while time.perf_counter() < stop:
                batch = [texts[(i + j) % len(texts)] for j in range(per_request)]
                i += per_request * clients
                r = c.post(f"{api}/embeddings", json={"model": model, "input": batch,
                                                      "encoding_format": "base64"})
                with lock:
                    if r.status_code == 200:
                        done[0] += per_request
                    else:
                        errors[0] += 1

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return done[0] / (time.perf_counter() - t), errors[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    texts = sentences(512)
    with tempfile.TemporaryDirectory() as tmp:
        proc, api = start(Path(tmp))
        try:
            print(f"{'model':24} {'1 client':>10} {f'{args.clients} clients':>11} "
                  f"{'64 per request':>15} errors")
            for model in MODELS:
                rate(api, model, 1, 8, 0.5, texts)  # warm-up (the GGUF's embedding context)
                one, e1 = rate(api, model, 1, 1, args.seconds, texts)
                many, e2 = rate(api, model, args.clients, 1, args.seconds, texts)
                batched, e3 = rate(api, model, 1, 64, args.seconds, texts)
                print(f"{model:24} {one:10.1f} {many:11.1f} {batched:15.1f} {e1 + e2 + e3}",
                      flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
