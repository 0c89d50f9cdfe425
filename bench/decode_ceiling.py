"""The hardware ceiling for batched decoding: llama_decode alone, no sampling, no server.

Why: the serving benchmark's aggregate tokens/s can never exceed what one llama_decode step of B
sequences delivers on this machine; this prints that bound for the batch sizes the serving
benchmark uses, so its table can be read against it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bastion.models.bundled import bundled_gguf, bundled_smollm2
from bastion.engines.llamacpp.model import LlamaModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=("gemma", "smollm2"), default="gemma")
    ap.add_argument("--data-dir", type=Path, default=Path.home() / ".cache" / "bastion-bench")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    path = bundled_gguf(args.data_dir / "models") if args.model == "gemma" else bundled_smollm2()
    model = LlamaModel(path, n_seq=16, ctx_per_seq=4096, n_batch=512, threads=args.threads)
    prompt = model.tokenize("Once upon a time", add_special=True, parse_special=False)
    n = len(prompt)
    print(f"{path.name}, {args.threads} threads, {args.steps} decode steps per batch size")
    print("| sequences per step | decode tok/s | ms per step |\n|---:|---:|---:|")
    for batch in (1, 4, 8, 16):
        for slot in range(batch):
            model.clear_slot(slot)
        model.decode([(t, i, s, i == n - 1) for s in range(batch) for i, t in enumerate(prompt)])
        start = time.perf_counter()
        for k in range(args.steps):
            model.decode([(prompt[-1], n + k, s, True) for s in range(batch)])
        dt = time.perf_counter() - start
        print(f"| {batch} | {batch * args.steps / dt:.0f} | {dt / args.steps * 1000:.1f} |")
    model.close()


if __name__ == "__main__":
    main()
