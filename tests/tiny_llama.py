"""A tiny Llama built from a config (random weights, a word-level tokenizer with a chat
template): a safetensors model small enough to upload, serve and compare with transformers'
own generation in a test. Used by test_custom_models.py and test_dashboard_models.py."""

from __future__ import annotations

from pathlib import Path

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
         "zulu hello world the a is of and to in").split()
SPECIALS = ["[UNK]", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def build_tiny_llama(out: Path, byte_level: bool = False, template: str = TEMPLATE,
                     **overrides) -> Path:
    """config.json, model.safetensors, tokenizer.json, tokenizer_config.json in `out`.
    `byte_level`: a tokenizer of the 256 bytes (it can write any text: JSON, tool calls)
    instead of whole words. `template`: its chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if byte_level:
        vocab = {t: i for i, t in enumerate(SPECIALS + list(bytes_to_unicode().values()))}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
    else:
        vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + [f"w{i}" for i in range(60)])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>",
                                   additional_special_tokens=SPECIALS[3:])
    fast.chat_template = template
    config = LlamaConfig(**{"vocab_size": len(vocab), "hidden_size": 32,
                            "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2,
                            "max_position_embeddings": 256, "bos_token_id": 1,
                            "eos_token_id": 2, "tie_word_embeddings": False, **overrides})
    torch.manual_seed(7)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # never end at once, so there is text to compare
        model.lm_head.weight[2] *= 0.1
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out
