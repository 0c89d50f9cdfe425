"""The hardware ceiling for batched decoding: llama_decode alone, no sampling, no server.

Why: the serving benchmark's aggregate tokens/s can never exceed what one llama_decode step of B
sequences delivers on this machine; this prints that bound for the batch sizes the serving
benchmark uses, so its table can be read against it.

With --prompt-tokens P the table gains the ceiling of the serving benchmark's whole workload:
B requests of P prompt tokens each, prefilled together (in steps of at most n_batch rows), then
--max-tokens generated tokens each (the first sampled from the prefill's logits), over --rounds
rounds. Prefill is work the decode-only ceiling leaves out: with 64-token prompts on a small CPU
it is about half of a request's time.
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
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="also time whole requests with prompts this long (0: decode only)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--rounds", type=int, default=2, help="requests per sequence slot")
    args = ap.parse_args()
    path = bundled_gguf(args.data_dir / "models") if args.model == "gemma" else bundled_smollm2()
    model = LlamaModel(path, n_seq=16, ctx_per_seq=4096, n_batch=512, threads=args.threads)
    prompt = model.tokenize("Once upon a time", add_special=True, parse_special=False)
    n = len(prompt)
    print(f"{path.name}, {args.threads} threads, {args.steps} decode steps per batch size")
    workload = f" {args.prompt_tokens}+{args.max_tokens}-token requests tok/s |" \
        if args.prompt_tokens else ""
    print(f"| sequences per step | decode tok/s | ms per step |{workload}\n"
          f"|---:|---:|---:|{'---:|' if workload else ''}")
    for batch in (-1, 1, 4, 8, 16):  # the first pass warms up (caches, thread pool): not shown
        warm_up, batch = batch < 0, abs(batch)
        for slot in range(batch):
            model.clear_slot(slot)
        model.decode([(t, i, s, i == n - 1) for s in range(batch) for i, t in enumerate(prompt)])
        start = time.perf_counter()
        for k in range(args.steps):
            model.decode([(prompt[-1], n + k, s, True) for s in range(batch)])
        dt = time.perf_counter() - start
        if warm_up:
            continue
        whole = f" {requests(model, batch, args):.1f} |" if args.prompt_tokens else ""
        print(f"| {batch} | {batch * args.steps / dt:.0f} | {dt / args.steps * 1000:.1f} |{whole}")
    model.close()


def requests(model: LlamaModel, batch: int, args: argparse.Namespace) -> float:
    """Generated tokens/s of `batch` requests at a time in lock-step (the best case for
    throughput: every step is full), each prompt its own tokens so nothing could be shared."""
    words = "river stone window garden market letter morning silver forest candle".split()
    generated, start = 0, time.perf_counter()
    for r in range(args.rounds):
        rows = []
        for s in range(batch):
            model.clear_slot(s)
            text = " ".join(words[(s * 7 + r * 3 + k * k) % len(words)]
                            for k in range(args.prompt_tokens))
            prompt = model.tokenize(text, add_special=True, parse_special=False)[:args.prompt_tokens]
            rows += [(t, i, s, i == len(prompt) - 1) for i, t in enumerate(prompt)]
        n = len(rows) // batch
        for k in range(0, len(rows), model.n_batch):
            model.decode(rows[k:k + model.n_batch])
        generated += batch  # the first token of each, from the prefill's logits
        for k in range(args.max_tokens - 1):
            model.decode([(rows[s * n + n - 1][0], n + k, s, True) for s in range(batch)])
            generated += batch
    return generated / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
