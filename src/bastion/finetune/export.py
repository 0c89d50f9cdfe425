"""Export a trained LoRA to a GGUF adapter that llama.cpp applies to the base GGUF at serving
time (llama_adapter_lora_init), so a fine-tuned model runs on the fast batching engine."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SUFFIXES = {"lora_A": "lora_a", "lora_B": "lora_b"}


def gguf_name(hf_module: str, arch: str, n_layers: int) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q' through gguf's own name map."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    mapped = gguf.get_tensor_name_map(arch_id, n_layers).get_name(hf_module)
    if mapped is None:
        raise ValueError(f"no GGUF tensor for {hf_module} in architecture {arch}")
    return mapped


def write_lora_gguf(tensors: dict[str, np.ndarray], *, arch: str, n_layers: int, alpha: float,
                    out: Path) -> Path:
    """tensors: PEFT names ('...layers.0.self_attn.q_proj.lora_A.weight') to float arrays.
    lora_A is (rank, in), lora_B (out, rank): the layout llama.cpp expects."""
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
        writer.add_tensor(target, np.ascontiguousarray(tensors[name], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out
