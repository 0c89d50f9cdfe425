"""Per-sequence llama.cpp sampler chains (sampling stays in C) and OpenAI-style logprobs."""

from __future__ import annotations

import ctypes
import random
import threading
from typing import Callable

import llama_cpp as lc
import numpy as np

from bastion.engines.base import SamplingParams, TokenLogprob

# Before a chain with top-k/top-p/min-p, penalties or a bias runs, tokens whose logit lies more
# than RIGOROUS_LOGITS temperature-scaled units below the best are dropped: each has probability
# below e^-30 of the best, all 262k of them together under 3e-8, so nothing measurable changes
# while the chain no longer sorts and normalises the whole vocabulary for every token.
RIGOROUS_LOGITS = 30.0
MIN_TEMPERATURE = 1e-3
BLOCK = 512  # tokens per block in the two-level categorical draw
SHIFT_FREE_LOW, SHIFT_FREE_HIGH = -20.0, 70.0  # see SequenceSampler._blocks
MIN_MASS = 1e-20  # total unshifted weight below which tokens lost to underflow could count
# A constrained sequence first samples as if free and keeps the token if the grammar allows it
# (llama.cpp's common sampler does the same): checking one token costs microseconds, masking
# Gemma's 262k-token vocabulary tens of milliseconds. Only when the free choice does not fit
# are the best tokens masked, a chunk at a time, and the whole vocabulary last.
REJECTION_TRIES = 16
GREEDY_CHUNKS = (64, 4096)
SAMPLE_CHUNKS = (256, 4096)
TAIL = 1e-3  # left-out probability mass, relative to the allowed, that may be ignored
DEAD_END = -1  # no token fits the grammar (cannot happen with a well-formed grammar)
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
Describe = Callable[[int], tuple[str, list[int]]]


