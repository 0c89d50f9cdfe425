"""OutputFormat -> GBNF: the grammar every engine enforces (llama.cpp as a grammar sampler,
PyTorch as a token mask). Made with llama-cpp-python's JSON Schema converter, in pure Python."""

from __future__ import annotations

import json
from functools import lru_cache

from llama_cpp.llama_grammar import BuiltinRule, SchemaConverter

from bastion.engines.base import ModelInputError, OutputFormat


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
        if not (output.open or output.calls):
            _visit(converter, output.schema, "")
            return converter.format_grammar()
        _visit(converter, output.schema, "wrapped-value")
        one = " ".join(part for part in (_literal(output.open), "wrapped-value",
                                         _literal(output.close)) if part != '""')
        body = one
        for _ in range(output.count - 1):  # nested optionals: at most `count` values
            body = f'{one} ({_literal(output.sep)} {body})?'

        if output.instead == "text":
            # free text cannot hold the first character of a call (its tag, or the JSON
            # object's brace for bare calls): where it does, the calls begin
            first = (output.open or "{")[0].replace("\\", "\\\\").replace("]", "\\]")
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
