"""Per-sequence llama.cpp sampler chains (sampling stays in C) and OpenAI-style logprobs."""

from __future__ import annotations

import ctypes
import random
from typing import Callable

import llama_cpp as lc
import numpy as np

from bastion.engines.base import SamplingParams, TokenLogprob

# A token whose logit is this many temperature-scaled units below the best one has probability
# below e^-30 of it; all 262k such tokens together weigh under 3e-8, so leaving them out of the
# candidate set changes nothing measurable, while the chain then runs on a few hundred candidates
# instead of the whole vocabulary (full-vocabulary softmax + sampling costs ~2 ms per token).
PREFILTER_LOGITS = 30.0
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
Describe = Callable[[int], tuple[str, list[int]]]


class SequenceSampler:
    """One sequence's sampler chain: logit bias, penalties, top-k, top-p, min-p, temperature,
    seeded distribution; or greedy at temperature 0."""

    def __init__(self, params: SamplingParams, *, n_vocab: int, penalty_window: int,
                 seed_offset: int = 0) -> None:
        self.greedy = params.temperature <= 0.0
        self.margin = PREFILTER_LOGITS * params.temperature
        self.penalised = bool(params.frequency_penalty or params.presence_penalty)
        self.bias_tokens = np.array(sorted({t for t, _ in params.logit_bias}), dtype=np.int64)
        self.history: list[int] = []
        self.chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lambda smpl: lc.llama_sampler_chain_add(self.chain, smpl)  # noqa: E731
        if params.logit_bias:
            arr = (lc.llama_logit_bias * len(params.logit_bias))()
            for i, (tok, bias) in enumerate(params.logit_bias):
                arr[i].token = tok
                arr[i].bias = bias
            add(lc.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), arr))
        if self.penalised:
            add(lc.llama_sampler_init_penalties(penalty_window, 1.0, params.frequency_penalty,
                                                params.presence_penalty))
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
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        add(lc.llama_sampler_init_dist((seed + seed_offset) & 0xFFFFFFFF))

    def sample(self, ctx: ctypes.c_void_p, logits: np.ndarray, batch_index: int) -> int:
        if self.greedy:
            return lc.llama_sampler_sample(self.chain, ctx, batch_index)
        cand = self._candidates(logits)
        data = np.empty(len(cand), dtype=TOKEN_DATA)
        data["id"] = cand
        data["logit"] = logits[cand]
        data["p"] = 0.0
        arr = lc.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)), size=len(cand),
            selected=-1, sorted=False)
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
        near = np.flatnonzero(logits >= best - self.margin)
        return np.union1d(near, special) if special.size else near

    def close(self) -> None:
        if self.chain:
            lc.llama_sampler_free(self.chain)
            self.chain = None


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
