"""JSON Schema -> GBNF (llama-cpp-python's converter) -> llama.cpp grammar samplers, compiled
once per schema and cloned per sequence."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from functools import lru_cache

import llama_cpp as lc
from llama_cpp.llama_grammar import BuiltinRule, SchemaConverter

from bastion.engines.base import ModelInputError, OutputFormat

PROTOTYPES = 64  # compiled grammars kept per model


# JSON strings hold no raw control characters (json.loads and pydantic refuse them); the
# converter's own rule lets a newline through.
STRICT_CHAR = BuiltinRule(
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])',
    [])


class _Converter(SchemaConverter):
    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return super()._add_primitive(name, STRICT_CHAR if name == "char" else rule)


@lru_cache(maxsize=256)
def gbnf(output: OutputFormat) -> str:
    """The GBNF grammar of an output format. The converter's whitespace rule is a single
    optional space, so a model cannot pad its answer with whitespace until max_tokens."""
    try:
        converter = _Converter(prop_order={}, allow_fetch=False, dotall=False,
                                    raw_pattern=False)
        if not output.open:
            _visit(converter, output.schema, "")
            return converter.format_grammar()
        _visit(converter, output.schema, "wrapped-value")
        one = f"{_literal(output.open)} wrapped-value {_literal(output.close)}"
        body = one
        for _ in range(output.count - 1):  # nested optionals: at most `count` values
            body = f'{one} ("\\n" {body})?'

        if output.instead == "text":
            first = output.open[0].replace("\\", "\\\\").replace("]", "\\]")
            root = f"[^{first}]* ({body})?"
        elif output.instead:
            _visit(converter, output.instead, "answer-value")
            root = f"answer-value | {body}"
        else:
            root = body
        return f"root ::= {root}\n" + converter.format_grammar()
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError) as exc:
        raise ModelInputError(f"The JSON schema cannot be turned into a grammar: {exc}",
                              param="response_format", code="invalid_schema") from exc


def _visit(converter: _Converter, schema: str, name: str) -> None:
    parsed = converter.resolve_refs(json.loads(schema), "")
    converter.visit(parsed, name)


def _literal(text: str) -> str:
    """A GBNF string literal (its escapes are JSON's for what a tag can hold)."""
    return json.dumps(text)


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
