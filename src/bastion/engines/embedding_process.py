"""A sentence-transformers model in a process of its own, and the server's handle on it.

Why a process: the server's event loop (HTTP, keys, limits, JSON) and PyTorch's Python-level
work between kernels took turns at one GIL, so with two workers the two cores sat a quarter
idle under load; and PyTorch's OpenMP team, sharing llama.cpp's libgomp in one process, slowed
chat decoding for good (engines/embeddings.py). Here the model has its own interpreter and its
own OpenMP runtime, and the server keeps only the tokenizer.

The protocol, over one duplex pipe: the process says ("ready", info) or ("failed", why) once
loaded; then each message from the server is one forward pass (token ids without the model's
special tokens), answered by ("ok", vectors) or ("error", why); None asks it to exit, as does
the server's end of the pipe closing (the server died).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from bastion.engines.base import EngineError

log = logging.getLogger("bastion.engines.embeddings")
START_TIMEOUT_S = 300.0


class ModelProcess:
    """One model process; `run` is called by one server thread at a time."""

    def __init__(self, path: Path, label: str, first: bool, core: int | None = None) -> None:
        # first: the one that calibrates and sends the tokenizer (the others' would be the same)
        self.path, self.label, self.first = path, label, first
        self.core = core  # the CPU it is pinned to, if any
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self.start()

    def start(self) -> None:
        """Spawned, never forked: the server holds llama.cpp, PyTorch and threads already."""
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe(duplex=True)
        self._process = ctx.Process(target=serve, args=(theirs, str(self.path), self.first,
                                                        self.core),
                                    name=self.label, daemon=True)
        self._process.start()
        theirs.close()  # so that its death reads as EOF here
        self._conn = ours

    def ready(self) -> dict[str, Any]:
        """What the loaded model is (dimensions, tokenizer, ...), or EngineError saying why not."""
        assert self._conn is not None
        if not self._conn.poll(START_TIMEOUT_S):
            self.kill()
            raise EngineError(f"the embedding model at {self.path} did not load within "
                              f"{START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            raise EngineError(f"the embedding model's process ({self.label}) exited while "
                              f"loading {self.path}") from None
        if kind != "ready":
            raise EngineError(f"the embedding model at {self.path} could not run: {payload}")
        return dict(payload)

    def run(self, sequences: list[list[int]]) -> np.ndarray:
        """One forward pass's vectors, or EngineError. A process that died (killed, out of
        memory) is replaced before its EngineError is raised, so that the next pass runs."""
        if self._conn is None:  # the last restart did not load: try again
            self.restart()
        assert self._conn is not None
        try:
            self._conn.send(sequences)
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            log.error("embedding model process %s is gone (%s); starting another",
                      self.label, exc)
            self.restart()
            raise EngineError("The embedding model's process stopped while embedding this "
                              "request; it has been restarted. Try again.") from None
        if kind != "ok":
            raise EngineError(f"The embedding model failed: {payload}")
        return payload

    def restart(self) -> None:
        self.kill()
        self.start()
        try:
            self.ready()
        except EngineError:
            self.kill()  # the next run() tries again
            raise

    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def close(self, timeout: float = 30.0) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
        if self._process is not None:
            self._process.join(timeout)
        self.kill()

    def kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --- the model's side ----------------------------------------------------------------------------

def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one input ([CLS] and [SEP] for
    BERT), found by tokenising a probe with and without them."""
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start:start + len(plain)] == plain:
            return with_specials[:start], with_specials[start + len(plain):]
    raise EngineError("cannot tell this tokenizer's special tokens apart from its text")


class Model:
    """The loaded directory and its forward pass (transformer, pooling, normalisation)."""

    def __init__(self, path: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched at run time
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize

        transformers.logging.disable_progress_bar()  # one per process would litter the log

        self.torch = torch
        try:
            self.model = SentenceTransformer(str(path), device="cpu", trust_remote_code=False,
                                             local_files_only=True,
                                             model_kwargs={"use_safetensors": True})
        except Exception as exc:
            raise EngineError(f"could not load the embedding model at {path}: {exc}") from exc
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.prefix, self.suffix = _special_frame(self.tokenizer)
        self.pad = self.tokenizer.pad_token_id or 0
        self.uses_token_types = "token_type_ids" in self.tokenizer.model_input_names
        self.extra_features = {k: v for k, v in self.model.preprocess(["x"]).items()
                               if not hasattr(v, "shape")}  # e.g. {"modality": "text"}
        self.probe = self.tokenizer("a", add_special_tokens=False)["input_ids"][0]
        # Vectors are normalised exactly when the model's own pipeline says so.
        self.info: dict[str, Any] = {
            "normalizes": any(isinstance(m, Normalize) for m in self.model),
            "dimensions": int(self.model.get_embedding_dimension()),
            "max_seq_length": int(self.model.max_seq_length),
            "specials": len(self.prefix) + len(self.suffix),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }

    def forward(self, sequences: list[list[int]]) -> np.ndarray:
        torch = self.torch
        ids = [self.prefix + s + self.suffix for s in sequences]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, :len(x)] = 1
        features: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask,
                                    **self.extra_features}
        if self.uses_token_types:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        with torch.inference_mode():
            out = self.model.forward(features)
        return out["sentence_embedding"].float().numpy()

    def calibrate(self) -> float:
        """What one more forward pass costs, in tokens' worth of compute: from one short pass
        and one of 256 tokens, timed after a warm-up. This machine's and this model's number,
        so that plan_passes weighs padding against passes as they really compare here."""
        def timed(rows: int, width: int) -> float:
            seqs = [[self.probe] * width] * rows
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                self.forward(seqs)
                best = min(best, time.perf_counter() - t)
            return best

        timed(1, 8)  # warm-up
        specials = self.info["specials"]
        short, wide = 16 + specials, 32 + specials  # padded widths
        small, large = timed(1, 16), timed(8, 32)
        per_token = max(1e-9, (large - small) / (8 * wide - short))
        return min(256.0, max(4.0, (small - short * per_token) / per_token))


def serve(conn: Connection, path: str, first: bool, core: int | None) -> None:
    """The model process's whole life. Ctrl-C and SIGTERM are the server's to handle: it
    finishes its requests, then closes this process (or dies, and the pipe's EOF ends it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if core is not None:  # its own core: 4 % more sentences/s than when they wandered
        os.sched_setaffinity(0, {core})
    try:
        import torch

        torch.set_num_threads(1)  # one thread per process: see engines/embeddings.py
        model = Model(Path(path))
        model.forward([[model.probe]])  # the first pass pays for lazy initialisation
        info = dict(model.info)
        if first:
            info.update(tokenizer=model.tokenizer, overhead_tokens=model.calibrate())
    except Exception as exc:
        conn.send(("failed", str(exc)))
        return
    conn.send(("ready", info))
    while True:
        try:
            sequences = conn.recv()
        except (EOFError, OSError):
            return
        if sequences is None:
            return
        try:
            conn.send(("ok", model.forward(sequences)))
        except Exception as exc:  # this pass's requests hear why; the next pass may run
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
