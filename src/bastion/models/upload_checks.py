"""What an uploaded model must pass before anything loads it: the weights are safetensors or
GGUF (never pickle), the safetensors header is whole and consistent with the file's size, the
config names an architecture transformers ships (no remote code), its sizes are within bounds
and imply no more parameters than were uploaded (checked on the JSON, before transformers
builds anything: a 1 KB upload claiming fifty million layers is refused by arithmetic), and
every tensor has the shape the config implies. A GGUF is parsed in a process of its own
(engines/llamacpp/probe.py). Each failure says exactly what is wrong, so the uploader can fix
it."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.engines.llamacpp.probe import GgufFacts, ProbeError, probe
from bastion.errors import InvalidRequestError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own bound
MAX_CONFIG_BYTES = 1024 * 1024  # config.json: real ones are a few KB
# Bounds on config.json's sizes, by the names architectures give them, each well above any
# released model's (the largest have ~130 layers, hidden sizes of ~25k, vocabularies of ~260k).
CONFIG_BOUNDS: dict[str, tuple[int, tuple[str, ...]]] = {
    "layers": (1024, ("num_hidden_layers", "n_layer", "n_layers", "num_layers")),
    "hidden": (65536, ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim",
                       "kv_lora_rank", "q_lora_rank")),
    "head": (4096, ("head_dim", "kv_channels", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim")),
    "heads": (4096, ("num_attention_heads", "n_head", "num_heads", "num_key_value_heads",
                     "n_head_kv", "num_kv_heads", "multi_query_group_num")),
    "vocab": (1 << 21, ("vocab_size", "padded_vocab_size")),
    "intermediate": (1 << 19, ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size",
                               "moe_intermediate_size", "shared_expert_intermediate_size")),
    "positions": (1 << 24, ("max_position_embeddings", "n_positions", "max_seq_len",
                            "seq_length", "n_ctx", "max_sequence_length", "sliding_window")),
    "experts": (1024, ("num_experts", "num_local_experts", "n_routed_experts",
                       "num_experts_per_tok", "n_shared_experts")),
}
BOUNDED = {name: (bound, kind) for kind, (bound, names) in CONFIG_BOUNDS.items()
           for name in names}
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
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
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise bad(f"Tensor '{name}' has unknown dtype {dtype!r}.")
        if any(d < 0 for d in shape) or not isinstance(begin, int) or not isinstance(end, int):
            raise bad(f"Tensor '{name}' has a negative dimension or a malformed byte range.")
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
    """A transformers config of an architecture transformers itself implements, its sizes
    within CONFIG_BOUNDS (checked before transformers sees it: some configs build per-layer
    lists in their constructor)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise bad(f"config.json is {path.stat().st_size} bytes; the limit is "
                  f"{MAX_CONFIG_BYTES}.", param="config")
    try:
        raw = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
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
    check_bounds(raw)
    try:
        return CONFIG_MAPPING[model_type].from_dict(raw)
    except Exception as exc:
        raise bad(f"config.json is not a valid {model_type} config: {exc}",
                  param="config") from None


def check_bounds(raw: dict[str, Any], where: str = "") -> None:
    """Every size config.json gives (at any depth: text_config, attn_config...) is a whole
    number within its bound, so nothing built from it can be huge."""
    for key, value in raw.items():
        name = f"{where}{key}"
        if isinstance(value, dict) and where.count(".") < 4:
            check_bounds(value, f"{name}.")
            continue
        if key not in BOUNDED or value is None:
            continue
        bound, kind = BOUNDED[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"config.json's {name} must be a whole number, not {value!r}.",
                      param="config", code="invalid_config")
        if not 0 <= value <= bound:
            raise bad(f"config.json's {name} is {value}; it must be between 0 and {bound} "
                      f"(no released model's {kind} size comes near).", param="config",
                      code="invalid_config")


def _size(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_parameter_floor(config: Any, tensors: dict[str, TensorInfo]) -> int:
    """The uploaded weights' parameter count, refused when config.json implies more than
    that: at least vocab_size x hidden_size for the embedding, and hidden_size^2 / 4 per layer
    (a layer's attention output alone is hidden x heads x head_dim). Arithmetic on the config,
    before anything is built from it."""
    uploaded = sum(math.prod(t.shape) for t in tensors.values())
    uploaded_bytes = sum(math.prod(t.shape) * DTYPE_BYTES[t.dtype] for t in tensors.values())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _size(text, "hidden_size", "n_embd", "d_model")
    vocab = _size(text, "vocab_size")
    layers = _size(text, "num_hidden_layers", "n_layer", "num_layers")
    if hidden is None:
        return uploaded
    embedding = (vocab or 0) * hidden
    per_layer = hidden * hidden // 4
    floor = embedding + (layers or 0) * per_layer

    def refuse(field: str, value: str, at_least: int) -> InvalidRequestError:
        return bad(f"config.json's {field} ({value}) implies at least {at_least:,} parameters "
                   f"(about {_human(at_least * 2)} in 16-bit weights), but the uploaded "
                   f"weights hold {uploaded:,} ({_human(uploaded_bytes)}).",
                   param="config", code="config_mismatch")

    if embedding > uploaded:
        raise refuse("vocab_size x hidden_size", f"{vocab} x {hidden}", embedding)
    if floor > uploaded:
        raise refuse("num_hidden_layers", f"{layers}, with hidden_size {hidden}", floor)
    return uploaded


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover


def check_shapes(config: Any, tensors: dict[str, TensorInfo]) -> None:
    """Build the architecture on the meta device (no memory) and compare every parameter;
    the config's sizes were bounded first (read_config, check_parameter_floor)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # e.g. a hidden size that the heads do not divide
        raise bad(f"A {config.model_type} model cannot be built from this config.json: "
                  f"{exc}", param="config", code="invalid_config") from None
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


def check_gguf(path: Path, *, seconds: float, memory: int) -> GgufFacts:
    """What the GGUF holds, read in a process of its own (probe.py): a damaged, truncated or
    crafted GGUF is refused before the server's own process opens it."""
    try:
        return probe(path, seconds=seconds, memory=memory)
    except ProbeError as exc:
        raise bad(f"The GGUF file was refused: {exc}.") from None


def gguf_cost(facts: GgufFacts, context_per_sequence: int, parallel: int) -> int:
    """Estimated bytes in memory of a GGUF loaded by the llama.cpp engine: its weights and the
    KV cache of `parallel` sequences of the context it gets (residency.py's budget counts it)."""
    context = context_per_sequence
    if facts.n_ctx_train > 0:
        context = min(context, facts.n_ctx_train)
    return facts.size + facts.kv_bytes(context * parallel)


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
