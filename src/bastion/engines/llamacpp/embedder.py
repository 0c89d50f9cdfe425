"""/v1/embeddings from a chat GGUF model: llama.cpp's own pooling (mean, or what the GGUF
declares) in a second context on the same weights, as Ollama and llama.cpp's server do.

The context is made on the first embedding request, so a model only chatted with pays nothing
(no KV cache, no output buffers). One thread runs it: requests that arrive while a pass runs
are packed together into the next `llama_decode`, each input its own sequence, as many as fit
the batch. Every input must fit one batch, since llama.cpp pools a sequence within one
micro-batch: that batch size is the per-input limit."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import llama_cpp as lc
import numpy as np

from bastion.engines.base import EmbeddingPrompt, ModelFailure, PreparedPrompt
from bastion.engines.llamacpp.model import LlamaModel
from bastion.engines.tokens import embedding_inputs

log = logging.getLogger("bastion.llamacpp")

POOLINGS = {lc.LLAMA_POOLING_TYPE_MEAN: "mean", lc.LLAMA_POOLING_TYPE_CLS: "cls",
            lc.LLAMA_POOLING_TYPE_LAST: "last"}


@dataclass
class _Job:
    sequences: list[list[int]]
    future: asyncio.Future[np.ndarray]
    out: np.ndarray | None = None
    left: int = 0


@dataclass
class _Pass:
    rows: list[tuple[_Job, int]] = field(default_factory=list)  # (job, index of its input)
    tokens: int = 0


def declared_pooling(model: LlamaModel) -> int:
    """The pooling the GGUF declares (`<arch>.pooling_type`: cls, mean or last); a chat model
    declares none, and gets mean pooling."""
    arch = model.meta("general.architecture") or ""
    raw = model.meta(f"{arch}.pooling_type")
    try:
        value = int(raw) if raw is not None else lc.LLAMA_POOLING_TYPE_NONE
    except ValueError:
        value = lc.LLAMA_POOLING_TYPE_NONE
    return value if value in POOLINGS else lc.LLAMA_POOLING_TYPE_MEAN


class LlamaEmbedder:
    """Pooled, L2-normalised sentence vectors of one loaded GGUF model."""

    def __init__(self, model: LlamaModel, name: str, *, n_batch: int, max_seqs: int,
                 threads: int) -> None:
        self.model = model
        self.name = name
        self.n_batch = n_batch
        self.max_seqs = max(1, min(max_seqs, 256))  # llama.cpp's LLAMA_MAX_SEQ
        self.threads = threads
        self.dimensions = lc.llama_model_n_embd(model.model)
        self.pooling = declared_pooling(model)
        self.add_eos = bool(lc.llama_vocab_get_add_eos(model.vocab))
        self.specials = int(bool(model.add_bos)) + int(self.add_eos)
        self.max_input_tokens = n_batch - self.specials
        self._ctx = None
        self._batch = None
        self._pending: deque[_Job] = deque()
        self._arrived = threading.Event()
        self._lock = threading.Lock()  # the thread's start and the context's end
        self._thread: threading.Thread | None = None
        self._closing = False
        self.passes = 0
        self.sequences = 0

    # --- what a request needs before it queues ------------------------------------------------
    def count(self, source: EmbeddingPrompt) -> PreparedPrompt:
        """Every input as token ids (text without special tokens: usage counts the input's own
        tokens), checked against the vocabulary and the per-input limit, or cut to it when the
        request says truncate."""
        m = self.model
        sequences = [m.tokenize(value, add_special=False, parse_special=False)
                     if isinstance(value, str) else value for value in source.inputs]
        return embedding_inputs(source, sequences, vocab_size=m.n_vocab,
                                limit=self.max_input_tokens, model=self.name)

    async def embed(self, sequences: list[list[int]]) -> np.ndarray:
        """Vectors (float32, one row per sequence), batched with whatever else is waiting."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._start()
        self._pending.append(_Job(sequences, future, left=len(sequences)))
        self._arrived.set()
        return await future  # cancelled (the client left): the thread skips it

    # --- the embedding thread -------------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                if self._closing:
                    raise ModelFailure("The model is shutting down.")
                self._thread = threading.Thread(target=self._run, name=f"embed-{self.name}",
                                                daemon=True)
                self._thread.start()

    def _open(self) -> None:
        """The embedding context: its own small KV cache (one batch, shared by its sequences),
        no logits kept beyond a batch, the model's LoRA adapter if it has one."""
        p = lc.llama_context_default_params()
        p.n_ctx = p.n_batch = p.n_ubatch = self.n_batch
        p.n_seq_max = self.max_seqs
        p.n_threads = p.n_threads_batch = self.threads
        p.embeddings = True
        p.pooling_type = self.pooling
        p.kv_unified = True  # the sequences of one pass share one buffer of n_batch cells
        p.no_perf = True
        ctx = lc.llama_init_from_model(self.model.model, p)
        if not ctx:
            raise ModelFailure(f"llama.cpp could not create an embedding context for "
                               f"'{self.name}'.")
        self.model.apply_adapter(ctx)
        self._ctx = ctx
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)
        log.info("embedding context for %s: %s pooling, %d dimensions", self.name,
                 POOLINGS[self.pooling], self.dimensions)

    def _run(self) -> None:
        while not self._closing:
            self._arrived.wait(0.5)
            self._arrived.clear()
            jobs = [job for job in self._take() if not job.future.cancelled()]
            if not jobs:
                continue
            try:
                if self._ctx is None:
                    self._open()
                for work in self._plan(jobs):
                    self._run_pass(work)
            except Exception as exc:  # noqa: BLE001 - every waiting request hears of it
                log.exception("embedding pass failed")
                failure = exc if isinstance(exc, ModelFailure) else ModelFailure(
                    f"The embedding pass of '{self.name}' failed: {exc}")
                self._settle([(job.future, failure) for job in jobs])

    def _take(self) -> list[_Job]:
        jobs = []
        while self._pending:
            jobs.append(self._pending.popleft())
        return jobs

    def _plan(self, jobs: list[_Job]) -> list[_Pass]:
        """Inputs packed in arrival order into passes of at most n_batch tokens and max_seqs
        sequences."""
        passes = [_Pass()]
        for job in jobs:
            job.out = np.empty((len(job.sequences), self.dimensions), dtype=np.float32)
            for i, seq in enumerate(job.sequences):
                n = len(seq) + self.specials
                last = passes[-1]
                if last.rows and (last.tokens + n > self.n_batch
                                  or len(last.rows) >= self.max_seqs):
                    passes.append(_Pass())
                    last = passes[-1]
                last.rows.append((job, i))
                last.tokens += n
        return passes

    def _run_pass(self, work: _Pass) -> None:
        live = [(job, i) for job, i in work.rows if not job.future.cancelled()]
        if not live:
            return
        m, b = self.model, self._batch
        n = 0
        for seq_id, (job, i) in enumerate(live):
            tokens = job.sequences[i]
            if m.add_bos:
                tokens = [m.bos, *tokens]
            if self.add_eos:
                tokens = [*tokens, m.eos]
            for pos, token in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n] = token, pos, 1
                b.seq_id[n][0] = seq_id
                b.logits[n] = True  # pooled: every token is an output
                n += 1
        b.n_tokens = n
        lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
        status = lc.llama_decode(self._ctx, b)
        if status != 0:
            raise ModelFailure(f"llama.cpp could not embed a batch of {n} tokens (status "
                               f"{status}).")
        done: list[tuple[asyncio.Future[np.ndarray], np.ndarray | Exception]] = []
        for seq_id, (job, i) in enumerate(live):
            ptr = lc.llama_get_embeddings_seq(self._ctx, seq_id)
            if not ptr:
                raise ModelFailure(f"llama.cpp returned no pooled embedding for '{self.name}'.")
            vector = np.ctypeslib.as_array(ptr, shape=(self.dimensions,))
            assert job.out is not None
            job.out[i] = vector / max(float(np.linalg.norm(vector)), 1e-12)
            job.left -= 1
            if job.left == 0:
                done.append((job.future, job.out))
        self.passes += 1
        self.sequences += len(live)
        self._settle(done)

    def _settle(self, outcomes: list[tuple[asyncio.Future[np.ndarray],
                                           np.ndarray | Exception]]) -> None:
        """Results to their requests in one hop to the event loop."""
        if not outcomes:
            return

        def settle() -> None:
            for future, outcome in outcomes:
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

        try:
            outcomes[0][0].get_loop().call_soon_threadsafe(settle)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    def close(self) -> None:
        """Stops the thread, then frees the context (before the model it was made from)."""
        with self._lock:
            self._closing = True
            thread = self._thread
        self._arrived.set()
        if thread is not None:
            thread.join(timeout=30)
        if self._ctx is not None:
            lc.llama_batch_free(self._batch)
            lc.llama_free(self._ctx)
            self._ctx = None

