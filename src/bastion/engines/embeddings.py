"""Sentence-transformers embeddings, with requests that arrive together run as one batch.

Requests are tokenised by the caller (so that limits and usage are exact before any model time
is spent) and queued as token ids; one worker thread takes everything queued, waits a short
window for more when it was idle, sorts the sequences by length (less padding) and runs the
model's own pipeline (transformer, pooling, normalisation) on them. A client that goes away
before its turn costs nothing: its future is cancelled and skipped.
"""

from __future__ import annotations

import asyncio
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

        if threads:
            torch.set_num_threads(threads)
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
        self._batches_done = 0
        self._worker = threading.Thread(target=self._run, name=f"embed-{name}", daemon=True)
        self._worker.start()

    # --- what a request needs before it queues ---------------------------------------------------
    def tokenize_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids without the model's special tokens (those are added when embedding)."""
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    async def embed(self, sequences: list[list[int]]) -> np.ndarray:
        """Vectors (float32, one row per sequence), batched with whatever else is waiting."""
        future: Future[np.ndarray] = Future()
        self._queue.put(_Job(sequences, future))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # not yet taken: the worker skips it
            raise

    # --- the worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
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
                    self._queue.put(None)
                    break
                jobs.append(nxt)
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                vectors = self._encode([s for j in live for s in j.sequences])
            except Exception as exc:  # the model failed: every waiting request hears why
                log.exception("embedding batch failed")
                for j in live:
                    j.future.set_exception(EngineError(f"The embedding model failed: {exc}"))
                continue
            start = 0
            for j in live:
                j.future.set_result(vectors[start:start + len(j.sequences)])
                start += len(j.sequences)

    def _encode(self, sequences: list[list[int]]) -> np.ndarray:
        """Sorted by length and cut into batches of bounded padded size."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out = np.empty((len(sequences), self.dimensions), dtype=np.float32)
        i = 0
        while i < len(order):
            j = i + 1
            while (j < len(order) and j - i < self.max_batch
                   and (j - i + 1) * (len(sequences[order[j]]) + self._specials)
                   <= self.max_batch_tokens):
                j += 1
            chunk = order[i:j]
            out[chunk] = self._forward([sequences[k] for k in chunk])
            i = j
        self._sequences_done += len(sequences)
        self._batches_done += 1
        return out

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
                "batches_done": self._batches_done}

    def abort_all(self, message: str) -> None:
        """Embedding batches are short: the running one finishes, queued jobs still run."""

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)