class SequenceSampler:
    """One sequence's sampler chain: logit bias, penalties, top-k, top-p, min-p, temperature,
    seeded distribution; or greedy at temperature 0."""

    def __init__(self, params: SamplingParams, *, n_vocab: int, penalty_window: int,
                 seed_offset: int = 0, grammar: lc.llama_sampler_p | None = None) -> None:
        """`grammar`: a llama.cpp grammar sampler this sequence owns (constrained output)."""
        self.grammar = grammar
        self.n_vocab = n_vocab
        # Below MIN_TEMPERATURE the distribution is a point mass on the argmax anyway, and
        # 1/T would overflow float32: treat it as greedy.
        self.greedy = params.temperature < MIN_TEMPERATURE
        self.inv_temp = 0.0 if self.greedy else 1.0 / params.temperature
        # Plain temperature sampling (the usual OpenAI request) is an exact categorical draw
        # over softmax(logits / T), done vectorised: 0.3 ms instead of the chain's 2 ms over
        # 262k tokens. A logit bias is added to a copy of the logits first, as the chain's bias
        # sampler would (through the chain every step cost Gemma several milliseconds a token);
        # anything more (top-k/p, min-p, penalties, or a bias when greedy) goes through the chain.
        self.plain = not (params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0
                          or params.frequency_penalty or params.presence_penalty
                          or (params.logit_bias and self.greedy))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        self.rng = np.random.default_rng((seed + seed_offset) & 0xFFFFFFFF)
        self.penalised = bool(params.frequency_penalty or params.presence_penalty)
        self.bias_tokens = np.array(sorted({t for t, _ in params.logit_bias}), dtype=np.int64)
        totals: dict[int, float] = {}
        for tok, value in params.logit_bias:  # the chain's sampler adds each entry, so do we
            totals[tok] = totals.get(tok, 0.0) + value
        self.bias = np.array([totals[t] for t in self.bias_tokens.tolist()], dtype=np.float32)
        self.history: list[int] = []
        self.chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lambda smpl: lc.llama_sampler_chain_add(self.chain, smpl)  # noqa: E731
        if params.logit_bias and not self.plain:
            arr = (lc.llama_logit_bias * len(params.logit_bias))()
            for i, (tok, bias) in enumerate(params.logit_bias):
                arr[i].token = tok
                arr[i].bias = bias
            add(lc.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), arr))
        if self.penalised:
            add(lc.llama_sampler_init_penalties(n_vocab, penalty_window, 1.0,
                                                params.frequency_penalty, params.presence_penalty))
        if self.greedy:
            add(lc.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(lc.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(lc.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(lc.llama_sampler_init_min_p(params.min_p, 1))
        add(lc.llama_sampler_init_temp(params.temperature))
        add(lc.llama_sampler_init_dist((seed + seed_offset) & 0xFFFFFFFF))

    def sample(self, ctx: ctypes.c_void_p, logits: np.ndarray, batch_index: int) -> int:
        if self.plain and self.grammar is None and not self.greedy:
            return self._draw(self._blocks(logits, add_bias=True))  # no copy for the bias
        if self.plain and self.bias_tokens.size:
            logits = self._biased(logits)
        if self.grammar is not None:
            return self._sample_constrained(logits)
        if self.greedy:
            return lc.llama_sampler_sample(self.chain, ctx, batch_index)
        return self._through_chain(self._candidates(logits), logits)

    # --- constrained output -------------------------------------------------------------------
    def _sample_constrained(self, logits: np.ndarray) -> int:
        """A token the grammar allows, drawn from the model's distribution restricted to the
        allowed tokens (greedy: the best allowed one), then fed to the grammar."""
        if self.greedy and not self.penalised and not self.bias_tokens.size:
            token = self._best_allowed(logits)
        elif self.plain:
            token = self._categorical_allowed(logits)
        else:
            token = self._chain_allowed(logits)
        if token != DEAD_END:
            lc.llama_sampler_accept(self.grammar, token)
        return token

    def _allowed(self, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The ids among `ids` that the grammar allows next."""
        data, arr = _token_array(ids, logits)
        lc.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return data["id"][np.isfinite(data["logit"])].astype(np.int64)

    def _fits(self, token: int, logits: np.ndarray) -> bool:
        return bool(self._allowed(np.array([token], dtype=np.int64), logits).size)

    def _best_allowed(self, logits: np.ndarray) -> int:
        best = int(np.argmax(logits))
        if self._fits(best, logits):
            return best
        for k in GREEDY_CHUNKS:
            if k >= self.n_vocab:
                break
            top = np.argpartition(-logits, k)[:k]
            ok = self._allowed(top, logits)
            if ok.size:
                return int(ok[np.argmax(logits[ok])])
        ok = self._allowed(np.arange(self.n_vocab), logits)
        return int(ok[np.argmax(logits[ok])]) if ok.size else DEAD_END

    def _categorical_allowed(self, logits: np.ndarray) -> int:
        """Rejection sampling (exact: a free draw kept only if allowed); then a draw over the
        allowed tokens among the most likely, a growing chunk at a time, until the tokens left
        out could hold at most TAIL of the allowed mass (nothing measurable). Past the last
        chunk (4,096 tokens) the draw keeps to the allowed tokens in it: masking Gemma's whole
        vocabulary costs 60 ms a token, and llama.cpp's own sampler keeps only 40. The whole
        vocabulary is masked only when none of those 4,096 is allowed."""
        mass = self._blocks(logits, add_bias=False)  # the logits come biased
        for _ in range(REJECTION_TRIES):
            token = self._draw(mass)
            if self._fits(token, logits):
                return token
        weights = mass[0].reshape(-1)[:self.n_vocab]
        total = float(mass[1][-1])
        for k in (*SAMPLE_CHUNKS, self.n_vocab):
            top = (np.argpartition(-logits, k)[:k] if k < self.n_vocab
                   else np.arange(self.n_vocab))
            ok = self._allowed(top, logits)
            if not ok.size:
                continue
            w = weights[ok].astype(np.float64)
            left_out = total - float(weights[top].sum(dtype=np.float64))
            if left_out <= TAIL * float(w.sum()) or k >= SAMPLE_CHUNKS[-1]:
                cum = np.cumsum(w)
                i = min(int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right")),
                        len(ok) - 1)
                return int(ok[i])
        return DEAD_END

    def _chain_allowed(self, logits: np.ndarray) -> int:
        """The allowed tokens among the candidates through the sampler chain (bias, penalties,
        top-k/p, min-p, temperature)."""
        cand = self._allowed(self._candidates(logits), logits)
        if not cand.size:
            cand = self._allowed(np.arange(self.n_vocab), logits)
            if not cand.size:
                return DEAD_END
        return self._through_chain(cand, logits)

    def _through_chain(self, cand: np.ndarray, logits: np.ndarray) -> int:
        """The chain's choice among the candidate tokens, accepted into its state."""
        data, arr = _token_array(cand, logits)
        lc.llama_sampler_apply(self.chain, ctypes.byref(arr))
        token = int(data["id"][arr.selected])
        lc.llama_sampler_accept(self.chain, token)
        if self.penalised:
            self.history.append(token)
        return token

    def _candidates(self, logits: np.ndarray) -> np.ndarray:
        """Every token that could matter: those near the best logit, plus any token whose logit
        the bias or the penalties may move (they are always kept, so nothing is cut unfairly)."""
        special = self.bias_tokens
        if self.history:
            special = np.union1d(special, np.fromiter(set(self.history), dtype=np.int64))
        if special.size:
            masked = logits.copy()
            masked[special] = -np.inf
            best = float(masked.max())
        else:
            best = float(logits.max())
        near = np.flatnonzero(logits >= best - RIGOROUS_LOGITS / (self.inv_temp or 1.0))
        return np.union1d(near, special) if special.size else near

    def _biased(self, logits: np.ndarray) -> np.ndarray:
        out = logits.copy()
        out[self.bias_tokens] += self.bias
        return out

    def _blocks(self, logits: np.ndarray, add_bias: bool) -> tuple[np.ndarray, np.ndarray]:
        """softmax(logits / T) plus the logit bias, unnormalised, in blocks, with the blocks'
        cumulative mass. Each pass over Gemma's 262k logits costs about as much as the
        exponentials, so there are three: the max, the scaling, the exponentials (then the
        block sums). The weights need no shift by the max while the largest scaled logit
        lies in [SHIFT_FREE_LOW, SHIFT_FREE_HIGH]: nothing overflows, and what underflows
        weighs under e^-67 of the best token. The few biased tokens are set afterwards."""
        n = logits.shape[0]
        weights = _buffer(n)
        w = weights[:n]
        inv_temp = np.float32(self.inv_temp)
        top = float(logits.max())
        add_bias = add_bias and bool(self.bias_tokens.size)
        if add_bias:
            biased = logits[self.bias_tokens] + self.bias
            top = max(top, float(biased.max()))
        shift = np.float32(top * self.inv_temp)
        np.multiply(logits, inv_temp, out=w)
        unshifted = SHIFT_FREE_LOW <= shift <= SHIFT_FREE_HIGH
        if not unshifted:
            np.subtract(w, shift, out=w)
        np.exp(w, out=w)
        if add_bias:
            w[self.bias_tokens] = np.exp(biased * inv_temp - (0 if unshifted else shift))
        blocks = weights.reshape(-1, BLOCK)
        # Each block summed in float32 (pairwise, 512 terms: relative error about 1e-7), the
        # blocks' running total in float64: summing every weight as float64 took as long as
        # the exponentials themselves.
        mass = np.cumsum(blocks.sum(axis=1), dtype=np.float64)
        if unshifted and not mass[-1] >= MIN_MASS:  # the best token was biased far down
            return self._shifted_blocks(self._biased(logits) if add_bias else logits, weights)
        return blocks, mass

    def _shifted_blocks(self, logits: np.ndarray, weights: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        """The same with the max subtracted first, so the best token weighs exactly 1."""
        w = weights[:logits.shape[0]]
        np.subtract(logits, logits.max(), out=w)
        np.multiply(w, np.float32(self.inv_temp), out=w)
        np.exp(w, out=w)
        blocks = weights.reshape(-1, BLOCK)
        return blocks, np.cumsum(blocks.sum(axis=1), dtype=np.float64)

    def _draw(self, mass: tuple[np.ndarray, np.ndarray]) -> int:
        """Exact draw from softmax(logits / T): pick a block by its mass, then a token in it."""
        blocks, block_mass = mass
        u = self.rng.random() * block_mass[-1]
        b = min(int(np.searchsorted(block_mass, u, side="right")), len(block_mass) - 1)
        inner = np.cumsum(blocks[b], dtype=np.float64)
        rest = u - (block_mass[b - 1] if b else 0.0)
        i = min(int(np.searchsorted(inner, rest, side="right")), BLOCK - 1)
        while blocks[b, i] == 0.0 and i > 0:  # never land on padding or a zero-weight token
            i -= 1
        return b * BLOCK + i

    def close(self) -> None:
        if self.chain:
            lc.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar:
            lc.llama_sampler_free(self.grammar)
            self.grammar = None


_local = threading.local()


def _buffer(n: int) -> np.ndarray:
    """This thread's buffer for the weights of a draw over n logits, padded to whole blocks
    with zeros: one per thread, not per sequence, so that it stays in the core's cache from
    one sequence to the next (it is a megabyte over Gemma's vocabulary). A draw's weights
    are used before its thread draws again."""
    buf: np.ndarray | None = getattr(_local, "weights", None)
    if buf is None or getattr(_local, "n", None) != n:  # the padding must hold zeros
        buf = _local.weights = np.zeros(n + (-n) % BLOCK, dtype=np.float32)
        _local.n = n
    return buf


def _token_array(ids: np.ndarray, logits: np.ndarray
                 ) -> tuple[np.ndarray, lc.llama_token_data_array]:
    """Candidate tokens as llama.cpp's token data array, over a numpy buffer that the
    samplers edit in place (the buffer must outlive the array's use)."""
    data = np.empty(len(ids), dtype=TOKEN_DATA)
    data["id"] = ids
    data["logit"] = logits[ids]
    data["p"] = 0.0
    arr = lc.llama_token_data_array(
        data=data.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)), size=len(ids),
        selected=-1, sorted=False)
    return data, arr


def token_logprob(logits: np.ndarray, token: int, top_n: int, describe: Describe) -> TokenLogprob:
    """Log-probability of token under the model's own distribution, with the top_n alternatives."""
    x = logits
    m = float(x.max())
    lse = m + float(np.log(np.exp(x - m).sum(dtype=np.float64)))
    text, raw = describe(token)
    top: list[tuple[str, list[int], float]] = []
    if top_n > 0:
        idx = np.argpartition(-x, top_n)[:top_n]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        for t in idx.tolist():
            t_text, t_raw = describe(t)
            top.append((t_text, t_raw, float(x[t]) - lse))
    return TokenLogprob(token=text, bytes=raw, logprob=float(x[token]) - lse, top=top)
