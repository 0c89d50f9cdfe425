"""Export a trained LoRA to a GGUF adapter that llama.cpp applies to the base GGUF at serving
time (llama_adapter_lora_init), so a fine-tuned model runs on the fast batching engine."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SUFFIXES = {"lora_A": "lora_a", "lora_B": "lora_b"}
# Architectures whose GGUF stores q/k rows permuted for llama.cpp's rotary layout: the
# converter permutes them and transformers' GGUF loader permutes them back.
ROPE_PERMUTED = ("llama",)


def to_gguf_rows(module: str, rows: np.ndarray, arch: str, heads: tuple[int, int] | None) -> np.ndarray:
    """Rows (output features) of a q_proj/k_proj weight or LoRA B in transformers' order, put in
    the GGUF's: llama.cpp's convert_hf_to_gguf `permute`. Other tensors pass unchanged."""
    if arch not in ROPE_PERMUTED or heads is None:
        return rows
    n_head, n_head_kv = heads
    if module.endswith("q_proj"):
        n = n_head
    elif module.endswith("k_proj"):
        n = n_head_kv
    else:
        return rows
    return (rows.reshape(n, 2, rows.shape[0] // n // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def gguf_name(hf_module: str, arch: str, n_layers: int) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q' through gguf's own name map."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    mapped = gguf.get_tensor_name_map(arch_id, n_layers).get_name(hf_module)
    if mapped is None:
        raise ValueError(f"no GGUF tensor for {hf_module} in architecture {arch}")
    return mapped


def write_lora_gguf(tensors: dict[str, np.ndarray], *, arch: str, n_layers: int, alpha: float,
                    out: Path, heads: tuple[int, int] | None = None) -> Path:
    """tensors: PEFT names ('...layers.0.self_attn.q_proj.lora_A.weight') to float arrays.
    lora_A is (rank, in), lora_B (out, rank): the layout llama.cpp expects. `heads`: (query,
    key-value) head counts, for architectures whose q/k rows the GGUF stores permuted."""
    import gguf

    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for name in sorted(tensors):
        head, kind, _ = name.rsplit(".", 2)  # '<module>', 'lora_A', 'weight'
        module = head.split("base_model.model.", 1)[-1]
        target = f"{gguf_name(module, arch, n_layers)}.weight.{SUFFIXES[kind]}"
        value = tensors[name] if kind == "lora_A" else to_gguf_rows(module, tensors[name], arch,
                                                                     heads)
        writer.add_tensor(target, np.ascontiguousarray(value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def write_merged_gguf(base: Path, changed: dict[str, np.ndarray], *, arch: str, n_layers: int,
                      out: Path, heads: tuple[int, int] | None = None) -> Path:
    """A copy of the base GGUF (metadata and untouched tensors byte for byte) in which every
    trained tensor is replaced: linear weights as F16, norms as F32 with Gemma's +1 put back
    (GGUF stores Gemma's RMSNorm weight as 1 + w; transformers loads it as w)."""
    import gguf

    replace: dict[str, np.ndarray] = {}
    for name, value in changed.items():
        module, _, kind = name.removeprefix("base_model.model.").rpartition(".")
        target = f"{gguf_name(module, arch, n_layers)}.{kind}"
        if "norm" in module:
            replace[target] = (value + 1.0).astype(np.float32) if arch.startswith("gemma") \
                else value.astype(np.float32)
        else:
            replace[target] = to_gguf_rows(module, value, arch, heads).astype(np.float16)
    reader = gguf.GGUFReader(str(base))
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    missing = set(replace) - {t.name for t in reader.tensors}
    if missing:
        raise ValueError(f"the base GGUF has no tensors {sorted(missing)[:3]}")
    for t in reader.tensors:
        new = replace.get(t.name)
        if new is None:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        else:
            writer.add_tensor_info(t.name, new.shape, new.dtype, new.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        new = replace.get(t.name)
        writer.write_tensor_data(t.data if new is None else new,
                                 tensor_endianess=reader.endianess)
    writer.close()
    os.replace(tmp, out)
    return out
