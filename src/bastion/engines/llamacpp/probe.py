"""A tenant's GGUF parsed in a process of its own, before the server's own process opens it.

llama.cpp's loader stops on a failed GGML_ASSERT with abort(), and a GGUF is tenant input: a
file whose hyperparameters contradict each other where llama.cpp asserts (more experts used
per token than it has, say) would kill the whole API server on upload, and again on every
replica that loads it. Here llama.cpp loads the model (weights mapped, never read; no context)
in a child process with an address-space and CPU-time limit and a wall-clock deadline:
whatever the file does, the child dies and the server answers a 400. (Python's gguf reader is
not used: it builds Python objects per vocabulary entry, 80 s for Gemma's 262k tokens on a
busy machine, where llama.cpp takes 3 s.)

The child prints one JSON object: what the server needs of the model without loading it
(architecture, size, parameters, the KV cache one token needs) or {"error": why}.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GgufFacts:
    architecture: str
    size: int  # bytes of weights, as llama.cpp counts them
    parameters: int
    n_ctx_train: int
    kv_bytes_per_token: int  # K and V of every layer, f16

    def kv_bytes(self, tokens: int) -> int:
        return self.kv_bytes_per_token * tokens


class ProbeError(Exception):
    """The GGUF cannot be read: the message says why, for the uploader."""


def probe(path: Path, *, seconds: float, memory: int) -> GgufFacts:
    """Parse `path` in a child process: at most `seconds` of wall time, and `memory` bytes of
    address space beyond the file's size (llama.cpp maps it)."""
    limit = path.stat().st_size + memory
    # GGML_NO_BACKTRACE: an abort would otherwise attach gdb to print the child's stack
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
           "GGML_NO_BACKTRACE": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bastion.engines.llamacpp.probe", str(path), str(limit),
             str(max(1, int(seconds)))],
            capture_output=True, timeout=seconds, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ProbeError(f"reading it took over {seconds:g} s") from None
    if done.returncode < 0:
        try:
            sig = signal.Signals(-done.returncode).name
        except ValueError:
            sig = f"signal {-done.returncode}"
        why = {"SIGABRT": "llama.cpp's loader aborted on it",
               "SIGSEGV": "llama.cpp's loader crashed on it",
               "SIGXCPU": f"reading it took over {seconds:g} s of CPU",
               "SIGKILL": "reading it was stopped (time or memory)"}.get(sig, f"it got {sig}")
        raise ProbeError(f"{why}: the file is damaged or crafted")
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        out: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        out = {}
    if done.returncode != 0 or "error" in out or "architecture" not in out:
        error = str(out.get("error") or "")
        if not error and b"MemoryError" in done.stderr:
            error = f"reading it needed over {memory // 2 ** 20} MiB"
        raise ProbeError(error or f"parsing it failed (exit status {done.returncode})")
    return GgufFacts(**out)


# --- the child ------------------------------------------------------------------------------
def _facts(path: str) -> dict[str, Any]:
    import llama_cpp as lc

    from bastion.engines.llamacpp.model import _init_backend

    _init_backend()
    params = lc.llama_model_default_params()
    params.use_extra_bufts = False
    model = lc.llama_model_load_from_file(path.encode(), params)
    if not model:
        return {"error": "llama.cpp could not load it: it is truncated or damaged, or its "
                         "architecture, hyperparameters, vocabulary or tensors are not ones "
                         "llama.cpp supports"}
    try:
        def meta(key: str) -> str | None:
            buf = ctypes.create_string_buffer(256)
            n = lc.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
            return buf.value.decode("utf-8", "replace") if n > 0 else None

        def meta_int(key: str) -> int | None:
            try:
                return int(meta(key) or "")
            except ValueError:
                return None

        arch = meta("general.architecture")
        if not arch:
            return {"error": "it has no general.architecture"}

        n_layer = lc.llama_model_n_layer(model)
        n_head = max(1, lc.llama_model_n_head(model))
        n_head_kv = lc.llama_model_n_head_kv(model) or n_head
        n_embd = lc.llama_model_n_embd(model)
        k = meta_int(f"{arch}.attention.key_length") or n_embd // n_head
        v = meta_int(f"{arch}.attention.value_length") or n_embd // n_head
        return {"architecture": str(arch), "size": int(lc.llama_model_size(model)),
                "parameters": int(lc.llama_model_n_params(model)),
                "n_ctx_train": int(lc.llama_model_n_ctx_train(model)),
                "kv_bytes_per_token": int(n_layer * n_head_kv * (k + v) * 2)}
    finally:
        lc.llama_model_free(model)


def _main(argv: list[str]) -> int:
    path, limit, cpu = argv[0], int(argv[1]), int(argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        out = _facts(path)
    except MemoryError:
        out = {"error": "reading it needed more memory than allowed"}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
