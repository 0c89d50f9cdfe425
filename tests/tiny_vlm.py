"""A tiny but real multimodal GGUF pair for the vision tests: the bundled Gemma 3 270M as the
language model and a random-weight CLIP ViT with a LLaVA 'mlp' projector as its mmproj.

No small vision model can be installed from the package registries here, so the projector is
written with gguf-py using the keys and tensor names llama.cpp's clip loader reads (those of
its LLaVA conversion scripts). llama.cpp then runs its real loading, image preprocessing
(resize, normalise, patchify), ViT encoding, projection and decoding: only the weights are
random, so what the model says about an image is noise, but which image it saw is not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SIZE = 32
PATCH_SIZE = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # LLaVA drops no patch: one embedding each
GEMMA3_POOL = 2  # Gemma 3 average-pools patches: 4x4 patches -> 2x2 image tokens
GEMMA3_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE // GEMMA3_POOL) ** 2
HIDDEN = 32
FFN = 64
HEADS = 2
TEXT_EMBD = 640  # Gemma 3 270M's embedding width: the projector must produce exactly this


def write_mmproj(path: Path, *, seed: int = 0, text_embd: int = TEXT_EMBD,
                 projector: str = "mlp") -> Path:
    """A one-block vision tower (32 px images, 8 px patches) and its projector: "mlp" is
    LLaVA's (CLIP ViT, one embedding per patch, causal), "gemma3" Gemma 3's (SigLIP ViT,
    2x2 average pooling, RMS norm and a linear map; wrapped in <start_of_image> and
    <end_of_image> and decoded with non-causal attention)."""
    import gguf

    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    gemma3 = projector == "gemma3"
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_string("general.name", f"tiny-{projector} (random weights, for tests)")
    writer.add_uint32("general.file_type", 0)  # all F32
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_string("clip.projector_type", projector)
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    writer.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    writer.add_uint32("clip.vision.embedding_length", HIDDEN)
    writer.add_uint32("clip.vision.feed_forward_length", FFN)
    writer.add_uint32("clip.vision.projection_dim", text_embd)
    writer.add_uint32("clip.vision.attention.head_count", HEADS)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_uint32("clip.vision.block_count", 1)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    if gemma3:
        writer.add_uint32("clip.vision.projector.scale_factor", GEMMA3_POOL)

    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    # numpy shapes are ggml's reversed: a Linear(in, out) weight is (out, in)
    tensors = {
        "v.patch_embd.weight": w(HIDDEN, 3, PATCH_SIZE, PATCH_SIZE),
        "v.blk.0.ln1.weight": ones(HIDDEN), "v.blk.0.ln1.bias": w(HIDDEN, scale=0.01),
        "v.blk.0.attn_q.weight": w(HIDDEN, HIDDEN), "v.blk.0.attn_q.bias": w(HIDDEN),
        "v.blk.0.attn_k.weight": w(HIDDEN, HIDDEN), "v.blk.0.attn_k.bias": w(HIDDEN),
        "v.blk.0.attn_v.weight": w(HIDDEN, HIDDEN), "v.blk.0.attn_v.bias": w(HIDDEN),
        "v.blk.0.attn_out.weight": w(HIDDEN, HIDDEN), "v.blk.0.attn_out.bias": w(HIDDEN),
        "v.blk.0.ln2.weight": ones(HIDDEN), "v.blk.0.ln2.bias": w(HIDDEN, scale=0.01),
        "v.blk.0.ffn_up.weight": w(FFN, HIDDEN), "v.blk.0.ffn_up.bias": w(FFN),
        "v.blk.0.ffn_down.weight": w(HIDDEN, FFN), "v.blk.0.ffn_down.bias": w(HIDDEN),
    }
    if gemma3:
        tensors |= {
            "v.patch_embd.bias": w(HIDDEN),
            "v.position_embd.weight": w(n_patches, HIDDEN),
            "v.post_ln.weight": ones(HIDDEN), "v.post_ln.bias": w(HIDDEN, scale=0.01),
            "mm.soft_emb_norm.weight": ones(HIDDEN),
            # used transposed: (vision width, text width); large, as mm.2 below
            "mm.input_projection.weight": w(HIDDEN, text_embd, scale=2.0),
        }
    else:
        tensors |= {
            "v.class_embd": w(HIDDEN),
            "v.position_embd.weight": w(n_patches + 1, HIDDEN),
            "v.pre_ln.weight": ones(HIDDEN), "v.pre_ln.bias": w(HIDDEN, scale=0.01),
            "mm.0.weight": w(text_embd, HIDDEN), "mm.0.bias": w(text_embd),
            # large enough that the image, not the text, decides what the model says next,
            # so the tests can tell images apart (and a misplaced image) from the first token
            "mm.2.weight": w(text_embd, text_embd, scale=0.5), "mm.2.bias": w(text_embd),
        }
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
