"""Images for llama.cpp multimodal models: the mmproj projector through llama-cpp-python's
mtmd bindings (libmtmd). An image is preprocessed into the model's patches when the prompt is
rendered, encoded by the vision tower on a worker thread once its request is admitted, and its
embeddings decoded into one sequence's KV cache by the scheduler thread."""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import llama_cpp as lc
import numpy as np
from llama_cpp import mtmd_cpp as mt

from bastion.engines.base import (DecodedImage, EngineError, ModelInputError,
                                  ModelUnavailable)
from bastion.engines.llamacpp.model import LlamaModel

log = logging.getLogger("bastion.llamacpp")


@lc.llama_log_callback
def _mtmd_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    """libmtmd prints every tensor it loads; keep its warnings and errors only."""
    if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
        msg = text.decode("utf-8", "replace").rstrip()
        if msg:
            log.log(logging.WARNING if level == 3 else logging.ERROR, "mtmd: %s", msg)


class ImageChunk:
    """One image after mtmd's preprocessing, ready to encode; owns its libmtmd chunk, which
    needs no context to be freed, so it may outlive the request that made it."""

    def __init__(self, ptr: int, n_tokens: int) -> None:
        self.ptr: int | None = ptr
        self.n_tokens = n_tokens
        self.embd: np.ndarray | None = None  # n_tokens x n_embd floats, once encoded

    def close(self) -> None:
        if self.ptr:
            mt.mtmd_input_chunk_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()


class Projector:
    """An mmproj file bound to its text model. Preprocessing and encoding run on request
    worker threads, one at a time under a lock (libmtmd keeps one output buffer); decoding the
    embeddings runs on the scheduler thread without it."""

    def __init__(self, path: Path, model: LlamaModel, *, threads: int) -> None:
        self._lock = threading.Lock()
        mt.mtmd_log_set(_mtmd_log, ctypes.c_void_p(0))
        mt.mtmd_helper_log_set(_mtmd_log, ctypes.c_void_p(0))
        params = mt.mtmd_context_params_default()
        params.print_timings = False
        params.n_threads = threads
        params.warmup = False  # use_gpu stays the default: a GPU build encodes on the GPU
        self.ctx = mt.mtmd_init_from_file(str(path).encode(), model.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not load the multimodal projector at {path} "
                               f"(is it the mmproj file made for this model?)")
        self._model = model
        self.n_embd = lc.llama_model_n_embd_inp(model.model)
        try:
            if not mt.mtmd_support_vision(self.ctx):
                raise RuntimeError(f"the projector at {path} has no vision encoder")
            if mt.mtmd_decode_use_mrope(self.ctx):
                # M-RoPE models (the Qwen2-VL family) give image tokens 2-D positions: the
                # scheduler keeps one position per prompt token, so it cannot run them yet.
                raise RuntimeError(f"the projector at {path} uses M-RoPE positions (Qwen2-VL "
                                   f"family), which Bastion's scheduler does not support yet")
        except BaseException:
            self.close()
            raise
        self.marker = (mt.mtmd_default_marker() or b"<__media__>").decode()

    def tokenize_image(self, image: DecodedImage) -> list[list[int] | ImageChunk]:
        """The segments one image becomes: the model's own wrapper tokens (e.g. Gemma 3's
        <start_of_image>) as token lists, and the image itself as a chunk."""
        if image.width <= 0 or image.height <= 0 or len(image.rgb) != image.width * image.height * 3:
            raise ModelInputError("The image has no pixels or its pixel data does not match "
                                  "its size.", code="invalid_image")
        pixels = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
        marker = self.marker.encode()
        text = mt.mtmd_input_text(text=marker, text_len=len(marker), add_special=False,
                                  parse_special=True)
        segments: list[list[int] | ImageChunk] = []
        with self._lock:
            if not self.ctx:
                raise ModelUnavailable("The model is shutting down.",
                                       code="service_unavailable")
            bitmap = mt.mtmd_bitmap_init(image.width, image.height, pixels)
            if not bitmap:
                raise EngineError("llama.cpp could not take the image.")
            chunks = mt.mtmd_input_chunks_init()
            try:
                bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
                rc = mt.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, 1)
                if rc != 0:
                    raise EngineError(f"llama.cpp could not preprocess the image (status {rc}).")
                for i in range(mt.mtmd_input_chunks_size(chunks)):
                    chunk = mt.mtmd_input_chunks_get(chunks, i)
                    kind = mt.mtmd_input_chunk_get_type(chunk)
                    if kind == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                        n = ctypes.c_size_t(0)
                        toks = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                        if n.value:
                            segments.append(list(toks[:n.value]))
                    elif kind == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                        n_tokens = mt.mtmd_input_chunk_get_n_tokens(chunk)
                        if mt.mtmd_input_chunk_get_n_pos(chunk) != n_tokens:
                            raise EngineError("This projector gives images fewer positions "
                                              "than tokens, which is not supported yet.")
                        owned = mt.mtmd_input_chunk_copy(chunk)
                        if not owned:
                            raise EngineError("llama.cpp could not keep the image.")
                        segments.append(ImageChunk(owned, n_tokens))
                    else:
                        raise EngineError("The projector made a non-image chunk from an image.")
            finally:
                mt.mtmd_input_chunks_free(chunks)
                mt.mtmd_bitmap_free(bitmap)
        return segments

    def encode(self, image: ImageChunk) -> None:
        """Run the vision tower and projector over the image and keep the embeddings on it.
        Called on a worker thread once the request is admitted, so the other sequences keep
        decoding meanwhile; the lock keeps libmtmd's one output buffer to one encoder."""
        with self._lock:
            if not self.ctx or not image.ptr:
                raise ModelUnavailable("The model is shutting down.",
                                       code="service_unavailable")
            rc = mt.mtmd_encode_chunk(self.ctx, image.ptr)
            if rc != 0:
                raise EngineError(f"llama.cpp could not encode the image (status {rc}).")
            out = mt.mtmd_get_output_embd(self.ctx)
            image.embd = np.ctypeslib.as_array(out, shape=(image.n_tokens * self.n_embd,)).copy()

    def decode(self, image: ImageChunk, *, position: int, seq_id: int) -> int:
        """Decode an encoded image's embeddings into sequence seq_id's KV cache from
        `position` on (non-causally where the model wants it); returns the next free position.
        Runs on the scheduler thread, which owns the llama_context, between two of its
        batches. No lock: this reads only the projector's fixed settings, never its buffers."""
        if image.embd is None or not image.ptr or not self.ctx:
            raise EngineError("The image was not encoded.")
        new_past = lc.llama_pos(0)
        embd = image.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = mt.mtmd_helper_decode_image_chunk(self.ctx, self._model.ctx, image.ptr, embd,
                                               position, seq_id, self._model.n_batch,
                                               ctypes.byref(new_past),
                                               mt.mtmd_helper_post_decode_callback(), None)
        if rc != 0:
            raise EngineError(f"llama.cpp could not decode the image (status {rc}).")
        return new_past.value

    def close(self) -> None:
        with self._lock:
            if self.ctx:
                mt.mtmd_free(self.ctx)
                self.ctx = None
