"""Tiny random-initialised Hugging Face models of the Llama family, built by `transformers` itself, and
a tokenizer for them with the files a real checkpoint ships (tokenizer_config.json with special tokens
and a chat template, generation_config.json): what import, export and parity tests read."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig as HFLlamaConfig, MistralConfig, Qwen2Config

COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=96, initializer_range=0.1, bos_token_id=0,
              eos_token_id=2, pad_token_id=3)  # the ids of tokenizer()'s specials
FAMILIES = {
    # untied embeddings and Llama 3.1's rope scaling, with a short original context so that it bites
    "llama": lambda: HFLlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # q/k/v biases, tied embeddings, linear rope scaling
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=10000.0,
                                 rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # a sliding window shorter than the sequences, and a head_dim other than hidden_size / heads
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=8, head_dim=24, tie_word_embeddings=False),
}

SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>")
# Llama 3's chat format, shortened: each turn in header tokens, ended by <|eot_id|>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}<|end|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant<|end|>\n\n{% endif %}")


def tokenizer(texts: list[str], vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE with Llama 3's special tokens (ids 0-3) and the header tokens: the 256 bytes,
    6 specials and merges up to `vocab_size` (every id fits the model's embeddings)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIALS, "<|start|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_family(name: str, folder: Path, max_shard_size: str = "40KB", seed: int = 0,
                texts: list[str] | None = None, **overrides):
    """A `transformers` model of family `name` (its config's keys `overrides` changed) saved (sharded)
    into `folder` with its tokenizer files; returns the model."""
    torch.manual_seed(seed)
    config = FAMILIES[name]()
    config.update(overrides)
    hf = AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(folder, max_shard_size=max_shard_size)
    texts = texts or ["def read(path):\n    return open(path).read()\n", "hello world, hello tokens"] * 20
    tokenizer(texts, hf.config.vocab_size).save(str(Path(folder) / "tokenizer.json"))
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[2],
        "pad_token": SPECIALS[3], "chat_template": CHAT_TEMPLATE, "model_max_length": hf.config.max_position_embeddings}))
    return hf
