"""GBNF grammars (engines/grammar.py) as llama.cpp grammar samplers, compiled once per
grammar and cloned per sequence."""

from __future__ import annotations

import threading
from collections import OrderedDict

import llama_cpp as lc

from bastion.engines.base import ModelInputError, OutputFormat
from bastion.engines.grammar import gbnf

PROTOTYPES = 64  # compiled grammars kept per model


class Grammars:
    """Compiled grammar samplers of one model, least recently used dropped first. Cloning a
    compiled sampler copies its parsed rules, so a schema is parsed once, not per sequence."""

    def __init__(self, vocab: lc.llama_vocab_p) -> None:
        self._vocab = vocab
        self._lock = threading.Lock()
        self._compiled: OrderedDict[str, lc.llama_sampler_p] = OrderedDict()

    def sampler(self, output: OutputFormat) -> lc.llama_sampler_p:
        """A fresh grammar sampler for one sequence (the caller frees it)."""
        text = gbnf(output)
        with self._lock:
            proto = self._compiled.get(text)
            if proto is None:
                proto = lc.llama_sampler_init_grammar(self._vocab, text.encode(), b"root")
                if not proto:
                    raise ModelInputError("llama.cpp could not parse the grammar of this schema.",
                                          param="response_format", code="invalid_schema")
                self._compiled[text] = proto
                while len(self._compiled) > PROTOTYPES:
                    lc.llama_sampler_free(self._compiled.popitem(last=False)[1])
            else:
                self._compiled.move_to_end(text)
            return lc.llama_sampler_clone(proto)

    def close(self) -> None:
        with self._lock:
            for proto in self._compiled.values():
                lc.llama_sampler_free(proto)
            self._compiled.clear()
