"""The llama.cpp engine: the Engine protocol over a LlamaModel and its batching Scheduler."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from bastion.config import ModelSpec, Settings
from bastion.engines.base import (MEDIA_TOKEN, Capabilities, DecodedImage, EmbeddingPrompt,
                                  Embeddings, Event, GenerationRequest, ModelFailure, ModelInfo,
                                  ModelInputError, PreparedPrompt, Prompt, PromptMedia,
                                  PromptSource, format_parameters)
from bastion.engines.llamacpp.embedder import LlamaEmbedder
from bastion.engines.llamacpp.model import LlamaModel
from bastion.engines.grammar import gbnf
from bastion.engines.llamacpp.scheduler import Scheduler
from bastion.engines.llamacpp.templates import ChatTemplate, pick_template
from bastion.engines.llamacpp.vision import ImageChunk, Projector
from bastion.engines.threaded import events_from_thread
from bastion.engines.tokens import MARKS, TokenEngine, shadow_messages


def render_chat_tokens(model: LlamaModel, template: ChatTemplate, messages: list[dict[str, Any]],
                       *, add_generation_prompt: bool = True,
                       parts: Callable[[list[dict[str, Any]], list[int]], None] | None = None,
                       media: list[PromptMedia] | None = None,
                       tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Prompt tokens of a conversation. The template is rendered with a marker in place of each
    message's text; the template's own text is tokenised with its special tokens, the messages'
    text without, so a user who types "<end_of_turn>" cannot fake a turn. Fine-tuning encodes
    its examples with this same function, so training and serving see the same tokens.
    `parts` tokenises content lists (text and images) into `tokens`, adding to `media`.
    `tools`: for a template that renders them (see shadow_messages)."""
    text = template.render(shadow_messages(messages), add_generation_prompt=add_generation_prompt, tools=tools)
    tokens: list[int] = []
    for k, part in enumerate(MARKS.split(text)):
        if k % 2:
            content = messages[int(part)]["content"]
            if isinstance(content, str):
                tokens += model.tokenize(content, add_special=False, parse_special=False)
            elif parts is None:
                raise TypeError("messages with content parts go to render_chat_media")
            else:
                parts(content, tokens)
        elif part:
            tokens += model.tokenize(part, add_special=False, parse_special=True)
    if model.add_bos and (not tokens or tokens[0] != model.bos):
        tokens.insert(0, model.bos)
        for i, item in enumerate(media or []):
            media[i] = PromptMedia(item.offset + 1, item.n_tokens, item.payload)  # type: ignore[index]
    return tokens


@dataclass(frozen=True)
class LlamaCppSettings:
    """The llama.cpp engine's continuous batching, the same for every model it serves."""

    n_seq: int
    ctx_per_seq: int
    n_batch: int
    threads: int | None = None
    embed_batch: int = 64  # inputs per embedding pass (BASTION_EMBEDDING_MAX_BATCH)
    prefix_cache: bool = True
    prefill_chunk: int = 64

    @classmethod
    def of(cls, settings: Settings) -> "LlamaCppSettings":
        """From the server's settings (BASTION_PARALLEL, _CONTEXT_PER_SEQUENCE, ...)."""
        return cls(n_seq=settings.parallel, ctx_per_seq=settings.context_per_sequence,
                   n_batch=settings.batch_tokens, threads=settings.threads,
                   embed_batch=settings.embedding_max_batch, prefix_cache=settings.prefix_cache,
                   prefill_chunk=settings.prefill_chunk)


