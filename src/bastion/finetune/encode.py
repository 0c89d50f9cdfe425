"""Training examples to tokens, with labels on the assistant's (or completion's) tokens only.
Encoding uses the serving engine's own chat rendering, so a fine-tuned model is trained on
exactly the tokens it will be prompted with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bastion.models.catalog import Catalog, Deployment
from bastion.config import Settings
from bastion.engines.llamacpp.engine import render_chat_tokens
from bastion.engines.llamacpp.model import LlamaModel
from bastion.engines.llamacpp.templates import ChatTemplate, pick_template
from bastion.files.validate import Summary, validate_jsonl
from bastion.finetune.trainable import default_base

IGNORE = -100  # label of a token the loss skips (prompt tokens)


@dataclass
class ChatTokenizer:
    model: LlamaModel
    template: ChatTemplate

    @classmethod
    def load(cls, gguf: Path) -> "ChatTokenizer":
        """The vocabulary and chat template of a GGUF, without its weights."""
        m = LlamaModel(gguf, n_seq=1, ctx_per_seq=1, n_batch=1, threads=1, vocab_only=True)
        template = pick_template(gguf_template=m.chat_template(), name=None,
                                 bos_token=m.token_text(m.bos), eos_token=m.token_text(m.eos))
        return cls(m, template)

    def chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        return render_chat_tokens(self.model, self.template, messages,
                                  add_generation_prompt=add_generation_prompt)

    def text(self, text: str, *, bos: bool = False) -> list[int]:
        return self.model.tokenize(text, add_special=bos and self.model.add_bos,
                                   parse_special=False)


def _messages(example: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "system" if m["role"] == "developer" else m["role"],
             "content": m["content"]} for m in example["messages"]]


def encode(example: dict[str, Any], tok: ChatTokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one validated example; labels are IGNORE outside what the model
    should learn to say, which includes the end-of-turn token after each answer."""
    if "messages" not in example:
        ids = tok.text(example["prompt"], bos=True)
        n_prompt = len(ids)
        ids += tok.text(example["completion"]) + [tok.model.eos]
        return ids, [IGNORE] * n_prompt + ids[n_prompt:]
    messages = _messages(example)
    ids = tok.chat(messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(example["messages"]):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        prefix = tok.chat(messages[:i], add_generation_prompt=True)
        answer = tok.text(m["content"])
        end = len(prefix) + len(answer) + 1  # the answer and the token that closes the turn
        if ids[:len(prefix)] != prefix or ids[len(prefix):end - 1] != answer:
            raise ValueError("the chat template does not render this conversation as a "
                             "sequence of turns, so the answers cannot be located in it")
        labels[len(prefix):end] = ids[len(prefix):end]
    return ids, labels


def max_example_tokens(context_length: int, settings: Settings) -> int:
    return min(context_length, settings.fine_tune_max_tokens)


def checker_for(tok: ChatTokenizer | None, *, max_tokens: int | None,
                model: str) -> Callable[[Path], Summary]:
    def check(path: Path) -> Summary:
        count = (lambda ex: len(encode(ex, tok)[0])) if tok is not None else None
        summary = validate_jsonl(path, count_tokens=count, max_tokens=max_tokens,
                                 model=f"the base model '{model}'")
        summary.checked_with = model if tok is not None else None
        return summary
    return check


def file_checker(catalog: Catalog, settings: Settings) -> Callable[[Path], Summary]:
    """Validate an upload against the default base model's tokenizer and context."""
    base = default_base(catalog)
    if base is None:
        return checker_for(None, max_tokens=None, model="")
    return deployment_checker(base, settings)


def deployment_checker(dep: Deployment, settings: Settings) -> Callable[[Path], Summary]:
    """Validate a file against one base model's tokenizer and context."""
    engine: Any = dep.engine
    tok = ChatTokenizer(engine.model, engine.template)
    return checker_for(tok, max_tokens=max_example_tokens(engine.info.context_length, settings),
                       model=dep.id)
