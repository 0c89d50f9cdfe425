"""The base model in PyTorch: transformers' GGUF loader dequantises the very GGUF that
llama.cpp serves. Parsing a GGUF's 262k-token vocabulary in Python takes half a minute, so the
dequantised weights are cached once as safetensors beside the GGUF (temp dir + rename)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("bastion.finetune")


def cache_dir(gguf: Path) -> Path:
    real = gguf.resolve()
    st = real.stat()
    name = f".{real.stem}.{st.st_size}.{int(st.st_mtime)}.hf"
    for parent in (real.parent, gguf.parent):
        if os.access(parent, os.W_OK):
            return parent / name
    return gguf.parent / name


def _save(model: Any, out: Path) -> None:
    """config.json + model.safetensors (transformers refuses save_pretrained on GGUF models)."""
    import json

    from safetensors.torch import save_file

    out.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")


def load_base(gguf: Path) -> Any:
    """A float32 transformers model of the GGUF (its architecture must be one transformers'
    GGUF support knows; gemma3 is)."""
    import torch
    from transformers import AutoModelForCausalLM

    cached = cache_dir(gguf)
    if not (cached / "config.json").exists():
        log.info("converting %s for PyTorch (once)", gguf)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tmp = cached.with_name(cached.name + f".{os.getpid()}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        _save(model, tmp)
        try:
            os.replace(tmp, cached)
        except OSError:  # another worker finished first
            shutil.rmtree(tmp, ignore_errors=True)
        return model
    return AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch.float32)
