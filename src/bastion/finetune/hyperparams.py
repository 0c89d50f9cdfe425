"""Hyperparameters: 'auto' values chosen from the data size, like OpenAI's."""

from __future__ import annotations

import math
from typing import Any

from bastion.protocol.fine_tuning import Hyperparameters

# Adam learning rates that train in a few dozen steps on CPU without diverging.
BASE_LR = {"lora": 1e-3, "full": 2e-5}
TARGET_EXAMPLES_SEEN = 100  # small data sets get more epochs


def auto_epochs(n_examples: int) -> int:
    if n_examples > 10_000:
        return 1
    return max(3, min(10, math.ceil(TARGET_EXAMPLES_SEEN / max(1, n_examples))))


def auto_batch(n_examples: int) -> int:
    """Powers of two from 1 to 8, about an eighth of the data."""
    size = 1
    while size * 2 <= min(8, max(1, n_examples // 8)):
        size *= 2
    return size


def resolve(hp: Hyperparameters | None, *, method: str, n_examples: int, rank: int = 8,
            alpha: float = 16.0) -> dict[str, Any]:
    hp = hp or Hyperparameters()
    epochs = auto_epochs(n_examples) if hp.n_epochs == "auto" else hp.n_epochs
    batch = auto_batch(n_examples) if hp.batch_size == "auto" else hp.batch_size
    batch = min(batch, n_examples)
    mult = 1.0 if hp.learning_rate_multiplier == "auto" else float(hp.learning_rate_multiplier)
    lr = float(hp.learning_rate) if hp.learning_rate is not None else BASE_LR[method] * mult
    out: dict[str, Any] = {"n_epochs": epochs, "batch_size": batch,
                           "learning_rate_multiplier": lr / BASE_LR[method],
                           "learning_rate": lr}
    if method == "lora":
        out |= {"lora_rank": rank, "lora_alpha": alpha}
    return out
