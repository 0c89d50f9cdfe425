"""What an uploaded model must pass before anything loads it: the weights are safetensors or
GGUF (never pickle), the safetensors header is whole and consistent with the file's size, the
config names an architecture transformers ships (no remote code), and every tensor has the shape
the config implies. Each failure says exactly what is wrong, so the uploader can fix it."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.errors import InvalidRequestError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own bound
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
PICKLE_HINT = ("Only safetensors and GGUF weights are accepted: pickle files (.bin, .pt, .pth, "
               ".ckpt) can run code when loaded and are never opened here. Convert with "
               "`safetensors.torch.save_file(model.state_dict(), 'model.safetensors')`.")


def bad(message: str, param: str = "file", code: str = "invalid_model") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def sniff(path: Path) -> str:
    """'gguf' or 'safetensors' from the file's first bytes (never from its name)."""
    with path.open("rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:1] == b"\x80" or head[:2] == b"PK":  # a pickle, or torch's zip of pickles
        raise bad(PICKLE_HINT, code="unsupported_model_format")
    if len(head) < 8:
        raise bad("The model file is empty or truncated (shorter than a safetensors header).")
    return "safetensors"


def safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and cross-check the header: a truncated or padded file, overlapping or missing
    byte ranges, or a size that disagrees with dtype x shape is refused."""
    size = path.stat().st_size
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise bad(f"The safetensors header claims {n} bytes but the file has only "
                      f"{size - 8} after its length: the file is truncated or not safetensors.")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"The safetensors header is not valid JSON ({exc}); the file is damaged or "
                  f"not safetensors.") from None
    if not isinstance(header, dict):
        raise bad("The safetensors header is not a JSON object.")
    header.pop("__metadata__", None)
    if not header:
        raise bad("The safetensors file holds no tensors.")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
        except (TypeError, KeyError, ValueError):
            raise bad(f"Tensor '{name}' has a malformed safetensors header entry.") from None
        if dtype not in DTYPE_BYTES:
            raise bad(f"Tensor '{name}' has unknown dtype {dtype!r}.")
        want = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != want or begin < 0:
            raise bad(f"Tensor '{name}' ({dtype} {list(shape)}) needs {want} bytes but its "
                      f"byte range holds {end - begin}.")
        tensors[name] = TensorInfo(dtype, shape)
        spans.append((begin, end, name))
    data = size - 8 - n
    cursor = 0
    for begin, end, name in sorted(spans):
        if begin != cursor:
            raise bad(f"Tensor '{name}' starts at byte {begin}, expected {cursor}: the header's "
                      f"byte ranges overlap or leave gaps.")
        cursor = end
    if cursor != data:
        what = "truncated" if cursor > data else "longer than its header says"
        raise bad(f"The safetensors file is {what}: its tensors need {cursor} bytes of data, "
                  f"the file has {data}.")
    return tensors


def read_config(path: Path) -> Any:
    """A transformers config of an architecture transformers itself implements."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        raw = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"config.json is not valid JSON: {exc}", param="config") from None
    if not isinstance(raw, dict):
        raise bad("config.json must be a JSON object.", param="config")
    if "auto_map" in raw:
        raise bad("config.json has 'auto_map': the model needs its own Python code "
                  "(trust_remote_code), which is never run here. Upload a model of an "
                  "architecture transformers ships.", param="config",
                  code="unsupported_architecture")
    model_type = raw.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise bad(f"config.json's model_type {model_type!r} is not a causal language model "
                  f"transformers supports (for example llama, mistral, qwen2, gemma3_text, "
                  f"gpt2).", param="config", code="unsupported_architecture")
    try:
        return CONFIG_MAPPING[model_type].from_dict(raw)
    except Exception as exc:
        raise bad(f"config.json is not a valid {model_type} config: {exc}",
                  param="config") from None


def check_shapes(config: Any, tensors: dict[str, TensorInfo]) -> None:
    """Build the architecture on the meta device (no memory) and compare every parameter."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = {k for k in expected if k == "lm_head.weight"} \
        if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(tensors) - tied)
    if missing:
        raise bad(f"The weights lack {len(missing)} tensor(s) that config.json requires, e.g. "
                  f"{', '.join(missing[:3])}.", code="config_mismatch")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise bad(f"The weights have {len(unexpected)} tensor(s) that a {config.model_type} "
                  f"model with this config.json does not, e.g. {', '.join(unexpected[:3])}.",
                  code="config_mismatch")
    for name, info in tensors.items():
        if info.shape != expected[name]:
            raise bad(f"Tensor '{name}' has shape {list(info.shape)} but config.json implies "
                      f"{list(expected[name])}.", code="config_mismatch")


def check_gguf(path: Path) -> str:
    """The GGUF's architecture; a damaged or truncated GGUF is refused before llama.cpp sees it."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.get_field("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as exc:
        raise bad(f"The GGUF file cannot be read ({exc}): it is truncated or damaged.") from None
    if not arch:
        raise bad("The GGUF file has no general.architecture.")
    return str(arch)


def check_tokenizer(path: Path, config: Any) -> None:
    """tokenizer.json parses, and every id it can produce has a row in the embedding."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise bad(f"tokenizer.json cannot be read: {exc}", param="tokenizer") from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab = getattr(config, "vocab_size", None) or config.get_text_config().vocab_size
    if size > vocab:
        raise bad(f"tokenizer.json has {size} tokens but config.json's vocab_size is {vocab}: "
                  f"ids past {vocab - 1} would have no embedding.", param="tokenizer",
                  code="config_mismatch")
