"""Sentence-transformers embeddings, with requests that arrive together run as one batch.

Requests are tokenised by the caller (so that limits and usage are exact before any model time
is spent) and queued as token ids. A feeder thread that finds no planned pass left takes
everything queued (after a short window when all were idle), sorts the sequences by length and
cuts them into forward passes that weigh padding against the cost of one more pass
(engines/batching.py). Every feeder takes passes from that one plan and runs each on its own
model process (engines/embedding_process.py), which runs the model's pipeline (transformer,
pooling, normalisation): one batch sorted as a whole pads less than a batch per process (10 %
more sentences/s under 64 clients). A client that goes away before its turn costs nothing: its
future is cancelled and skipped."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bastion.config import EmbeddingModelSpec, Settings
from bastion.engines.base import (BaseEngine, Capabilities, EmbeddingPrompt, Embeddings,
                                  EngineError, ModelFailure, ModelInfo, PreparedPrompt,
                                  PromptSource, format_parameters)
from bastion.engines.tokens import embedding_inputs
from bastion.engines.batching import plan_passes
from bastion.engines.embedding_process import ModelProcess

log = logging.getLogger("bastion.engines.embeddings")
INLINE_TOKENIZE_CHARS = 4096  # longer inputs are tokenised on a worker thread


@dataclass
class _Job:
    sequences: list[list[int]]
    future: asyncio.Future[np.ndarray]


@dataclass
class _Batch:
    """Jobs taken together; their sequences sorted by length: (padded length, job, index)."""

    jobs: list[_Job]
    items: list[tuple[int, int, int]]
    out: list[np.ndarray]  # each job's vectors, filled in as passes finish
    left: list[int]  # each job's sequences still to embed


def _deliver(loop: asyncio.AbstractEventLoop,
             outcomes: list[tuple[asyncio.Future[np.ndarray], np.ndarray | Exception]]) -> None:
    """Results of one pass to their requests in one hop to the event loop (a hop per request
    cost a lock and a wake-up each)."""
    def settle() -> None:
        for future, outcome in outcomes:
            if future.done():  # cancelled meanwhile
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    if outcomes:
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass


@dataclass(frozen=True)
class EmbeddingEngineSettings:
    """How requests are batched, and how many threads (so model processes) there are."""

    threads: int | None = None
    window_s: float = 0.002
    max_batch: int = 64

    @classmethod
    def of(cls, settings: Settings) -> "EmbeddingEngineSettings":
        return cls(threads=settings.threads, window_s=settings.embedding_window_ms / 1000,
                   max_batch=settings.embedding_max_batch)


class SentenceTransformerEngine(BaseEngine):
    """One sentence-transformers model directory (safetensors only; never remote code)."""

    @classmethod
    def from_spec(cls, spec: EmbeddingModelSpec, settings: Settings) -> "SentenceTransformerEngine":
        """An embedding model spec (path, id)."""
        opts = EmbeddingEngineSettings.of(settings)
        return cls(spec.path, spec.id or spec.path.name, threads=opts.threads,
                   window_s=opts.window_s, max_batch=opts.max_batch)

    def __init__(self, path: Path, name: str, *, threads: int | None = None,
                 window_s: float = 0.002, max_batch: int = 64,
                 max_batch_tokens: int = 16384) -> None:
        # Model processes of one thread each (up to 4, never more than `threads`), each fed by
        # one thread here from one shared list of passes. One thread each: on 2 cores two
        # single-threaded processes embedded more than one with two threads (412 against 316
        # sentences/s), and an idle OpenMP team spinning at its barriers takes cores from
        # llama.cpp's decoding.
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.workers = max(1, min(threads or len(cores) or os.cpu_count() or 1, 4))
        pin = len(cores) >= self.workers  # one core each, where there are enough
        self.name = name
        self._processes: list[ModelProcess] = []
        try:  # all load at once; each reports what it loaded, or why it could not
            for i in range(self.workers):
                self._processes.append(ModelProcess(path, f"embed-{name}-{i}", first=i == 0,
                                                    core=cores[i] if pin else None))
            infos = [p.ready() for p in self._processes]
        except BaseException:
            for p in self._processes:
                p.kill()
            raise
        info = infos[0]
        self.normalizes: bool = info["normalizes"]
        self.tokenizer = info["tokenizer"]
        self.dimensions: int = info["dimensions"]
        self.max_seq_length: int = info["max_seq_length"]
        self._specials: int = info["specials"]
        self.max_input_tokens = self.max_seq_length - self._specials
        self.overhead_tokens: float = info["overhead_tokens"]
        self.info = ModelInfo(context_length=self.max_seq_length,
                              parameters=format_parameters(info["parameters"]),
                              vocab_size=len(self.tokenizer), created=int(time.time()),
                              dimensions=self.dimensions)
        self.capabilities = Capabilities(embeddings=True)
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self._pending: deque[_Job] = deque()  # appended on the event loop, taken by feeders
        self._arrived = threading.Event()
        self._passes: deque[tuple[_Batch, int, int]] = deque()  # planned, not yet taken
        self._planning = threading.Lock()  # the passes, the batches' progress, the counters
        self._busy = 0  # feeders running a pass
        self._sequences_done = 0
        self._batches_done = 0  # batches collected from the queue
        self._company = True  # the last batch held more than one request
        self._passes_done = 0  # forward passes they were cut into
        self._pass_sizes: dict[int, int] = {}  # sequences in one pass -> passes (metrics)
        # A copy of the Rust tokenizer (tokenize_many): transformers switches truncation and
        # padding on the shared one per call, and must not cut a too-long input silently here.
        self._fast = None
        if (backend := getattr(self.tokenizer, "_tokenizer", None)) is not None:
            self._fast = copy.deepcopy(backend)
            self._fast.no_truncation()
            self._fast.no_padding()
        self._closing = False
        self._feeders = [threading.Thread(target=self._run, args=(process,),
                                          name=f"embed-{name}-{i}", daemon=True)
                         for i, process in enumerate(self._processes)]
        for feeder in self._feeders:
            feeder.start()

    # --- what a request needs before it queues ---------------------------------------------------
    def tokenize_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids without the model's special tokens (those are added when embedding). The
        Rust tokenizer is called directly where there is one: transformers' wrapper around it
        cost more than the tokenising, and its batch call hands even one text to a thread pool."""
        fast = self._fast
        if fast is None:
            return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])
        if len(texts) == 1:
            return [fast.encode(texts[0], add_special_tokens=False).ids]
        return [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]

    async def count_prompt(self, source: PromptSource) -> PreparedPrompt:
        """Every input as token ids, checked against the model's vocabulary and input length
        (cut to it when the request says truncate)."""
        if not isinstance(source, EmbeddingPrompt):
            return await super().count_prompt(source)
        inputs = source.inputs
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        sequences: list[list[int]] = [x if isinstance(x, list) else [] for x in inputs]
        if texts:
            strings = [t for _, t in texts]
            # a few sentences tokenise in tens of microseconds: less than the hop to a worker
            # thread, which only pays off for long inputs that would hold the event loop
            ids = (self.tokenize_many(strings) if sum(map(len, strings)) <= INLINE_TOKENIZE_CHARS
                   else await asyncio.to_thread(self.tokenize_many, strings))
            for (i, _), tokens in zip(texts, ids):
                sequences[i] = tokens
        return embedding_inputs(source, sequences, vocab_size=self.info.vocab_size,
                                limit=self.max_input_tokens, model=self.name)

    async def embed(self, prompt: PreparedPrompt | list[list[int]], *,  # type: ignore[override]
                    dimensions: int | None = None) -> Any:
        """The prompt's vectors, shortened to `dimensions` (Matryoshka-style: the leading
        ones, renormalised if the model normalises). Given plain token id lists (the batching
        API itself, as its tests drive it) it answers the bare array."""
        if not isinstance(prompt, PreparedPrompt):
            return await self._embed(prompt)
        vectors = await self._embed(prompt.payload)
        return Embeddings(_shorten(vectors, dimensions, self.normalizes), prompt.n_tokens)

    async def _embed(self, sequences: list[list[int]]) -> np.ndarray:
        """Vectors (float32, one row per sequence), batched with whatever else is waiting."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(sequences, future))
        if not self._arrived.is_set():  # one wake-up per batch, not one per request
            self._arrived.set()
        return await future  # cancelled (the client left): the feeder skips it

    # --- the feeders -----------------------------------------------------------------------------
    def _run(self, process: ModelProcess) -> None:
        while not self._closing:
            work = self._next_pass()
            if work is not None:
                self._run_pass(process, *work)

    def _next_pass(self) -> tuple[_Batch, int, int] | None:
        """The next planned pass; or, when none is left, a new batch of everything waiting,
        planned into passes that every feeder then takes from (so that one batch sorted by
        length feeds all the model processes); None when there is nothing to do yet."""
        with self._planning:
            if self._passes:
                return self._passes.popleft()
        self._arrived.clear()  # before looking, so that an arrival after the look wakes us
        if not self._pending:
            self._arrived.wait(0.5)
            return None
        if len(self._pending) < self.max_batch and not self._busy and self._company:
            # idle until now, and the last batch had company: wait for requests arriving
            # together. A client alone (its last batch was its own request) would only wait.
            time.sleep(self.window_s)
        with self._planning:
            if not self._passes:
                self._plan()
            return self._passes.popleft() if self._passes else None

    def _plan(self) -> None:
        """Everything waiting (up to max_batch sequences), sorted by length and cut into passes
        that weigh padding against the cost of one more pass (engines/batching.py), shortest
        first. Called with _planning held."""
        jobs: list[_Job] = []
        rows = 0
        while self._pending and rows < self.max_batch:
            job = self._pending.popleft()
            if not job.future.cancelled():
                jobs.append(job)
                rows += len(job.sequences)
        if not jobs:
            return
        items = sorted((len(s) + self._specials, j, i)
                       for j, job in enumerate(jobs) for i, s in enumerate(job.sequences))
        batch = _Batch(jobs, items, [np.empty((len(job.sequences), self.dimensions),
                                              dtype=np.float32) for job in jobs],
                       [len(job.sequences) for job in jobs])
        for start, end in plan_passes([n for n, _, _ in items], self.overhead_tokens,
                                      self.max_batch, self.max_batch_tokens):
            self._passes.append((batch, start, end))
        self._batches_done += 1
        self._company = len(jobs) > 1

    def _run_pass(self, process: ModelProcess, batch: _Batch, start: int, end: int) -> None:
        """One pass on this feeder's model process; each job gets its vectors as soon as its
        last sequence is done, so its client can send its next request while the rest of the
        batch runs."""
        chunk = batch.items[start:end]
        jobs = batch.jobs
        with self._planning:
            self._busy += 1
        try:
            vectors = process.run([jobs[j].sequences[i] for _, j, i in chunk])
            failure: Exception | None = None
        except Exception as exc:
            log.exception("embedding pass failed")
            failure = exc if isinstance(exc, EngineError) else ModelFailure(
                f"The embedding model failed: {exc}")
        done: list[tuple[asyncio.Future[np.ndarray], np.ndarray | Exception]] = []
        with self._planning:
            self._busy -= 1
            self._passes_done += 1
            self._sequences_done += len(chunk)
            self._pass_sizes[len(chunk)] = self._pass_sizes.get(len(chunk), 0) + 1
            for row, (_, j, i) in enumerate(chunk):
                if failure is None:
                    batch.out[j][i] = vectors[row]
                batch.left[j] -= 1
                if failure is not None:
                    done.append((jobs[j].future, failure))
                elif not batch.left[j]:
                    done.append((jobs[j].future, batch.out[j]))
        _deliver(jobs[0].future.get_loop(), done)

    # --- the engine protocol -------------------------------------------------------------------
    max_parallel = 1

    def stats(self) -> dict[str, int]:
        return {"queued": len(self._pending), "sequences_done": self._sequences_done,
                "batches_done": self._batches_done, "forward_passes": self._passes_done}

    def batch_sizes(self) -> dict[int, int]:
        with self._planning:
            return dict(self._pass_sizes)

    def abort_all(self, message: str) -> None:
        """Embedding batches are short: the running one finishes, queued jobs still run."""

    def close(self) -> None:
        self._closing = True
        self._arrived.set()
        for feeder in self._feeders:
            feeder.join(timeout=30)
        for process in self._processes:
            process.close()


def _shorten(vectors: np.ndarray, dimensions: int | None, normalized: bool) -> np.ndarray:
    """Matryoshka-style shortening: keep the leading dimensions, renormalise if the model does."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    short = vectors[:, :dimensions]
    if normalized:
        norms = np.linalg.norm(short, axis=1, keepdims=True)
        short = short / np.maximum(norms, 1e-12)
    return short.astype(np.float32)
