"""The sampler draws from exactly the distribution it promises (unit level, no server)."""

from __future__ import annotations

import numpy as np

from bastion.engines.base import SamplingParams
from bastion.engines.llamacpp.sampling import SequenceSampler, token_logprob


def softmax(x: np.ndarray, t: float) -> np.ndarray:
    z = np.exp((x - x.max()) / t)
    return z / z.sum()


def draw(params: SamplingParams, logits: np.ndarray, n: int) -> np.ndarray:
    s = SequenceSampler(params, n_vocab=len(logits), penalty_window=64)
    try:
        return np.array([s.sample(None, logits, 0) for _ in range(n)])
    finally:
        s.close()


def test_plain_temperature_matches_softmax() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(1000) * 2).astype(np.float32)  # not a multiple of the block
    logits[:5] += 6  # a few likely tokens and a long tail
    n = 40_000
    got = np.bincount(draw(SamplingParams(max_tokens=1, temperature=0.7, seed=1), logits, n),
                      minlength=1000) / n
    want = softmax(logits.astype(np.float64), 0.7)
    assert np.abs(got - want).max() < 0.01
    tail = want[5:].sum()
    assert abs(got[5:].sum() - tail) < 0.01 and tail > 0.05  # the tail is really sampled


def test_same_seed_same_draws_and_other_seed_differs() -> None:
    logits = np.linspace(0, 3, 300).astype(np.float32)
    a = draw(SamplingParams(max_tokens=1, temperature=1.0, seed=42), logits, 50)
    b = draw(SamplingParams(max_tokens=1, temperature=1.0, seed=42), logits, 50)
    c = draw(SamplingParams(max_tokens=1, temperature=1.0, seed=43), logits, 50)
    assert (a == b).all() and not (a == c).all()


def test_chain_path_top_k_and_top_p() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(700).astype(np.float32)
    best = int(np.argmax(logits))
    assert set(draw(SamplingParams(max_tokens=1, temperature=1.5, top_k=1), logits, 50)) == {best}
    top3 = set(np.argsort(-logits)[:3].tolist())
    got = set(draw(SamplingParams(max_tokens=1, temperature=1.0, top_k=3, seed=3), logits, 300))
    assert got == top3
    sharp = logits.copy()
    sharp[7] += 20
    assert set(draw(SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5), sharp, 30)) == {7}


def test_presence_penalty_and_logit_bias_reach_far_tokens() -> None:
    logits = np.zeros(600, dtype=np.float32)
    logits[0] = 50.0  # token 0 would always win...
    biased = draw(SamplingParams(max_tokens=1, temperature=1.0, logit_bias=((599, 100.0),)),
                  logits, 20)
    assert set(biased) == {599}  # ...but a bias pulls in a token far below the cut
    # With a presence penalty, the token just drawn is pushed down on the next draws.
    s = SequenceSampler(SamplingParams(max_tokens=1, temperature=0.05, presence_penalty=2.0,
                                       top_k=2), n_vocab=600, penalty_window=64)
    two = logits.copy()
    two[1] = 49.0
    first, second = s.sample(None, two, 0), s.sample(None, two, 0)
    s.close()
    assert first == 0 and second == 1


def test_logit_bias_shifts_the_plain_draw_exactly() -> None:
    # A bias without top-k/p or penalties is added in numpy, not by the chain: the draw must
    # still follow softmax((logits + bias) / T), a banned token never drawn.
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal(1000) * 2).astype(np.float32)
    logits[:5] += 6
    bias = {3: 2.5, 1: -100.0, 700: 9.0}
    params = SamplingParams(max_tokens=1, temperature=0.7, seed=5,
                            logit_bias=tuple(bias.items()))
    n = 40_000
    got = np.bincount(draw(params, logits, n), minlength=1000) / n
    shifted = logits.astype(np.float64)
    for tok, value in bias.items():
        shifted[tok] += value
    want = softmax(shifted, 0.7)
    assert np.abs(got - want).max() < 0.01
    assert got[1] == 0 and got[700] > 0.03


def test_token_logprob_is_log_softmax() -> None:
    logits = np.array([1.0, 2.0, 3.0, 0.5], dtype=np.float32)
    lp = token_logprob(logits, 1, 2, lambda t: (f"t{t}", [t]))
    ref = np.log(softmax(logits.astype(np.float64), 1.0))
    assert abs(lp.logprob - ref[1]) < 1e-6
    assert [t for t, _, _ in lp.top] == ["t2", "t1"]
    assert abs(lp.top[0][2] - ref[2]) < 1e-6


def test_draw_holds_far_from_zero_and_with_the_best_token_banned() -> None:
    # The weights skip the shift by the max while the best scaled logit is moderate. Each case
    # must still follow softmax: large logits (shifted); the best token banned, the rest 105
    # below it (unshifted, token 0 and the rest both likely); the best banned over a rest so
    # far down that the unshifted weights would lose it (the fallback that shifts).
    rng = np.random.default_rng(3)
    base = rng.standard_normal(800).astype(np.float32)
    n = 20_000
    for offset, banned_best in ((150.0, None), (-45.0, 60.0), (-60.0, 50.0)):
        logits = base + np.float32(offset)
        bias: tuple[tuple[int, float], ...] = ()
        if banned_best is not None:
            logits[0] = banned_best
            bias = ((0, -100.0),)
        params = SamplingParams(max_tokens=1, temperature=1.0, seed=7, logit_bias=bias)
        got = np.bincount(draw(params, logits, n), minlength=800) / n
        shifted = logits.astype(np.float64)
        for tok, value in bias:
            shifted[tok] += value
        want = softmax(shifted, 1.0)
        assert np.abs(got - want).max() < 0.015
        assert 0.05 < want[0] < 0.95 or not bias  # the case really weighs token 0 against the rest
