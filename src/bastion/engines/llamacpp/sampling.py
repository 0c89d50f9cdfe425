"""Per-sequence llama.cpp sampler chains (sampling stays in C) and OpenAI-style logprobs."""

from __future__ import annotations

import ctypes
import random

import llama_cpp as lc
import numpy as np

from bastion.engines.base import SamplingParams, TokenLogprob


def build_chain(params: SamplingParams, *, n_vocab: int, penalty_window: int,
                seed_offset: int = 0) -> ctypes.c_void_p:
    """A fresh sampler chain for one sequence; the caller frees it with free_chain."""
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    add = lambda smpl: lc.llama_sampler_chain_add(chain, smpl)  # noqa: E731
    if params.logit_bias:
        arr = (lc.llama_logit_bias * len(params.logit_bias))()
        for i, (tok, bias) in enumerate(params.logit_bias):
            arr[i].token = tok
            arr[i].bias = bias
        add(lc.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), arr))
    if params.frequency_penalty or params.presence_penalty:
        add(lc.llama_sampler_init_penalties(penalty_window, 1.0, params.frequency_penalty,
                                            params.presence_penalty))
    if params.temperature <= 0.0:
        add(lc.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(lc.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(lc.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(lc.llama_sampler_init_min_p(params.min_p, 1))
    add(lc.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    add(lc.llama_sampler_init_dist((seed + seed_offset) & 0xFFFFFFFF))
    return chain


def free_chain(chain: ctypes.c_void_p | None) -> None:
    if chain:
        lc.llama_sampler_free(chain)


def sample(chain: ctypes.c_void_p, ctx: ctypes.c_void_p, batch_index: int) -> int:
    return lc.llama_sampler_sample(chain, ctx, batch_index)


def token_logprob(logits: np.ndarray, token: int, top_n: int,
                  describe: "callable[[int], tuple[str, list[int]]]") -> TokenLogprob:
    """Log-probability of token under the model's own distribution, with the top_n alternatives."""
    x = logits.astype(np.float32, copy=False)
    m = float(x.max())
    lse = m + float(np.log(np.exp(x - m, dtype=np.float32).sum(dtype=np.float64)))
    text, raw = describe(token)
    top: list[tuple[str, list[int], float]] = []
    if top_n > 0:
        idx = np.argpartition(-x, top_n)[:top_n]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        for t in idx.tolist():
            t_text, t_raw = describe(t)
            top.append((t_text, t_raw, float(x[t]) - lse))
    return TokenLogprob(token=text, bytes=raw, logprob=float(x[token]) - lse, top=top)
