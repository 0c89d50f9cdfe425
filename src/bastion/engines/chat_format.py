"""What a chat template says about tool calling: which family's call syntax its model was
trained on, and whether it renders OpenAI `tools` itself (as Hugging Face templates that take
a `tools` variable do). Read once, from the template's text, when a model loads."""

from __future__ import annotations

import json
from typing import Any

from jinja2 import Environment, TemplateSyntaxError, nodes

# The families with a built-in tool prompt (services/tools.py), by the marker that tells them:
# a template that writes <tool_call> (Qwen, Hermes, SmolLM3) is Hermes' whatever its turns;
# then Llama 3's header tokens, Gemma's turns, ChatML's; anything else gets Hermes' format.
FAMILY_MARKERS = (("<tool_call>", "chatml"), ("<|start_header_id|>", "llama3"),
                  ("<start_of_turn>", "gemma"), ("<|im_start|>", "chatml"))
DEFAULT_FAMILY = "chatml"


def template_family(source: str) -> str:
    for marker, family in FAMILY_MARKERS:
        if marker in source:
            return family
    return DEFAULT_FAMILY


def takes_tools(source: str) -> bool:
    """Whether the template reads a `tools` variable. Only parsed, never compiled: Jinja's
    code generator folds constants (meta.find_undeclared_variables runs it), and a template's
    `10**10**10` would then run here, outside the sandbox's bounds."""
    try:
        ast = Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except (TemplateSyntaxError, RecursionError, ValueError):
        return False
    return any(n.name == "tools" and n.ctx == "load" for n in ast.find_all(nodes.Name))


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
           separators: Any = None, sort_keys: bool = False) -> str:
    """Jinja's `tojson` as Hugging Face renders templates: plain JSON, not HTML-escaped
    (Jinja's own writes `<` as `\\u003c`, which the model never saw in training)."""
    indent = min(indent, 16) if isinstance(indent, int) else None  # bounded: no huge padding
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=tuple(separators) if separators else None, sort_keys=sort_keys)
