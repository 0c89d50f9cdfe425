"""Continuous batching: one thread per model decodes every running sequence in one batch.

Each step the thread (1) takes new requests, cancellations and aborts from its command queue,
(2) admits waiting requests into free sequence slots, (3) builds one llama_decode batch with the
next token of every decoding sequence plus prompt chunks of newly admitted ones, and (4) samples
each sequence with its own sampler chain and hands the events to the request's sink.

A step prefills at most prefill_chunk prompt tokens (more while many sequences decode: see
PREFILL_PER_DECODE_ROW), all requests together, in arrival order. On a CPU prefill is
compute-bound from a few dozen tokens on (64 tokens prefill as fast per token as 512), so a
burst of prompts prefilled one after another costs no throughput, while the first of them get
their first token sooner and the running streams' steps stay short.

A prompt with images arrives with its images already encoded (engine.generate runs the vision
encoder on a worker thread first, while this thread keeps decoding). It is prefilled up to each
image in batches as usual; the image's embeddings are then decoded into the sequence's KV cache
by libmtmd at the start of the next step, on this thread and outside the shared batch (a batch
holds tokens or embeddings, not both). The other sequences wait for that one decode, which
costs about what prefilling as many text tokens does.

Prefix caching: a finished sequence's slot keeps its KV, and the scheduler remembers which
tokens it holds. A new request's leader takes the free slot (of the same cache key: the
organisation) whose tokens share the longest prefix with its prompt, drops that slot's KV after
the shared part and prefills only the rest; the last prompt token is always decoded again, for
the logits the first token is sampled from. Slots are placed so that those in use stay
adjacent (see _placed): when the matching slot lies elsewhere, its KV is copied into the chosen
one, which costs far less than prefilling it. Among equally placed slots the least recently
used is taken. A running request's prompt counts too: a request whose prompt shares at least
AWAIT_SHARED tokens with one still being prefilled waits until those tokens are in that request's
slot, then starts from a copy of it, so a burst of requests under one system prompt prefills it
once. KV that follows an image is never kept (the tokens do not show which image it was),
and a prompt with images, or one whose every token is scored (prompt logprobs), starts afresh.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field

from bastion.engines.base import (MEDIA_TOKEN, Delta, EngineError, Event, Finished,
                                  GenerationRequest, ModelInputError, ModelUnavailable,
                                  PromptLogprobs, PromptMedia, TokenLogprob)
from bastion.engines.llamacpp import sampling
from bastion.engines.llamacpp.grammar import Grammars
from bastion.engines.llamacpp.model import LlamaModel
from bastion.engines.llamacpp.vision import Projector
from bastion.engines.text import StopMatcher, Utf8Stream
from bastion.engines.threaded import DONE, Sink

log = logging.getLogger("bastion.scheduler")

PROMPT_LOGPROB_CHUNK = 32  # prompt tokens scored per step, so echo+logprobs never stalls others
AWAIT_SHARED = 64  # shared prompt tokens worth waiting for another request's prefill
PREFILL_PER_DECODE_ROW = 16  # prompt tokens a step may prefill per decoding sequence


@dataclass(eq=False)
class _Seq:
    index: int
    slot: int
    sampler: sampling.SequenceSampler
    max_tokens: int
    stops: StopMatcher
    utf8: Utf8Stream = field(default_factory=Utf8Stream)
    n_past: int = 0
    last_token: int = -1
    generated: int = 0
    reported: int = 0
    decoding: bool = False
    finished: bool = False
    pending_lp: list[TokenLogprob] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)  # generated tokens decoded into its KV


@dataclass(eq=False)
class Job:
    """One submitted request: its prompt, its n sequences and where its events go."""

    request: GenerationRequest
    sink: Sink
    seqs: list[_Seq] = field(default_factory=list)
    prefilled: int = 0
    prompt_lp: list[TokenLogprob | None] = field(default_factory=list)
    cancelled: bool = False
    media: dict[int, PromptMedia] = field(default_factory=dict)  # by prompt offset
    cached: int = 0  # prompt tokens found in the leader's slot, not prefilled

    def next_media(self, start: int) -> int:
        """Offset of the first image at or after start (the prompt's length if none)."""
        return min((o for o in self.media if o >= start), default=len(self.request.prompt_tokens))


class Scheduler:
    def __init__(self, model: LlamaModel, name: str, projector: Projector | None = None,
                 *, prefix_cache: bool = False, prefill_chunk: int | None = None) -> None:
        """`prefill_chunk`: prompt tokens per step, all requests together (default n_batch)."""
        self.model = model
        self.prefill_chunk = min(prefill_chunk or model.n_batch, model.n_batch)
        self.projector = projector
        self.prefix_cache = prefix_cache
        # What each slot's KV holds (the tokens at positions 0..), under which cache key,
        # and when it was last released (LRU eviction); a slot in use holds nothing reusable.
        self._slot_tokens: list[list[int]] = [[] for _ in range(model.n_seq)]
        self._slot_key: list[str] = [""] * model.n_seq
        self._slot_used: list[int] = [0] * model.n_seq
        self._clock = 0
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._free_slots = list(range(model.n_seq))
        self._stopping = False
        self._describe_cache: dict[int, tuple[str, list[int]]] = {}
        self.grammars = Grammars(model.vocab)
        self._thread = threading.Thread(target=self._run, name=f"llamacpp-{name}", daemon=True)
        self._thread.start()

    # --- called from the event loop ---------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> Job:
        job = Job(request=request, sink=sink, media={m.offset: m for m in request.media})
        self._commands.put(("submit", job))
        return job

    def cancel(self, job: Job) -> None:
        self._commands.put(("cancel", job))

    def abort_all(self, message: str) -> None:
        self._commands.put(("abort", message))

    def stop(self) -> bool:
        """Ask the thread to finish its step and end; True once it has."""
        self._commands.put(("stop", None))
        self._thread.join(timeout=30)
        return not self._thread.is_alive()


    def stats(self) -> dict[str, int]:
        """Read from other threads without a lock: a scrape may see a step half done."""
        used = sum(seq.n_past for job in list(self._running) for seq in job.seqs)
        return {"running_sequences": self.model.n_seq - len(self._free_slots),
                "waiting_requests": len(self._waiting), "slots": self.model.n_seq,
                "kv_cache_used_cells": used,
                "kv_cache_cells": self.model.n_seq * self.model.ctx_per_seq}

    # --- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            try:
                self._take_commands(block=not self._running and not self._waiting)
                if self._stopping:
                    break
                self._admit()
                self._step()
            except Exception as exc:  # the thread must survive anything a request does
                log.exception("scheduler step failed")
                self._fail_all(EngineError(f"The model failed while generating: {exc}"))
        self._fail_all(ModelUnavailable("The server is shutting down.",
                                        code="service_unavailable"))

    def _take_commands(self, block: bool) -> None:
        while True:
            try:
                cmd, arg = self._commands.get(block=block)
            except queue.Empty:
                return
            block = False
            if cmd == "submit":
                self._waiting.append(arg)  # type: ignore[arg-type]
            elif cmd == "cancel":
                self._cancel(arg)  # type: ignore[arg-type]
            elif cmd == "abort":
                self._fail_all(ModelUnavailable(str(arg), code="service_unavailable"))
            elif cmd == "stop":
                self._stopping = True
                return

    def _cancel(self, job: Job) -> None:
        job.cancelled = True
        if job in self._waiting:
            self._waiting.remove(job)
            return
        if job in self._running:
            self._release(job)

    def _admit(self) -> None:
        held: list[Job] = []
        while self._waiting and len(self._free_slots) >= self._waiting[0].request.n:
            job = self._waiting.popleft()
            if self._awaits_prefill(job):
                held.append(job)
                continue
            if not job.request.prompt_tokens:  # nothing to decode would spin forever
                self._finish_job(job, EngineError("The prompt has no tokens."))
                continue
            if job.media and self.projector is None:
                self._finish_job(job, EngineError("This model has no vision projector."))
                continue
            p = job.request.params
            self._running.append(job)
            slots = self._take_slots(job)
            try:
                # A stop sequence must not cut a constrained answer short of valid JSON.
                stops = () if p.output else p.stop
                for i, slot in enumerate(slots):
                    grammar = self.grammars.sampler(p.output) if p.output else None
                    sampler = sampling.SequenceSampler(p, n_vocab=self.model.n_vocab,
                                                       penalty_window=self.model.ctx_per_seq,
                                                       seed_offset=i, grammar=grammar)
                    job.seqs.append(_Seq(index=i, slot=slot, sampler=sampler,
                                         max_tokens=p.max_tokens, stops=StopMatcher(stops)))
            except Exception as exc:  # one bad request must not take others down
                if isinstance(exc, ModelInputError):  # the request's fault: a 400, no trace
                    log.info("refused a sequence: %s", exc)
                else:
                    log.exception("could not start a sequence")
                taken = {seq.slot for seq in job.seqs}
                self._free_slots += [slot for slot in slots if slot not in taken]
                self._finish_job(job, exc if isinstance(exc, EngineError) else EngineError(
                    f"The model could not start generating: {exc}"))
        self._waiting.extendleft(reversed(held))

    def _cacheable(self, job: Job) -> bool:
        return self.prefix_cache and not job.media and not job.request.params.prompt_logprobs

    def _sources(self, job: Job) -> list[Job]:
        """Running requests of the same cache key whose leader's KV the job could copy."""
        return [other for other in self._running
                if other is not job and other.seqs and self._cacheable(other)
                and other.request.cache_key == job.request.cache_key]

    def _awaits_prefill(self, job: Job) -> bool:
        """Whether a running request is still prefilling a long prefix the job's prompt shares:
        waiting a step or two for it costs less than prefilling the same tokens twice."""
        if not self._cacheable(job):
            return False
        prompt = job.request.prompt_tokens
        for other in self._sources(job):
            theirs = other.request.prompt_tokens
            if other.prefilled < len(theirs):
                n = _common_prefix(theirs, prompt, len(prompt) - 1)
                if n >= AWAIT_SHARED and other.prefilled < n:
                    return True
        return False

    def _take_slots(self, job: Job) -> list[int]:
        """Free slots for the job's n sequences, the leader's holding the longest cached
        prefix of its prompt (job.prefilled starts after it); the others emptied."""
        prompt = job.request.prompt_tokens
        source, shared = -1, 0  # the slot whose KV holds the longest prefix of the prompt
        if self._cacheable(job):
            limit = len(prompt) - 1  # the last prompt token is decoded again, for its logits
            for slot in self._free_slots:
                if self._slot_key[slot] == job.request.cache_key:
                    n = _common_prefix(self._slot_tokens[slot], prompt, limit)
                    if n > shared:
                        source, shared = slot, n
            for other in self._sources(job):  # the prompt part already in a running slot
                n = _common_prefix(other.request.prompt_tokens[:other.prefilled], prompt, limit)
                if n > shared:
                    source, shared = other.seqs[0].slot, n
        slots = self._placed(job.request.n, prefer=source)
        leader = slots[0]
        if shared and leader != source:  # a copy where the batch wants it; the source stays
            self.model.clear_slot(leader)
            self.model.copy_slot(source, leader)
        if shared and not self.model.trim_slot(leader, shared):
            shared = 0
        for slot in slots:
            if slot != leader or not shared:
                self.model.clear_slot(slot)
            self._slot_tokens[slot], self._slot_key[slot] = [], ""
        job.prefilled = job.cached = shared
        return slots

    def _placed(self, n: int, prefer: int) -> list[int]:
        """n free slots, chosen so that the slots in use form as few runs of adjacent numbers
        as possible: llama.cpp decodes each run of adjacent KV streams as a pass of its own
        over the weights, so four sequences in slots 0, 5, 10 and 15 take nearly twice as long
        a step as in slots 0-3 (bench/README.md). Among equals, `prefer` (it holds the prompt's
        prefix: kept in place, not copied), then the least recently used (its cached KV is the
        one lost)."""
        busy = set(range(self.model.n_seq)) - set(self._free_slots)
        chosen: list[int] = []
        for _ in range(n):
            best = min((s for s in self._free_slots if s not in chosen),
                       key=lambda s: (_runs(busy | {s}), s != prefer, self._slot_used[s], s))
            chosen.append(best)
            busy.add(best)
        self._free_slots = [s for s in self._free_slots if s not in chosen]
        if prefer in chosen[1:]:  # the leader is the one that holds the prefix
            chosen.remove(prefer)
            chosen.insert(0, prefer)
        return chosen

    def _step(self) -> None:
        # rows: (slot, position, token, wants_logits); sorted by slot below, because llama.cpp
        # splits a batch whose sequences are out of stream order into several ubatches, which
        # costs a whole extra pass over the weights each (measured: 1.7x slower at 16 streams).
        rows: list[tuple[int, int, int, bool]] = []
        decoders: list[tuple[_Seq, Job]] = []
        prefills: list[tuple[Job, int, int, bool]] = []  # job, first position, count, completes
        outputs = 0
        for job in self._running:
            for seq in job.seqs:
                if seq.decoding and not seq.finished:
                    decoders.append((seq, job))
                    rows.append((seq.slot, seq.n_past, seq.last_token, True))
                    outputs += 1
        # llama.cpp runs the decoding rows as a pass of their own (one KV stream per slot splits
        # a batch into equal parts per sequence), which costs as much as prefilling a few times
        # as many tokens: prefill enough beside them that it stays a small part of the step
        prefill_left = max(self.prefill_chunk, PREFILL_PER_DECODE_ROW * len(decoders))
        for job in list(self._running):  # an image that fails ends its job
            prompt = job.request.prompt_tokens
            if job.prefilled >= len(prompt):
                continue
            if job.prefilled in job.media and not self._prefill_media(job):
                continue
            all_logits = job.request.params.prompt_logprobs
            budget = min(self.model.n_batch - len(rows), prefill_left)
            out_budget = self.model.n_outputs_max - outputs
            if all_logits:  # each prompt token costs a full-vocabulary log-softmax
                budget = min(budget, out_budget, PROMPT_LOGPROB_CHUNK)
            start = job.prefilled
            if not all_logits and start + budget >= len(prompt) and out_budget < 1:
                budget = len(prompt) - start - 1  # finish next step, when an output is free
            if budget <= 0:
                break
            chunk = prompt[start:min(start + budget, job.next_media(start))]
            completes = start + len(chunk) == len(prompt)
            leader = job.seqs[0].slot
            for k, tok in enumerate(chunk):
                last = completes and k == len(chunk) - 1
                rows.append((leader, start + k, tok, all_logits or last))
            outputs += len(chunk) if all_logits else int(completes)
            prefills.append((job, start, len(chunk), completes))
            job.prefilled += len(chunk)
            prefill_left -= len(chunk)
        if not rows:
            return
        rows.sort(key=lambda r: (r[0], r[1]))
        index = {(slot, pos): i for i, (slot, pos, _, _) in enumerate(rows)}
        rc = self.model.decode([(tok, pos, slot, out) for slot, pos, tok, out in rows])
        if rc != 0:
            jobs = {id(j): j for _, j in decoders} | {id(j): j for j, *_ in prefills}
            for job in jobs.values():
                self._finish_job(job, EngineError(f"llama_decode failed with status {rc}"))
            return

        touched: dict[int, tuple[Job, list[Event]]] = {}
        draws: list[tuple[_Seq, Job, int, list[Event]]] = []
        for job, start, count, completes in prefills:
            events = touched.setdefault(id(job), (job, []))[1]
            leader = job.seqs[0].slot
            if job.request.params.prompt_logprobs:
                self._collect_prompt_logprobs(job, [index[(leader, start + k)] for k in range(count)],
                                              start)
            if completes:
                if job.request.params.prompt_logprobs:
                    events.append(PromptLogprobs(tokens=[None] + job.prompt_lp))
                n_prompt = len(job.request.prompt_tokens)
                last = index[(leader, n_prompt - 1)]
                for seq in job.seqs:
                    if seq.slot != leader:
                        self.model.copy_slot(leader, seq.slot)
                    seq.n_past = n_prompt
                    draws.append((seq, job, last, events))
        for seq, job in decoders:
            idx = index[(seq.slot, seq.n_past)]
            seq.n_past += 1
            seq.fed.append(seq.last_token)
            draws.append((seq, job, idx, touched.setdefault(id(job), (job, []))[1]))
        for (seq, job, idx, events), tok in zip(draws, self._draw(draws)):
            self._accept(seq, job, idx, tok, events)
        for job, events in touched.values():
            if events:
                job.sink(events)
            if all(s.finished for s in job.seqs):
                self._finish_job(job)

    def _prefill_media(self, job: Job) -> bool:
        """Evaluate the images at the job's prefill point (the text before them was decoded
        by an earlier step) into its leader's KV cache; False if the job failed."""
        assert self.projector is not None
        leader = job.seqs[0].slot
        while job.prefilled in job.media:
            media = job.media[job.prefilled]
            try:
                end = self.projector.decode(media.payload, position=job.prefilled,
                                            seq_id=leader)
                if end != job.prefilled + media.n_tokens:
                    raise EngineError(f"The image took {end - job.prefilled} positions "
                                      f"instead of {media.n_tokens}.")
            except EngineError as exc:
                self._finish_job(job, exc)
                return False
            job.prefilled = end
        if job.prefilled >= len(job.request.prompt_tokens):  # render_chat_media forbids it
            self._finish_job(job, EngineError("A prompt must not end with an image."))
            return False
        return True

    def _collect_prompt_logprobs(self, job: Job, batch_indices: list[int], start: int) -> None:
        prompt = job.request.prompt_tokens
        top_n = job.request.params.top_logprobs
        for k, idx in enumerate(batch_indices):
            nxt = start + k + 1
            if nxt < len(prompt):
                job.prompt_lp.append(sampling.token_logprob(self.model.logits(idx), prompt[nxt],
                                                            top_n, self._describe))

    def _draw(self, draws: list[tuple[_Seq, Job, int, list[Event]]]) -> list[int]:
        """Sample every sequence of this step (sampling them on a thread pool was measured
        slower: llama.cpp's own threads are still spinning right after a decode)."""
        return [seq.sampler.sample(self.model.ctx, self.model.logits(idx), idx)
                for seq, _, idx, _ in draws]

    def _accept(self, seq: _Seq, job: Job, idx: int, tok: int, events: list[Event]) -> None:
        p = job.request.params
        if tok == sampling.DEAD_END:  # the grammar allows nothing: the answer is incomplete
            self._end_seq(seq, job, "length", events)
            return
        if self.model.is_eog(tok):
            self._end_seq(seq, job, "stop", events)
            return
        seq.generated += 1
        if p.logprobs:
            seq.pending_lp.append(sampling.token_logprob(self.model.logits(idx), tok,
                                                         p.top_logprobs, self._describe))
        text, hit = seq.stops.feed(seq.utf8.feed(self.model.piece(tok)))
        if hit:
            self._emit(seq, text, events)
            self._end_seq(seq, job, "stop", events, flush=False)
        elif seq.generated >= seq.max_tokens or seq.n_past >= self.model.ctx_per_seq:
            self._emit(seq, text, events)
            self._end_seq(seq, job, "length", events)
        else:
            self._emit(seq, text, events)
            seq.last_token = tok
            seq.decoding = True

    def _emit(self, seq: _Seq, text: str, events: list[Event]) -> None:
        if text or seq.pending_lp:
            events.append(Delta(index=seq.index, text=text, logprobs=seq.pending_lp,
                                n_tokens=seq.generated - seq.reported))
            seq.pending_lp = []
            seq.reported = seq.generated

    def _end_seq(self, seq: _Seq, job: Job, reason: str, events: list[Event],
                 flush: bool = True) -> None:
        if flush:
            self._emit(seq, seq.stops.feed(seq.utf8.flush())[0] + seq.stops.flush(), events)
        elif seq.pending_lp:
            self._emit(seq, "", events)
        seq.finished = True
        seq.decoding = False
        events.append(Finished(index=seq.index, finish_reason=reason,
                               completion_tokens=seq.generated, cached_tokens=job.cached))

    def _describe(self, token: int) -> tuple[str, list[int]]:
        hit = self._describe_cache.get(token)
        if hit is None:
            raw = self.model.piece(token)
            hit = (raw.decode("utf-8", "replace"), list(raw))
            if len(self._describe_cache) < 100_000:
                self._describe_cache[token] = hit
        return hit

    def _release(self, job: Job, keep: bool = True) -> None:
        """Free the job's slots, keeping their KV for later prompts unless `keep` is False
        (a failed decode leaves it unknown)."""
        if job in self._running:
            self._running.remove(job)
        self._clock += 1
        for seq in job.seqs:
            seq.sampler.close()
            tokens = self._kept(job, seq) if keep and self.prefix_cache else []
            if not tokens:
                self.model.clear_slot(seq.slot)
            self._slot_tokens[seq.slot] = tokens
            self._slot_key[seq.slot] = job.request.cache_key
            self._slot_used[seq.slot] = self._clock if tokens else 0
            self._free_slots.append(seq.slot)
        job.seqs = []

    @staticmethod
    def _kept(job: Job, seq: _Seq) -> list[int]:
        """The tokens whose KV the sequence's slot holds, up to its first image."""
        prompt = job.request.prompt_tokens
        if job.prefilled < len(prompt) or seq.n_past < len(prompt):  # cut off in prefill
            tokens = prompt[:job.prefilled] if seq is job.seqs[0] else []
        else:
            tokens = prompt + seq.fed
        if job.media:
            tokens = tokens[:min(job.media)]
        return tokens if MEDIA_TOKEN not in tokens else tokens[:tokens.index(MEDIA_TOKEN)]

    def _finish_job(self, job: Job, error: EngineError | None = None) -> None:
        self._release(job, keep=error is None)
        if not job.cancelled:
            job.sink(error if error is not None else DONE)

    def _fail_all(self, error: EngineError) -> None:
        for job in list(self._running):
            self._finish_job(job, error)
        while self._waiting:
            job = self._waiting.popleft()
            if not job.cancelled:
                job.sink(error)


def _runs(slots: set[int]) -> int:
    """How many runs of adjacent numbers the set holds ({0, 1, 2, 15}: two)."""
    return sum(1 for s in slots if s - 1 not in slots)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens a and b share, at most `limit`."""
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:  # the common case (a cached system prompt or earlier turns): C speed
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: halve with slice comparisons
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
