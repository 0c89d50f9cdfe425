"""Constrained output for engines that sample in Python (PyTorch): the same GBNF grammar the
llama.cpp engine uses (engines/grammar.py), run by llguidance as a token mask per step."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from bastion.engines.base import ModelInputError, OutputFormat
from bastion.engines.grammar import gbnf

COMPILED = 64  # grammars kept per model


class TokenMasks:
    """llguidance's view of one Hugging Face tokenizer, and the grammars compiled for it."""

    def __init__(self, tokenizer: Any, n_vocab: int, eos: list[int]) -> None:
        import llguidance.hf

        self.n_vocab = n_vocab
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab,
                                                       eos_token=eos)
        self._lock = threading.Lock()
        self._grammars: OrderedDict[str, str] = OrderedDict()

    def matcher(self, output: OutputFormat) -> "SequenceMask":
        import llguidance
        from llguidance.gbnf_to_lark import gbnf_to_lark

        text = gbnf(output)
        with self._lock:
            grammar = self._grammars.get(text)
            if grammar is None:
                grammar = llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(text))
                self._grammars[text] = grammar
                while len(self._grammars) > COMPILED:
                    self._grammars.popitem(last=False)
            else:
                self._grammars.move_to_end(text)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar)
        if matcher.is_error():
            raise ModelInputError(f"The grammar of this schema is invalid: {matcher.get_error()}",
                                  param="response_format", code="invalid_schema")
        return SequenceMask(matcher, self.n_vocab)


class SequenceMask:
    """One sequence's grammar state: the tokens allowed next, and the token taken."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        import llguidance.numpy as lnp

        self._matcher = matcher
        self._bitmask = lnp.allocate_token_bitmask(1, n_vocab)

    def apply(self, logits: np.ndarray) -> bool:
        """Set the logits of disallowed tokens to -inf, in place; False if none is allowed."""
        import llguidance.numpy as lnp

        lnp.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        lnp.apply_token_bitmask_inplace(logits.reshape(1, -1), self._bitmask)
        return bool(np.isfinite(logits).any())

    def take(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise ModelInputError(f"The grammar refused token {token}: "
                                  f"{self._matcher.get_error()}")