class LlamaCppEngine(TokenEngine):
    @classmethod
    def from_spec(cls, spec: ModelSpec, settings: Settings, *,
                  lora: Path | None = None) -> "LlamaCppEngine":
        """A GGUF model spec (path, id, chat_template, mmproj); `lora` for a fine-tune."""
        opts = LlamaCppSettings.of(settings)
        return cls(path=spec.path, name=spec.id or spec.path.stem,
                   chat_template=spec.chat_template, mmproj=spec.mmproj, lora=lora,
                   n_seq=opts.n_seq,
                   ctx_per_seq=opts.ctx_per_seq, n_batch=opts.n_batch, threads=opts.threads,
                   embed_batch=opts.embed_batch, prefix_cache=opts.prefix_cache,
                   prefill_chunk=opts.prefill_chunk)

    def __init__(self, *, path: Path, name: str, n_seq: int, ctx_per_seq: int, n_batch: int,
                 threads: int | None = None, chat_template: str | None = None,
                 mmproj: Path | None = None, lora: Path | None = None,
                 embed_batch: int = 64, prefix_cache: bool = False,
                 prefill_chunk: int | None = None) -> None:
        """`lora`: a GGUF LoRA adapter that llama.cpp applies to every sequence (fine-tuned).
        `embed_batch`: inputs per pass of /v1/embeddings (its context is made on first use).
        `prefix_cache`: a request reuses the KV of the prefix it shares with a finished one."""
        self.model = LlamaModel(path, n_seq=n_seq, ctx_per_seq=ctx_per_seq, n_batch=n_batch,
                                threads=threads, lora=lora, swa_full=prefix_cache)
        self.path = path
        self.name = name
        m = self.model
        self.architecture = m.meta("general.architecture")
        self.projector: Projector | None = None
        if mmproj is not None:
            try:
                self.projector = Projector(mmproj, m, threads=m.n_threads)
            except BaseException:
                m.close()
                raise
        self.template: ChatTemplate = pick_template(
            gguf_template=m.chat_template(), name=chat_template,
            bos_token=m.token_text(m.bos), eos_token=m.token_text(m.eos))
        self._fim = m.fim_tokens()
        self.embedder = LlamaEmbedder(m, name, n_batch=m.n_batch, max_seqs=embed_batch,
                                      threads=m.n_threads)
        self.capabilities = Capabilities(chat=True, completion=True, infill=self._fim is not None,
                                         vision=self.projector is not None, embeddings=True,
                                         constrained=True, tools=True,
                                         tool_family=self.template.family,
                                         tool_template=self.template.takes_tools)
        self.info = ModelInfo(context_length=m.ctx_per_seq,
                              parameters=m.meta("general.size_label") or format_parameters(m.n_params),
                              vocab_size=m.n_vocab,
                              created=int((lora or path).stat().st_mtime),
                              dimensions=self.embedder.dimensions)
        self.max_parallel = n_seq
        self.scheduler = Scheduler(m, name, self.projector, prefix_cache=prefix_cache,
                                   prefill_chunk=prefill_chunk or m.n_batch)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_special=add_special and self.model.add_bos,
                                   parse_special=False)

    def render_chat(self, messages: list[dict[str, Any]], *,
                    add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt tokens of a text conversation (see render_chat_tokens)."""
        return render_chat_tokens(self.model, self.template, messages,
                                  add_generation_prompt=add_generation_prompt, tools=tools)

    def has_special_text(self, text: str) -> bool:
        m = self.model
        return (m.tokenize(text, add_special=False, parse_special=True)
                != m.tokenize(text, add_special=False, parse_special=False))

    def render_chat_media(self, messages: list[dict[str, Any]], *,
                          tools: list[dict[str, Any]] | None = None) -> Prompt:
        """A conversation whose contents may be lists of text and image parts. Text is
        tokenised as in render_chat (adjacent text parts joined first, so a request costs
        exactly its image tokens more than the same text without images); each image becomes
        the projector's wrapper tokens and a run of MEDIA_TOKEN placeholders it fills."""
        if self.projector is None:
            raise ModelInputError("This model has no vision projector.",
                                  code="model_not_supported")
        media: list[PromptMedia] = []
        tokens = render_chat_tokens(
            self.model, self.template, messages, media=media, tools=tools,
            parts=lambda content, out: self._render_parts(content, out, media))
        if media and media[-1].offset + media[-1].n_tokens == len(tokens):
            # never happens with a chat template (the generation prompt follows), but the
            # scheduler needs text after the last image to sample the first token from
            raise ModelInputError("A prompt must not end with an image.")
        return Prompt(tokens=tokens, media=tuple(media))

    def _render_parts(self, parts: list[dict[str, Any]], tokens: list[int],
                      media: list[PromptMedia]) -> None:
        assert self.projector is not None
        text: list[str] = []
        for part in parts:
            if part["type"] == "text":
                text.append(part["text"])
                continue
            image = part["image"]
            if not isinstance(image, DecodedImage):
                raise TypeError(f"an image part must hold a DecodedImage, not {type(image)}")
            tokens += self.model.tokenize("".join(text), add_special=False, parse_special=False)
            text = []
            for segment in self.projector.tokenize_image(image):
                if isinstance(segment, ImageChunk):
                    media.append(PromptMedia(len(tokens), segment.n_tokens, segment))
                    tokens += [MEDIA_TOKEN] * segment.n_tokens
                else:
                    tokens += segment
        tokens += self.model.tokenize("".join(text), add_special=False, parse_special=False)

    def infill_tokens(self, prefix: str, suffix: str) -> list[int]:
        if self._fim is None:
            return super().infill_tokens(prefix, suffix)
        pre, suf, mid = self._fim
        out = [self.model.bos] if self.model.add_bos else []
        out += [pre] + self.model.tokenize(prefix, add_special=False, parse_special=False)
        out += [suf] + self.model.tokenize(suffix, add_special=False, parse_special=False)
        return out + [mid]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.model.piece(t) for t in tokens).decode("utf-8", "replace")

    async def count_prompt(self, source: PromptSource) -> PreparedPrompt:
        if isinstance(source, EmbeddingPrompt):
            return await asyncio.to_thread(self.embedder.count, source)
        return await super().count_prompt(source)

    async def embed(self, prompt: PreparedPrompt, *,
                    dimensions: int | None = None) -> Embeddings:
        """Pooled, normalised vectors of the model's hidden size (see embedder.py)."""
        if dimensions is not None and dimensions != self.embedder.dimensions:
            raise ModelInputError(f"The model '{self.name}' makes {self.embedder.dimensions}-"
                                  f"dimensional vectors (got dimensions={dimensions}).",
                                  param="dimensions", code="invalid_value")
        return Embeddings(await self.embedder.embed(prompt.payload), prompt.n_tokens)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if request.params.output is not None:
            gbnf(request.params.output)  # a schema it cannot convert is a 400, now
        if request.media:
            await self._encode(request)
        async for event in events_from_thread(
                lambda sink: self.scheduler.submit(request, sink), self.scheduler.cancel):
            yield event

    async def _encode(self, request: GenerationRequest) -> None:
        """Run the vision encoder over the request's images on a worker thread: only now,
        after admission, and beside the scheduler, which keeps decoding other sequences."""
        if self.projector is None:
            raise ModelFailure("This model has no vision projector.")
        for media in request.media:
            if isinstance(media.payload, ImageChunk) and media.payload.embd is None:
                await asyncio.to_thread(self.projector.encode, media.payload)

    def stats(self) -> dict[str, int]:
        return self.scheduler.stats()

    def abort_all(self, message: str) -> None:
        self.scheduler.abort_all(message)

    def close(self) -> None:
        self.embedder.close()
        if self.scheduler.stop():  # never free the model under a thread still decoding
            if self.projector is not None:
                self.projector.close()
            self.scheduler.grammars.close()
            self.model.close()

