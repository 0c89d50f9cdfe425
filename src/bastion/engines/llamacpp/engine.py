"""The llama.cpp engine: the Engine protocol over a LlamaModel and its batching Scheduler."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, AsyncIterator

from bastion.engines.base import (Capabilities, EngineError, Event, GenerationRequest, ModelInfo,
                                  format_parameters)
from bastion.engines.llamacpp.model import LlamaModel
from bastion.engines.llamacpp.scheduler import DONE, Scheduler
from bastion.engines.llamacpp.templates import ChatTemplate, pick_template


# Private-use code points: they never occur in chat templates, and mark where message text goes.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARKS = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")


def render_chat_tokens(model: LlamaModel, template: ChatTemplate, messages: list[dict[str, Any]],
                       *, add_generation_prompt: bool = True) -> list[int]:
    """Prompt tokens of a conversation. The template is rendered with a marker in place of each
    message's text; the template's own text is tokenised with its special tokens, the messages'
    text without, so a user who types "<end_of_turn>" cannot fake a turn. Fine-tuning encodes
    its examples with this same function, so training and serving see the same tokens."""
    shadow = [{**m, "content": f"{_MARK_OPEN}{i}{_MARK_CLOSE}"} for i, m in enumerate(messages)]
    text = template.render(shadow, add_generation_prompt=add_generation_prompt)
    tokens: list[int] = []
    for k, part in enumerate(_MARKS.split(text)):
        if k % 2:
            tokens += model.tokenize(messages[int(part)]["content"], add_special=False,
                                     parse_special=False)
        elif part:
            tokens += model.tokenize(part, add_special=False, parse_special=True)
    if model.add_bos and (not tokens or tokens[0] != model.bos):
        tokens.insert(0, model.bos)
    return tokens


class LlamaCppEngine:
    def __init__(self, *, path: Path, name: str, n_seq: int, ctx_per_seq: int, n_batch: int,
                 threads: int | None = None, chat_template: str | None = None,
                 lora: Path | None = None) -> None:
        self.model = LlamaModel(path, n_seq=n_seq, ctx_per_seq=ctx_per_seq, n_batch=n_batch,
                                threads=threads, lora=lora)
        self.path = path
        self.architecture = self.model.meta("general.architecture")
        m = self.model
        self.template: ChatTemplate = pick_template(
            gguf_template=m.chat_template(), name=chat_template,
            bos_token=m.token_text(m.bos), eos_token=m.token_text(m.eos))
        self._fim = m.fim_tokens()
        self.capabilities = Capabilities(chat=True, completion=True, infill=self._fim is not None)
        self.info = ModelInfo(context_length=m.ctx_per_seq,
                              parameters=m.meta("general.size_label") or format_parameters(m.n_params),
                              vocab_size=m.n_vocab,
                              created=int((lora or path).stat().st_mtime))
        self.max_parallel = n_seq
        self.scheduler = Scheduler(m, name)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_special=add_special and self.model.add_bos,
                                   parse_special=False)

    def render_chat(self, messages: list[dict[str, Any]], *,
                    add_generation_prompt: bool = True) -> list[int]:
        return render_chat_tokens(self.model, self.template, messages,
                                  add_generation_prompt=add_generation_prompt)

    def infill_tokens(self, prefix: str, suffix: str) -> list[int]:
        if self._fim is None:
            raise EngineError("this model has no fill-in-the-middle tokens")
        pre, suf, mid = self._fim
        out = [self.model.bos] if self.model.add_bos else []
        out += [pre] + self.model.tokenize(prefix, add_special=False, parse_special=False)
        out += [suf] + self.model.tokenize(suffix, add_special=False, parse_special=False)
        return out + [mid]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.model.piece(t) for t in tokens).decode("utf-8", "replace")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[object] = asyncio.Queue()

        def sink(item: object) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:  # the loop is gone; nobody is listening any more
                pass

        job = self.scheduler.submit(request, sink)
        done = False
        try:
            while True:
                item = await inbox.get()
                if item is DONE:
                    done = True
                    return
                if isinstance(item, EngineError):
                    done = True
                    raise item
                for event in item:  # type: ignore[attr-defined]
                    yield event
        finally:
            if not done:  # the consumer went away: free the sequences at once
                self.scheduler.cancel(job)

    def stats(self) -> dict[str, int]:
        return self.scheduler.stats()

    def abort_all(self, message: str) -> None:
        self.scheduler.abort_all(message)

    def close(self) -> None:
        if self.scheduler.stop():  # never free the model under a thread still decoding
            self.model.close()

