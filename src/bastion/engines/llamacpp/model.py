"""One GGUF model and its llama.cpp context, wrapped for the scheduler (low-level API only)."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import llama_cpp as lc
import numpy as np

log = logging.getLogger("bastion.llamacpp")

_backend_lock = threading.Lock()
_backend_ready = False


@lc.llama_log_callback
def _log_callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    """llama.cpp is chatty; keep its warnings and errors only."""
    if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
        msg = text.decode("utf-8", "replace").rstrip()
        if msg:
            log.log(logging.WARNING if level == 3 else logging.ERROR, msg)


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
            lc.llama_backend_init()
            _backend_ready = True


class LlamaModel:
    """Owns the llama_model, the llama_context with one KV stream per sequence slot, and a batch."""

    def __init__(self, path: Path, *, n_seq: int, ctx_per_seq: int, n_batch: int,
                 threads: int | None, lora: Path | None = None, vocab_only: bool = False,
                 swa_full: bool = False) -> None:
        """`lora`: a GGUF LoRA adapter applied to every sequence (a fine-tuned model).
        `vocab_only`: tokenizer and metadata without weights or context (fine-tuning data).
        `swa_full`: sliding-window layers keep every position (prefix caching needs it)."""
        _init_backend()
        mparams = lc.llama_model_default_params()
        mparams.vocab_only = vocab_only
        # No repacked weight layouts ("extra buffer types"): with them, rows of one batch went
        # through different kernels (tiles of rows, then the rest), so two identical greedy
        # sequences in one step could round apart and diverge (n=2 at temperature 0 wrote
        # two different stories on an AVX-512 build). Measured here without them: decode
        # 2-4 % slower at 1-16 sequences (within this machine's noise), prefill the same.
        mparams.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load the GGUF model at {path}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.bos = lc.llama_vocab_bos(self.vocab)
        self.eos = lc.llama_vocab_eos(self.vocab)
        self.add_bos = lc.llama_vocab_get_add_bos(self.vocab)
        self.ctx = None
        self.adapter = None  # the LoRA adapter of a fine-tuned model
        if vocab_only:
            return
        self.n_ctx_train = lc.llama_model_n_ctx_train(self.model)
        self.ctx_per_seq = min(ctx_per_seq, self.n_ctx_train) if self.n_ctx_train > 0 else ctx_per_seq
        self.n_seq = n_seq
        self.n_batch = max(n_batch, n_seq)  # every running sequence needs a row in each step
        n_batch = self.n_batch
        n_threads = threads or max(1, os.cpu_count() or 1)
        self.n_threads = n_threads

        cparams = lc.llama_context_default_params()
        cparams.n_ctx = self.ctx_per_seq * n_seq
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.kv_unified = False  # one KV stream per slot: attention never scans other sequences
        # Sliding-window layers keep only their window unless told otherwise: far less memory,
        # but then a kept prefix lacks the window before its end once a longer sequence ran
        # in its slot, and cannot be reused. Prefix caching pays the memory to keep it.
        cparams.swa_full = swa_full
        # The graph reserves logits for every possible output; bounding the outputs per step
        # keeps that buffer small (262k-token vocabularies make it 1 MiB per output).
        self.n_outputs_max = max(64, 2 * n_seq)
        cparams.n_outputs_max = self.n_outputs_max
        cparams.n_outputs_max_per_seq = self.n_outputs_max
        cparams.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.ctx_per_seq = lc.llama_n_ctx_seq(self.ctx)
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.n_params = lc.llama_model_n_params(self.model)
        self.n_swa = lc.llama_model_n_swa(self.model)
        if lora is not None:
            self._apply_lora(lora)

    def _apply_lora(self, path: Path) -> None:
        adapter = lc.llama_adapter_lora_init(self.model, str(path).encode())
        if not adapter:
            self.close()
            raise RuntimeError(f"llama.cpp could not load the LoRA adapter at {path}")
        self.adapter = adapter
        if not self.apply_adapter(self.ctx):
            self.close()
            raise RuntimeError(f"llama.cpp could not apply the LoRA adapter at {path}")

    def apply_adapter(self, ctx: lc.llama_context_p) -> bool:
        """Put the model's LoRA adapter (if any) on a context: the serving one, or another
        made on these weights (embeddings)."""
        if self.adapter is None:
            return True
        adapters = (lc.llama_adapter_lora_p_ctypes * 1)(self.adapter)
        scales = (ctypes.c_float * 1)(1.0)
        return lc.llama_set_adapters_lora(ctx, adapters, 1, scales) == 0

    # --- metadata -------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = lc.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            lc.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        raw = lc.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", "replace") if raw else None

    def token_text(self, token: int) -> str:
        raw = lc.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def fim_tokens(self) -> tuple[int, int, int] | None:
        ids = (lc.llama_vocab_fim_pre(self.vocab), lc.llama_vocab_fim_suf(self.vocab),
               lc.llama_vocab_fim_mid(self.vocab))
        return None if any(t < 0 for t in ids) else ids

    # --- text <-> tokens ------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8", "replace")
        n_max = len(data) + 8
        buf = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            buf = (lc.llama_token * -n)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """Bytes of one token; called from several threads, so the buffer is per call."""
        buf = ctypes.create_string_buffer(64)
        n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

    # --- decoding ---------------------------------------------------------------------------
    def decode(self, entries: list[tuple[int, int, int, bool]]) -> int:
        """entries: (token, position, slot, wants_logits). Returns llama_decode's status."""
        b = self.batch
        for i, (tok, pos, slot, out) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = slot
            b.logits[i] = out
        b.n_tokens = len(entries)
        return lc.llama_decode(self.ctx, b)

    def logits(self, batch_index: int) -> np.ndarray:
        """Logits of the token at batch_index of the last decode (it must have asked for them)."""
        ptr = lc.llama_get_logits_ith(self.ctx, batch_index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def clear_slot(self, slot: int) -> None:
        lc.llama_memory_seq_rm(self.memory, slot, -1, -1)

    def trim_slot(self, slot: int, keep: int) -> bool:
        """Drop the slot's KV from position `keep` on; False if what remains cannot be
        extended exactly (a sliding-window layer lost positions the next token attends to)."""
        if keep <= 0:
            self.clear_slot(slot)
            return True
        if not lc.llama_memory_seq_rm(self.memory, slot, keep, -1):
            return False
        pos_min = lc.llama_memory_seq_pos_min(self.memory, slot)
        return 0 <= pos_min <= max(0, keep - self.n_swa) if self.n_swa else pos_min == 0

    def copy_slot(self, src: int, dst: int) -> None:
        lc.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def close(self) -> None:
        if self.ctx:
            lc.llama_batch_free(self.batch)
            lc.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lc.llama_model_free(self.model)  # frees its adapters too
            self.model = None
