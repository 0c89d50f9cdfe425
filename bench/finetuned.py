"""Decode speed of a fine-tuned model (base GGUF + LoRA adapter applied by llama.cpp) against
its base, on the same batching engine; the two run alternately, never at the same time, and
each reports its best of several rounds.

    python bench/finetuned.py --adapter <data-dir>/fine_tuning/<job>/model/adapter.gguf

Each run sends `concurrency` requests of `--tokens` tokens at once (end-of-text is forbidden with
a logit bias so every request decodes the same number of tokens) and reports generated tokens
per second of wall time. The issue asks that a fine-tuned model keep at least 80% of the base."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bastion.models.bundled import bundled_gguf
from bastion.engines.base import GenerationRequest, SamplingParams
from bastion.engines.llamacpp.engine import LlamaCppEngine


async def run(engine: LlamaCppEngine, concurrency: int, tokens: int) -> float:
    prompt = engine.render_chat([{"role": "user", "content": "Tell me a long story."}])
    banned = tuple((t, -100.0) for t in range(engine.model.n_vocab) if engine.model.is_eog(t))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, logit_bias=banned)

    async def one() -> int:
        n = 0
        async for ev in engine.generate(GenerationRequest(prompt_tokens=prompt, params=params)):
            n += getattr(ev, "n_tokens", 0)
        return n

    await one()  # warm-up
    start = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(concurrency)))
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "bastion-test")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base = bundled_gguf(args.models_dir)
    levels = [int(c) for c in args.concurrency.split(",")]
    engines = {name: LlamaCppEngine(path=base, name=name, n_seq=max(levels), ctx_per_seq=1024,
                                    n_batch=512, threads=args.threads, lora=lora)
               for name, lora in (("base", None), ("fine-tuned", args.adapter))}
    best: dict[str, list[float]] = {name: [0.0] * len(levels) for name in engines}
    try:  # alternate the two, best of --rounds each: a busy machine hurts both alike
        for _ in range(args.rounds):
            for name, engine in engines.items():
                for i, c in enumerate(levels):
                    best[name][i] = max(best[name][i], asyncio.run(run(engine, c, args.tokens)))
    finally:
        for engine in engines.values():
            engine.close()
    rows = list(best.items())
    print("| model | " + " | ".join(f"c={c} tok/s" for c in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for name, speeds in rows:
        print(f"| {name} | " + " | ".join(f"{s:.1f}" for s in speeds) + " |")
    ratio = [ft / b for b, ft in zip(rows[0][1], rows[1][1])]
    print("fine-tuned / base: " + ", ".join(f"{r:.0%}" for r in ratio))


if __name__ == "__main__":
    main()
