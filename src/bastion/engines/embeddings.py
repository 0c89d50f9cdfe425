"""Sentence-transformers embeddings, with requests that arrive together run as one batch.

Requests are tokenised by the caller (so that limits and usage are exact before any model time
is spent) and queued as token ids; a worker thread takes everything queued (helpers take the
next batches while it is busy), waits a short window for more when it was idle, sorts the sequences by length and cuts them into forward
passes that weigh padding against the cost of one more pass (engines/batching.py), and runs the
model's own pipeline (transformer, pooling, normalisation) on each. A client that goes away
before its turn costs nothing: its future is cancelled and skipped.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bastion.engines.base import Capabilities, EngineError, ModelInfo, format_parameters
from bastion.engines.batching import plan_passes

log = logging.getLogger("bastion.engines.embeddings")


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one input ([CLS] and [SEP] for
    BERT), found by tokenising a probe with and without them."""
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start:start + len(plain)] == plain:
            return with_specials[:start], with_specials[start + len(plain):]
    raise EngineError("cannot tell this tokenizer's special tokens apart from its text")


@dataclass
class _Job:
    sequences: list[list[int]]
    future: Future[np.ndarray]


class SentenceTransformerEngine:
    """One sentence-transformers model directory (safetensors only; never remote code)."""

    def __init__(self, path: Path, name: str, *, threads: int | None = None,
                 window_s: float = 0.002, max_batch: int = 64,
                 max_batch_tokens: int = 16384) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched at run time
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize

        # Workers of one thread each (up to 4, never more than `threads`): the first takes
        # every batch; helpers take the next ones only while it is busy. One thread each
        # because PyTorch and llama.cpp share one OpenMP runtime (both load libgomp.so.1): once
        # a torch worker had run a parallel region of its own, llama.cpp's decoding in the same
        # process fell from 43 to 27 tokens/s (and a second torch thread's passes took 12.4 ms
        # instead of 5.5): with more OpenMP threads than cores, libgomp stops spinning at its
        # barriers. Single-threaded, torch never starts one. On 2 cores two such workers also
        # embed more than one worker with two threads (412 against 316 sentences/s).
        self.workers = max(1, min(threads or torch.get_num_threads(), 4))
        self._torch = torch
        self.name = name
        try:
            self.model = SentenceTransformer(str(path), device="cpu", trust_remote_code=False,
                                             local_files_only=True,
                                             model_kwargs={"use_safetensors": True})
        except Exception as exc:
            raise EngineError(f"could not load the embedding model at {path}: {exc}") from exc
        self.model.eval()
        # Vectors are normalised exactly when the model's own pipeline says so.
        self.normalizes = any(isinstance(m, Normalize) for m in self.model)
        self.tokenizer = self.model.tokenizer
        self.dimensions = int(self.model.get_embedding_dimension())
        self.max_seq_length = int(self.model.max_seq_length)
        self._prefix, self._suffix = _special_frame(self.tokenizer)
        self._specials = len(self._prefix) + len(self._suffix)
        self.max_input_tokens = self.max_seq_length - self._specials
        self._uses_token_types = "token_type_ids" in self.tokenizer.model_input_names
        self._extra_features = {k: v for k, v in self.model.preprocess(["x"]).items()
                                if not hasattr(v, "shape")}  # e.g. {"modality": "text"}
        n_params = sum(p.numel() for p in self.model.parameters())
        self.info = ModelInfo(context_length=self.max_seq_length,
                              parameters=format_parameters(n_params),
                              vocab_size=len(self.tokenizer), created=int(time.time()),
                              dimensions=self.dimensions)
        self.capabilities = Capabilities(embeddings=True)
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._sequences_done = 0
        self._batches_done = 0  # batches collected from the queue
        self._passes_done = 0  # forward passes they were cut into
        self._counting = threading.Lock()  # the workers' counters
        # A copy of the Rust tokenizer (tokenize_many): transformers switches truncation and
        # padding on the shared one per call, and must not cut a too-long input silently here.
        self._fast = None
        if (backend := getattr(self.tokenizer, "_tokenizer", None)) is not None:
            self._fast = copy.deepcopy(backend)
            self._fast.no_truncation()
            self._fast.no_padding()
        self._probe = self.tokenizer("a", add_special_tokens=False)["input_ids"][0]
        self.overhead_tokens = 0.0  # set by the first worker before it serves (calibrate)
        self._first_busy = threading.Event()
        self._closing = False
        self._ready = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i == 0,),
                                          name=f"embed-{name}-{i}", daemon=True)
                         for i in range(self.workers)]
        self._failed: Exception | None = None
        for worker in self._workers:
            worker.start()
        self._ready.wait()
        if self._failed is not None:
            raise EngineError(f"the embedding model at {path} could not run: {self._failed}")

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

    async def embed(self, sequences: list[list[int]]) -> np.ndarray:
        """Vectors (float32, one row per sequence), batched with whatever else is waiting."""
        future: Future[np.ndarray] = Future()
        self._queue.put(_Job(sequences, future))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # not yet taken: the worker skips it
            raise

    # --- the workers -----------------------------------------------------------------------------
    def _run(self, first: bool) -> None:
        self._torch.set_num_threads(1)  # per thread: see __init__
        if first:
            try:
                self.overhead_tokens = self.calibrate()
            except Exception as exc:  # the model cannot run: the constructor says so
                self._failed = exc
                self._closing = True
                return
            finally:
                self._ready.set()
        while True:
            job = self._take(first)
            if job is None:
                return
            jobs = [job]
            deadline = time.monotonic() + self.window_s
            while sum(len(j.sequences) for j in jobs) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # the first worker's stop, taken at its next get
                    break
                jobs.append(nxt)
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if not live:
                continue
            if first:
                self._first_busy.set()
            try:
                self._encode(live, first)
            except Exception as exc:  # the model failed: every waiting request hears why
                log.exception("embedding batch failed")
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(EngineError(f"The embedding model failed: {exc}"))
            finally:
                if first:
                    self._first_busy.clear()

    def _take(self, first: bool) -> _Job | None:
        """The next job, or None to stop. The helper waits while the first worker is idle."""
        if first:
            return self._queue.get()
        while not self._closing:
            if not self._first_busy.wait(0.1):
                continue
            try:  # never a blocking get: one that outlasted the first worker's batch would
                # take a lone client's next request away from it
                job = self._queue.get_nowait()
            except queue.Empty:
                time.sleep(0.001)
                continue
            if job is not None:
                return job
            self._queue.put(None)  # the first worker's
        return None

    def _encode(self, jobs: list[_Job], first: bool) -> None:
        """All the jobs' sequences sorted by length and cut into passes (engines/batching.py),
        shortest first; each job gets its vectors as soon as its last sequence is done, so its
        client can send its next request while the rest of the batch runs."""
        items = sorted((len(s) + self._specials, j, i)
                       for j, job in enumerate(jobs) for i, s in enumerate(job.sequences))
        out = [np.empty((len(job.sequences), self.dimensions), dtype=np.float32) for job in jobs]
        left = [len(job.sequences) for job in jobs]
        passes = plan_passes([n for n, _, _ in items], self.overhead_tokens, self.max_batch,
                             self.max_batch_tokens)
        for start, end in passes:
            chunk = items[start:end]
            vectors = self._forward([jobs[j].sequences[i] for _, j, i in chunk])
            with self._counting:
                self._passes_done += 1
            if first and end == len(items):  # idle before the last replies go out, so that
                self._first_busy.clear()  # the requests they prompt come back to this worker
            for row, (_, j, i) in enumerate(chunk):
                out[j][i] = vectors[row]
                left[j] -= 1
                if not left[j]:
                    jobs[j].future.set_result(out[j])
        with self._counting:
            self._sequences_done += len(items)
            self._batches_done += 1

    def calibrate(self) -> float:
        """What one more forward pass costs, in tokens' worth of compute: from one short pass
        and one of 256 tokens, timed after a warm-up. This machine's and this model's number,
        so that plan_passes weighs padding against passes as they really compare here."""
        def timed(rows: int, width: int) -> float:
            seqs = [[self._probe] * width] * rows
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                self._forward(seqs)
                best = min(best, time.perf_counter() - t)
            return best

        timed(1, 8)  # warm-up
        short, wide = 16 + self._specials, 32 + self._specials  # padded widths
        small, large = timed(1, 16), timed(8, 32)
        per_token = max(1e-9, (large - small) / (8 * wide - short))
        return min(256.0, max(4.0, (small - short * per_token) / per_token))

    def _forward(self, sequences: list[list[int]]) -> np.ndarray:
        torch = self._torch
        ids = [self._prefix + s + self._suffix for s in sequences]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, :len(x)] = 1
        features: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask,
                                    **self._extra_features}
        if self._uses_token_types:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        with torch.inference_mode():
            out = self.model.forward(features)
        return out["sentence_embedding"].float().numpy()

    # --- the engine protocol -------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {"queued": self._queue.qsize(), "sequences_done": self._sequences_done,
                "batches_done": self._batches_done, "forward_passes": self._passes_done}

    def abort_all(self, message: str) -> None:
        """Embedding batches are short: the running one finishes, queued jobs still run."""

    def close(self) -> None:
        self._closing = True
        self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout=30)
