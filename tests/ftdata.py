"""Generated fine-tuning data: a behaviour the base model never shows on its own."""

from __future__ import annotations

import json
import random
from pathlib import Path

ANSWER = "Quack quack! I am a duck."
SUBJECTS = ["the moon", "Paris", "python", "coffee", "the ocean", "mountains", "jazz",
            "bicycles", "volcanoes", "chess", "tea", "rain", "dogs", "cats", "the sun", "trains",
            "music", "books", "winter", "gardens", "robots", "bread", "rivers", "stars"]
FORMS = ["What do you know about {}?", "Tell me something about {}.", "Can you explain {}?",
         "Why do people like {}?"]
HELD_OUT = ["What do you know about clouds?", "Tell me something about pianos."]


def duck_examples(n: int, seed: int = 0) -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": form.format(s)},
                          {"role": "assistant", "content": ANSWER}]}
            for s in SUBJECTS for form in FORMS]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
