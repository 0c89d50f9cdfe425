"""What the token-level local engines (llama.cpp, PyTorch) share: prompts rendered and
tokenised here, in this process, so their counts are exact before admission."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from bastion.engines.base import (BaseEngine, ChatPrompt, EmbeddingPrompt, ModelInputError,
                                  PreparedPrompt, Prompt, PromptSource, TextPrompt)

# Private-use code points: they never occur in chat templates, and mark where message text goes.
MARK_OPEN, MARK_CLOSE = "\ue000", "\ue001"
MARKS = re.compile(f"{MARK_OPEN}(\\d+){MARK_CLOSE}")


def shadow_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with a marker in place of each content, for the template to place: the
    engine tokenises the marked text without special tokens. An empty content stays empty
    (a template's `if message.content` then sees it so), and a `literal` one (a tool result
    without special-token text) is given as it is, so that a template's filters on it (Llama
    3.1 writes a result through `tojson`) render as in transformers."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        literal = m.pop("literal", False)
        if m["content"] and not literal:
            m["content"] = f"{MARK_OPEN}{i}{MARK_CLOSE}"
        out.append(m)
    return out


class TokenEngine(BaseEngine):
    """An engine that takes token ids: subclasses give tokenize, render_chat,
    render_chat_media (vision engines), infill_tokens and detokenize."""

    name: str

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        raise NotImplementedError

    def render_chat(self, messages: list[dict[str, Any]], *,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        raise NotImplementedError

    def render_chat_media(self, messages: list[dict[str, Any]], *,
                          tools: list[dict[str, Any]] | None = None) -> Prompt:
        raise ModelInputError("This model does not take images.", code="model_not_supported")

    def has_special_text(self, text: str) -> bool:
        """Whether `text` holds the text of a special token (a turn marker): tokenised with
        special tokens parsed, it differs from the plain tokenisation."""
        raise NotImplementedError

    def infill_tokens(self, prefix: str, suffix: str) -> list[int]:
        raise ModelInputError(f"The model '{self.name}' cannot use suffix: it has no "
                              f"fill-in-the-middle tokens.", param="suffix",
                              code="unsupported_parameter")

    def detokenize(self, tokens: list[int]) -> str:
        raise NotImplementedError

    async def count_prompt(self, source: PromptSource) -> PreparedPrompt:
        """Rendered and tokenised on a worker thread (a long prompt would hold the loop)."""
        if isinstance(source, ChatPrompt):
            return await asyncio.to_thread(self._render, source)
        if isinstance(source, TextPrompt):
            return await asyncio.to_thread(self._text, source)
        return await super().count_prompt(source)

    def _render(self, source: ChatPrompt) -> PreparedPrompt:
        """Roles and contents (a message's name is not part of a local template, but for a
        tool result's), and the tool calls and tool ids the service left for a template that
        renders them; a content list without images is its text joined."""
        plain: list[dict[str, Any]] = []
        media = False
        for m in source.messages:
            content = m.get("content") or ""
            if isinstance(content, list):
                if any(p.get("type") == "image" for p in content):
                    media = True
                else:
                    content = "".join(p.get("text", "") for p in content)
            msg = {"role": m["role"], "content": content}
            for key in ("tool_calls", "tool_call_id"):
                if m.get(key):
                    msg[key] = m[key]
            if m["role"] == "tool":  # only a template that renders tools sees this role
                if m.get("name"):
                    msg["name"] = m["name"]
                if isinstance(content, str) and not self.has_special_text(content):
                    msg["literal"] = True
            plain.append(msg)
        self._check_tool_text(source.tools, plain)
        if media:
            rendered = self.render_chat_media(plain, tools=source.tools)
            return PreparedPrompt(len(rendered.tokens), tokens=rendered.tokens,
                                  media=rendered.media)
        tokens = self.render_chat(plain, tools=source.tools)
        return PreparedPrompt(len(tokens), tokens=tokens)

    def _check_tool_text(self, tools: list[dict[str, Any]] | None,
                         messages: list[dict[str, Any]]) -> None:
        """Tools and tool calls that a template renders become template text, tokenised with
        its special tokens (message contents never are): a client who writes a turn marker
        into a tool's description or a call's arguments must not get a turn of its own."""
        calls = [m["tool_calls"] for m in messages if m.get("tool_calls")]
        labels = [m.get(k) for m in messages for k in ("name", "tool_call_id") if m.get(k)]
        if not (tools or calls or labels):
            return
        if self.has_special_text(json.dumps([tools, calls, labels], ensure_ascii=False)):
            raise ModelInputError(
                "The tools or tool calls contain the text of one of this model's special "
                "tokens (a turn marker); remove it.", param="tools", code="invalid_value")

    def _text(self, source: TextPrompt) -> PreparedPrompt:
        p = source.text
        if source.suffix is not None:
            if not isinstance(p, str):
                raise ModelInputError("suffix needs a text prompt, not token ids.",
                                      param="suffix", code="invalid_value")
            tokens = self.infill_tokens(p, source.suffix)
        elif isinstance(p, str):
            tokens = self.tokenize(p)
        else:
            check_token_ids(p, self.info.vocab_size, source.param)  # type: ignore[attr-defined]
            tokens = list(p)
        text = p if isinstance(p, str) else self.detokenize(p)
        pieces = [self.detokenize([t]) for t in tokens] if source.pieces else None
        return PreparedPrompt(len(tokens), tokens=tokens, text=text, pieces=pieces)


def check_token_ids(tokens: list[int], vocab_size: int, param: str) -> None:
    for t in tokens:
        if t < 0 or t >= vocab_size:
            raise ModelInputError(
                f"Token id {t} in '{param}' is outside this model's vocabulary (0 to "
                f"{vocab_size - 1}).", param=param, code="invalid_token_id")


def embedding_inputs(source: EmbeddingPrompt, sequences: list[list[int]], *, vocab_size: int,
                     limit: int, model: str) -> PreparedPrompt:
    """An embedding request's inputs as their engine runs them, checked alike by every local
    embedding engine (sentence-transformers, llama.cpp), so a client gets the same errors from
    either: `sequences` holds each text input tokenised (without special tokens) and each
    token array as sent; token ids must be in the vocabulary, no input may be empty, and none
    longer than `limit` tokens unless the request says truncate (then it is cut to `limit`)."""
    out: list[list[int]] = []
    for value, seq, param in zip(source.inputs, sequences, source.params):
        if not isinstance(value, str):
            check_token_ids(seq, vocab_size, param)
        if not seq:
            raise ModelInputError(f"'{param}' has no tokens for this model.", param=param,
                                  code="empty_input")
        if len(seq) > limit:
            if not source.truncate:
                raise ModelInputError(
                    f"'{param}' is {len(seq)} tokens, but the model '{model}' embeds at most "
                    f"{limit} tokens per input. Shorten it, or send \"truncate\": true to embed "
                    f"only its first {limit} tokens.", param=param, code="context_length_exceeded")
            seq = seq[:limit]
        out.append(seq)
    return PreparedPrompt(sum(map(len, out)), payload=out)
