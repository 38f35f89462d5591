"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) and block packing.

Byte-level BPE as in GPT-2 (Radford et al., 2019): every byte is in the base
alphabet, so any text round-trips exactly through encode/decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, PAD, "[MASK]", "[CLS]", "[SEP]")


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 8192
    sample_mb: float = 8.0  # text the BPE trainer sees
    path: str | None = None  # reuse this tokenizer.json instead of training one

    def __post_init__(self) -> None:
        if self.path is None and not 256 + len(SPECIAL_TOKENS) < self.vocab_size <= 1 << 20:
            raise ValueError(f"vocab_size: must be between {257 + len(SPECIAL_TOKENS)} and 1048576")
        if self.sample_mb <= 0:
            raise ValueError("sample_mb: must be positive")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE on `texts`; ids 0..4 are the special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def check_tokenizer(tok: Tokenizer, source: str) -> None:
    """Raises ValueError unless `tok` has the special tokens Helio relies on."""
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"tokenizer '{source}' lacks the special tokens {missing}")


def pack(docs: Iterable[np.ndarray], block_len: int, eot_id: int) -> tuple[np.ndarray, int]:
    """Joins token arrays with EOT after each and cuts them into rows of `block_len`.

    Returns (blocks of shape (N, block_len), number of tail tokens that did not
    fill a last block and were dropped).
    """
    parts: list[np.ndarray] = []
    eot = np.array([eot_id], dtype=np.int32)
    for ids in docs:
        parts.append(np.asarray(ids, dtype=np.int32))
        parts.append(eot)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    n = len(stream) // block_len
    return stream[: n * block_len].reshape(n, block_len), len(stream) - n * block_len


def iter_bounded(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Yields texts until about `max_bytes` of UTF-8 have been yielded."""
    seen = 0
    for t in texts:
        if seen >= max_bytes:
            return
        seen += len(t)
        yield t
