"""The PyTorch engine: a safetensors + config.json causal LM (an upload) through transformers.

Only what transformers ships is ever run: weights from safetensors, never pickle, and never
`trust_remote_code`. One thread per model decodes its running sequences round-robin, one token
each per pass with its own KV cache, so concurrent streams advance together; sampling, stop
sequences and UTF-8-safe text follow the llama.cpp engine's rules, so a client sees the same API.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from bastion.config import ModelSpec, Settings
from bastion.engines.chat_format import takes_tools, template_family
from bastion.engines.base import (Capabilities, Delta, EngineError, Event, Finished,
                                  GenerationRequest, ModelFailure, ModelInfo, ModelInputError,
                                  ModelUnavailable, SamplingParams, TokenLogprob,
                                  format_parameters)
from bastion.engines.text import StopMatcher
from bastion.engines.threaded import DONE, Sink, events_from_thread
from bastion.engines.token_masks import SequenceMask, TokenMasks
from bastion.engines.tokens import MARKS, TokenEngine, shadow_messages

log = logging.getLogger("bastion.torch")


def load_causal_lm(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a directory, offline, safetensors only, no remote code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    opts: dict[str, Any] = dict(local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True,
                                                 dtype=torch.float32, **opts)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True, **opts)
    return model, tokenizer


class TextStream:
    """Incremental detokenisation (as vLLM does it): decode a short window of tokens and emit
    only what has grown, holding back while the text ends in a half character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def feed(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        return decode(self.ids[self.prefix:], skip_special_tokens=True)[len(before):]


@dataclass(eq=False)
class _Seq:
    index: int
    tokens: list[int]
    params: SamplingParams
    generator: Any
    text: TextStream
    stops: StopMatcher
    cache: Any = None
    mask: SequenceMask | None = None  # constrained output
    pending: list[int] = field(default_factory=list)  # fed to the model next pass
    generated: list[int] = field(default_factory=list)
    finished: bool = False


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    sink: Sink
    seqs: list[_Seq] = field(default_factory=list)
    cancelled: bool = False


@dataclass(frozen=True)
class TorchSettings:
    """The PyTorch engine's options: its threads, and sequences run at once per model."""

    threads: int | None = None
    max_parallel: int = 4

    @classmethod
    def of(cls, settings: Settings) -> "TorchSettings":
        return cls(threads=settings.threads, max_parallel=settings.parallel)


class TorchEngine(TokenEngine):
    @classmethod
    def from_spec(cls, spec: ModelSpec, settings: Settings) -> "TorchEngine":
        """A model directory spec (path, id): safetensors and config.json."""
        opts = TorchSettings.of(settings)
        return cls(path=spec.path, name=spec.id or spec.path.name, threads=opts.threads,
                   max_parallel=opts.max_parallel)

    def __init__(self, *, path: Path, name: str, threads: int | None = None,
                 max_parallel: int = 4) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.threads = threads
        self.path = path
        self.name = name
        self.model, self.tokenizer = load_causal_lm(path)
        config = self.model.config
        context = (getattr(config, "max_position_embeddings", None)
                   or getattr(config, "n_positions", None) or 2048)
        self.eos = _eos_ids(self.model, self.tokenizer)
        template = getattr(self.tokenizer, "chat_template", None)
        chat = bool(template)
        if isinstance(template, dict):  # named templates: the one transformers uses for tools
            template = template.get("tool_use") or template.get("default")
        template = template if isinstance(template, str) else ""
        try:  # llguidance reads most tokenizers, not every one (a word-level one without
            # a decoder, say): such a model simply does not offer structured outputs
            self.masks: TokenMasks | None = TokenMasks(self.tokenizer, int(config.vocab_size),
                                                       sorted(self.eos))
        except Exception as exc:
            log.info("%s: no structured outputs (%s)", name, exc)
            self.masks = None
        constrained = self.masks is not None
        self.capabilities = Capabilities(chat=chat, completion=True, constrained=constrained,
                                         tools=chat and constrained,
                                         tool_family=template_family(template),
                                         tool_template=chat and takes_tools(template))
        self.info = ModelInfo(context_length=int(context),
                              parameters=format_parameters(self.model.num_parameters()),
                              vocab_size=int(config.vocab_size),
                              created=int((path / "config.json").stat().st_mtime))
        self.max_parallel = max_parallel
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._jobs: list[_Job] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"torch-{name}", daemon=True)
        self._thread.start()

    # --- prompts ------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special,
                                   split_special_tokens=True)["input_ids"])

    def has_special_text(self, text: str) -> bool:
        def ids(split: bool) -> list[int]:
            return list(self.tokenizer(text, add_special_tokens=False,
                                       split_special_tokens=split)["input_ids"])
        return ids(False) != ids(True)

    def render_chat(self, messages: list[dict[str, Any]], *,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The model's own chat template, rendered with a marker in place of each message's
        text: the template's text is tokenised with its special tokens, the messages' text
        without, so a user who types a turn marker cannot fake a turn. `tools`: for a
        template that renders them (transformers passes them as HF templates expect)."""
        if not self.capabilities.chat:
            raise ModelInputError(f"The model '{self.name}' has no chat template; use "
                                  f"/v1/completions.", code="model_not_supported",
                                  param="model")
        try:
            text = self.tokenizer.apply_chat_template(shadow_messages(messages), tokenize=False, tools=tools,
                                                      add_generation_prompt=True)
        except Exception as exc:  # the template itself refused (e.g. roles must alternate)
            raise ModelInputError(f"The model's chat template refused these messages: {exc}",
                                  code="invalid_messages", param="messages") from exc
        tokens: list[int] = []
        for k, part in enumerate(MARKS.split(text)):
            if k % 2:
                tokens += self.tokenize(str(messages[int(part)]["content"]), add_special=False)
            elif part:
                tokens += list(self.tokenizer(part, add_special_tokens=False)["input_ids"])
        return tokens

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # --- generation ---------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if request.params.output is not None and self.masks is not None:
            self.masks.matcher(request.params.output)  # compiled (and cached) here: a 400 now

        def submit(sink: Sink) -> _Job:
            job = _Job(request, sink)
            self._commands.put(("submit", job))
            return job

        async for event in events_from_thread(
                submit, lambda job: self._commands.put(("cancel", job))):
            yield event

    def stats(self) -> dict[str, int]:
        running = sum(len(j.seqs) for j in self._jobs)
        return {"running_sequences": running, "waiting_requests": self._commands.qsize(),
                "slots": self.max_parallel}

    def abort_all(self, message: str) -> None:
        self._commands.put(("abort", message))

    def close(self) -> None:
        self._commands.put(("stop", None))
        self._thread.join(timeout=30)

    # --- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        # per thread, and explicitly: the embedding engine's single-threaded workers change
        # the default that new threads start with
        torch.set_num_threads(self.threads or os.cpu_count() or 1)
        with torch.inference_mode():
            while not self._stopping:
                self._take_commands(block=not self._jobs)
                for job in list(self._jobs):
                    try:
                        self._step(job)
                    except Exception as exc:  # one request's failure never stops the others
                        log.exception("generation failed in %s", self.name)
                        self._finish(job, ModelFailure(f"The model failed: {exc}"))

    def _take_commands(self, block: bool) -> None:
        while True:
            try:
                cmd, arg = self._commands.get(block=block)
            except queue.Empty:
                return
            block = False
            if cmd == "submit":
                try:
                    self._admit(arg)  # type: ignore[arg-type]
                except EngineError as exc:
                    self._finish(arg, exc)  # type: ignore[arg-type]
            elif cmd == "cancel":
                if arg in self._jobs:
                    self._jobs.remove(arg)  # type: ignore[arg-type]
            elif cmd == "abort":
                for job in list(self._jobs):
                    self._finish(job, ModelUnavailable(str(arg), code="service_unavailable"))
            elif cmd == "stop":
                for job in list(self._jobs):
                    self._finish(job, ModelUnavailable("The model is shutting down.",
                                                       code="service_unavailable"))
                self._stopping = True
                return

    def _admit(self, job: _Job) -> None:
        import torch

        p = job.request.params
        for i in range(job.request.n):
            gen = torch.Generator()
            gen.manual_seed((p.seed + i) if p.seed is not None
                            else int(time.time_ns()) ^ (id(job) + i))
            job.seqs.append(_Seq(index=i, tokens=list(job.request.prompt_tokens), params=p,
                                 generator=gen, text=TextStream(self.tokenizer),
                                 # a stop sequence must not cut a constrained answer short
                                 stops=StopMatcher(() if p.output else p.stop),
                                 mask=(self.masks.matcher(p.output)
                                       if p.output and self.masks else None),
                                 pending=list(job.request.prompt_tokens)))
        self._jobs.append(job)

    def _step(self, job: _Job) -> None:
        """One token for every unfinished sequence of the job."""
        import torch

        for seq in job.seqs:
            if seq.finished:
                continue
            ids = torch.tensor([seq.pending], dtype=torch.long)
            out = self.model(input_ids=ids, past_key_values=seq.cache, use_cache=True)
            seq.cache = out.past_key_values
            logits = out.logits[0, -1].float()
            if seq.mask is not None and not seq.mask.apply(logits.numpy()):
                self._end(job, seq, "length")  # nothing fits: the answer is incomplete
                continue
            token = pick(logits, seq.params, seq.generated, seq.generator)
            if seq.mask is not None:
                seq.mask.take(token)
            lp = self._logprob(logits, token, seq.params) if seq.params.logprobs else []
            seq.pending = [token]
            self._accept(job, seq, token, lp)
        if all(s.finished for s in job.seqs):
            self._finish(job)

    def _accept(self, job: _Job, seq: _Seq, token: int, lp: list[TokenLogprob]) -> None:
        if token in self.eos:
            self._end(job, seq, "stop")
            return
        seq.generated.append(token)
        text, hit = seq.stops.feed(seq.text.feed(token))
        if text or lp:
            job.sink([Delta(index=seq.index, text=text, logprobs=lp, n_tokens=1)])
        if hit:
            self._end(job, seq, "stop", flush=False)
        elif len(seq.generated) >= seq.params.max_tokens:
            self._end(job, seq, "length")

    def _end(self, job: _Job, seq: _Seq, reason: str, flush: bool = True) -> None:
        if flush:
            tail, hit = seq.stops.feed(seq.text.flush())
            tail += "" if hit else seq.stops.flush()
            if tail:
                job.sink([Delta(index=seq.index, text=tail)])
        seq.finished = True
        seq.cache = None
        job.sink([Finished(index=seq.index, finish_reason=reason,
                           completion_tokens=len(seq.generated))])

    def _finish(self, job: _Job, error: EngineError | None = None) -> None:
        if job in self._jobs:
            self._jobs.remove(job)
        job.sink(error if error is not None else DONE)

    def _logprob(self, logits: Any, token: int, params: SamplingParams) -> list[TokenLogprob]:
        import torch

        logp = torch.log_softmax(logits, dim=-1)
        top = []
        if params.top_logprobs:
            values, ids = torch.topk(logp, params.top_logprobs)
            top = [(*self._describe(int(t)), float(v)) for v, t in zip(values, ids)]
        text, raw = self._describe(token)
        return [TokenLogprob(token=text, bytes=raw, logprob=float(logp[token]), top=top)]

    def _describe(self, token: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token])
        return text, list(text.encode("utf-8"))


def pick(logits: Any, p: SamplingParams, generated: list[int], generator: Any) -> int:
    """The next token under the request's sampling parameters (OpenAI's semantics: penalties
    on what this sequence generated, temperature 0 is greedy)."""
    import torch

    logits = logits.clone()
    for token, bias in p.logit_bias:
        logits[token] += bias
    if generated and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(torch.tensor(generated), minlength=logits.shape[0]).float()
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    if p.temperature <= 1e-5:
        return int(torch.argmax(logits))
    logits /= p.temperature
    if p.top_k and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > p.top_p
        probs[order[drop]] = 0.0
    if p.min_p > 0.0:
        probs[probs < p.min_p * probs.max()] = 0.0
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
