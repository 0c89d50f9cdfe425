"""Chat templates: the GGUF's own (rendered in Jinja's sandbox) or a named built-in."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.exceptions import SecurityError

from bastion.engines.base import ModelFailure, ModelInputError
from bastion.engines.chat_format import takes_tools, template_family, tojson
from bastion.engines.llamacpp.sandbox import (MIN_OUTPUT_CHARS, BoundedSandbox, RenderLimitError,
                                              input_chars, render_bounded)

BUILTIN_TEMPLATES: dict[str, str] = {
    # Gemma's turn format; a system prompt is folded into the first user turn, as Gemma does.
    "gemma": (
        "{{ bos_token }}"
        "{% set ns = namespace(system='') %}"
        "{% for m in messages %}"
        "{% if m.role == 'system' %}{% set ns.system = ns.system + m.content + '\n\n' %}"
        "{% else %}"
        "{% set role = 'model' if m.role == 'assistant' else 'user' %}"
        "<start_of_turn>{{ role }}\n"
        "{% if role == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
        "{{ m.content }}<end_of_turn>\n"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
}


class TemplateRenderError(ModelInputError):
    """The template refused or could not render the client's messages."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_messages", param="messages")


def _raise(message: str) -> None:
    raise TemplateRenderError(f"The model's chat template rejected the messages: {message}")


PROBE_MESSAGES = [{"role": "system", "content": "You are helpful."},
                  {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hi."},
                  {"role": "user", "content": "Bye"}]


class ChatTemplate:
    """A compiled chat template; untrusted GGUF templates cannot reach Python internals, and
    one render is bounded in time and size (see sandbox.py)."""

    def __init__(self, source: str, *, bos_token: str, eos_token: str, name: str) -> None:
        env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                             extensions=["jinja2.ext.loopcontrols"],
                             filters={"tojson": tojson})
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name
        self.family = template_family(source)  # the tool-call syntax its model knows
        self.takes_tools = takes_tools(source)  # it renders OpenAI `tools` itself
        self.broken: ModelFailure | None = None
        self._probe()

    def _probe(self) -> None:
        """Render a plain conversation once at load: a template that blows its limits on
        every input is marked broken, and its requests fail at once instead of each spending
        the whole time limit. Other failures wait for a real request (a template may refuse a
        system message, which says nothing about its safety)."""
        try:
            self.render(PROBE_MESSAGES)
        except ModelFailure as exc:
            if isinstance(exc.__cause__, RenderLimitError):
                self.broken = exc
        except TemplateRenderError:
            pass

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        """`tools` (OpenAI function tools) only for a template that takes them."""
        if self.broken is not None:
            raise ModelFailure(str(self.broken), code="unsafe_chat_template")
        variables = {"messages": messages, "bos_token": self.bos_token,
                     "eos_token": self.eos_token, "add_generation_prompt": add_generation_prompt}
        if tools is not None:
            variables["tools"] = tools
        try:
            return render_bounded(
                self.template, variables,
                max_chars=MIN_OUTPUT_CHARS + 4 * input_chars([messages, tools]))
        except TemplateRenderError:
            raise
        except SecurityError as exc:  # the operator's model is at fault, not the client
            raise ModelFailure(f"The model's chat template attempted an unsafe operation and was "
                             f"stopped by the sandbox: {exc}", code="unsafe_chat_template") from exc
        except (TemplateError, TypeError, ValueError, KeyError, IndexError,
                ArithmeticError) as exc:
            raise TemplateRenderError(
                f"The model's chat template could not render these messages: {exc}") from exc


def pick_template(*, gguf_template: str | None, name: str | None, bos_token: str,
                  eos_token: str) -> ChatTemplate:
    """A named built-in wins when configured, else the GGUF's template, else Gemma's format."""
    if name:
        if name not in BUILTIN_TEMPLATES:
            known = ", ".join(sorted(BUILTIN_TEMPLATES))
            raise ValueError(f"unknown chat template {name!r}; built-in templates: {known}")
        return ChatTemplate(BUILTIN_TEMPLATES[name], bos_token=bos_token, eos_token=eos_token,
                            name=name)
    if gguf_template:
        return ChatTemplate(gguf_template, bos_token=bos_token, eos_token=eos_token, name="gguf")
    return ChatTemplate(BUILTIN_TEMPLATES["gemma"], bos_token=bos_token, eos_token=eos_token,
                        name="gemma")
