"""Tiny random decoder checkpoints, made in the tests as a user would bring their own."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VOCAB = 384


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few standard-library modules (seconds)."""
    from offramp.build.code_data import stdlib_modules, train_tokenizer

    modules = [m for m in stdlib_modules() if m.name in ("textwrap", "json.encoder", "json.decoder", "string")]
    return train_tokenizer((m.text for m in modules), TINY_VOCAB)


def tiny_checkpoint(folder: Path, family: str, tokenizer, seed: int = 0, context: int = 128) -> Path:
    """A random Llama (4 layers, width 64, grouped-query attention) or GPT-2 (4 layers, width 64) saved
    as a Hugging Face folder with ``tokenizer.json``. The late layers are scaled so that early exits
    agree with the last one often but not always (damped in the Llama; amplified in the GPT-2, whose
    random blocks barely move its embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    end = tokenizer.token_to_id("<|endoftext|>")
    if family == "llama":
        config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                             bos_token_id=end, eos_token_id=end, tie_word_embeddings=False)  # fmt: skip
        model, late, factor = LlamaForCausalLM(config), ("self_attn.o_proj", "mlp.down_proj"), 0.3
    else:
        config = GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=context,
                            bos_token_id=end, eos_token_id=end)  # fmt: skip
        model, late, factor = GPT2LMHeadModel(config), ("attn.c_proj", "mlp.c_proj"), 10.0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(f".{i}.{part}.weight" in name for i in (2, 3) for part in late):
                parameter.mul_(factor)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder
