"""Which served models can be fine-tuned: GGUF models of an architecture that the trainer loads
through transformers and the exporter writes back as a llama.cpp LoRA adapter."""

from __future__ import annotations

from pathlib import Path

from bastion.models.bundled import BUNDLED_ID
from bastion.models.catalog import Catalog, Deployment

TRAINABLE_ARCHITECTURES = ("gemma3", "llama")


def why_not_fine_tunable(dep: Deployment) -> str | None:
    """None when `dep` can be a base model, else the reason it cannot."""
    if dep.source == "fine-tuned":
        return "it is itself a fine-tuned model (fine-tuning a fine-tuned model is not supported)"
    arch = getattr(dep.engine, "architecture", None)
    if getattr(dep.engine, "path", None) is None or arch is None:
        return "its engine does not serve local GGUF weights"
    if arch not in TRAINABLE_ARCHITECTURES:
        return (f"its architecture '{arch}' cannot be trained here (supported: "
                f"{', '.join(TRAINABLE_ARCHITECTURES)})")
    return None


def base_path(dep: Deployment) -> Path:
    return Path(dep.engine.path)  # type: ignore[attr-defined]


def default_base(catalog: Catalog) -> Deployment | None:
    """The base used to check uploaded training data: the bundled Gemma 3 270M (the
    fine-tuning base) when it is served, else the first fine-tunable model served."""
    gemma = catalog.get(BUNDLED_ID)
    if gemma is not None and why_not_fine_tunable(gemma) is None:
        return gemma
    for dep in catalog.visible(None):
        if why_not_fine_tunable(dep) is None:
            return dep
    return None
