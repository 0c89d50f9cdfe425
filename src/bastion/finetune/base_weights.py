"""The base model in PyTorch: transformers' GGUF loader dequantises the very GGUF that
llama.cpp serves. Parsing a GGUF's 262k-token vocabulary in Python takes half a minute, so the
dequantised weights are cached once as safetensors beside the GGUF (temp dir + rename), or in
the data directory's models folder when the GGUF lies inside an installed package."""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Any

log = logging.getLogger("bastion.finetune")


def _in_site_packages(path: Path) -> bool:
    paths = sysconfig.get_paths()
    return any(path.is_relative_to(Path(paths[k]).resolve()) for k in ("purelib", "platlib"))


def cache_dir(gguf: Path, fallback: Path | None = None) -> Path:
    """Beside the GGUF (shared by every data directory that links to it), but never inside
    site-packages (SmolLM2's GGUF is read in place from its package): `fallback` then."""
    real = gguf.resolve()
    st = real.stat()
    name = f".{real.stem}.{st.st_size}.{int(st.st_mtime)}.hf"
    for parent in (real.parent, gguf.parent):
        if os.access(parent, os.W_OK) and not _in_site_packages(parent.resolve()):
            return parent / name
    return (fallback or gguf.parent) / name


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


def load_base(gguf: Path, cache_root: Path | None = None) -> Any:
    """A float32 transformers model of the GGUF (its architecture must be one transformers'
    GGUF support knows; gemma3 and llama are)."""
    import torch
    from transformers import AutoModelForCausalLM

    cached = cache_dir(gguf, cache_root)
    cached.parent.mkdir(parents=True, exist_ok=True)
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
