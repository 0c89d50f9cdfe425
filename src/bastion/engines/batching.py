"""How to cut a batch of sequences into forward passes: fewer passes cost less fixed overhead,
shorter ones less padding. With the lengths sorted, the cheapest cut is a small dynamic
programme over where each pass ends."""

from __future__ import annotations


def plan_passes(lengths: list[int], overhead_tokens: float, max_batch: int,
                max_batch_tokens: int) -> list[tuple[int, int]]:
    """[start, end) ranges over `lengths` (sorted ascending, padded lengths in tokens), each
    one forward pass, minimising sum(overhead + rows x longest) within the two caps. A pass's
    cost is counted in tokens: `overhead_tokens` is what one more pass costs, measured per
    model (SentenceTransformerEngine.calibrate)."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest cost of lengths[:j]
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = lengths[end - 1]
        for start in range(end - 1, max(-1, end - 1 - max_batch), -1):
            rows = end - start
            if rows > 1 and rows * longest > max_batch_tokens:
                break
            cost = best[start] + overhead_tokens + rows * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    passes: list[tuple[int, int]] = []
    end = n
    while end > 0:
        passes.append((cut[end], end))
        end = cut[end]
    return passes[::-1]
