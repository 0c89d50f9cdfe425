"""How the embedding engine cuts a batch into forward passes (engines/batching.py): the plan
is checked against a brute force over every way of cutting, and against the caps."""

from __future__ import annotations

import itertools
import random

from bastion.engines.batching import plan_passes


def cost(lengths: list[int], passes: list[tuple[int, int]], overhead: float) -> float:
    return sum(overhead + (end - start) * lengths[end - 1] for start, end in passes)


def brute_force(lengths: list[int], overhead: float, max_batch: int) -> float:
    n, best = len(lengths), float("inf")
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        passes = list(zip(bounds, bounds[1:]))
        if all(end - start <= max_batch for start, end in passes):
            best = min(best, cost(lengths, passes, overhead))
    return best


def test_the_plan_is_the_cheapest_cut() -> None:
    rng = random.Random(7)
    for _ in range(200):
        lengths = sorted(rng.randint(3, 60) for _ in range(rng.randint(1, 10)))
        overhead = rng.choice([0.0, 4.0, 45.0, 200.0])
        max_batch = rng.choice([2, 4, 64])
        passes = plan_passes(lengths, overhead, max_batch, 10**9)
        assert passes[0][0] == 0 and passes[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(passes, passes[1:]))  # contiguous, complete
        assert cost(lengths, passes, overhead) == brute_force(lengths, overhead, max_batch)


def test_padding_against_passes() -> None:
    short, long = [10] * 8, [40] * 8
    assert plan_passes(short + long, 45.0, 64, 10**9) == [(0, 8), (8, 16)]  # padding costs more
    assert plan_passes(short + long, 1000.0, 64, 10**9) == [(0, 16)]  # a pass costs more
    assert max(end - start for start, end in plan_passes([12] * 10, 1.0, 4, 10**9)) == 4
    # the padded-token cap: 4 rows of 40 tokens fit in 160, a fifth does not
    assert all((end - start) * 40 <= 160 for start, end in plan_passes([40] * 9, 1000.0, 64, 160))
    assert plan_passes([500], 45.0, 64, 160) == [(0, 1)]  # one sequence always gets its pass
