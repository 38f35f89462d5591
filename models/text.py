"""Text cleaning and quality filters: pure functions on one document.

`decode` turns raw bytes into text or a drop reason; `normalize` applies NFC,
strips control characters (keeping newline and tab) and unifies line endings;
`quality_reason` says why a cleaned document fails the thresholds, or None.
Every drop has a reason name, so the dataset manifest accounts for each record.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

# C0 controls except \t and \n, DEL, and C1 controls. \r is handled by line endings.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_NON_ALNUM = re.compile(r"[^\w\s]")
_ASCII_WORD_OR_SPACE = bytes(c for c in range(128) if not _NON_ALNUM.match(chr(c)))  # what _NON_ALNUM skips
_BINARY_SNIFF = 4096


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds a cleaned document must meet to be kept."""

    min_chars: int = 64
    max_chars: int = 1_000_000
    max_non_printable_fraction: float = 0.01  # control characters in the raw text
    max_non_alnum_fraction: float = 0.5  # punctuation/symbols over non-space chars
    max_repeated_line_fraction: float = 0.6  # lines that repeat an earlier line

    def __post_init__(self) -> None:
        if self.min_chars < 0:
            raise ValueError("min_chars: must be >= 0")
        if self.max_chars <= self.min_chars:
            raise ValueError(f"max_chars: must be greater than min_chars ({self.min_chars})")
        for name in ("max_non_printable_fraction", "max_non_alnum_fraction", "max_repeated_line_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be a fraction between 0 and 1")


def decode(raw: bytes) -> tuple[str | None, str | None]:
    """(text, None) for valid UTF-8 text, else (None, reason)."""
    if b"\x00" in raw[:_BINARY_SNIFF]:
        return None, "binary"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "invalid_utf8"


def normalize(text: str) -> tuple[str, int]:
    """(cleaned text, number of control characters removed)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, removed = _CONTROL.subn("", text)
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return text, removed


def repeated_line_fraction(text: str) -> float:
    """Fraction of non-blank lines that repeat an earlier non-blank line."""
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def quality_reason(text: str, removed_controls: int, cfg: QualityConfig) -> str | None:
    """The first quality threshold the cleaned `text` fails, or None to keep it."""
    n = len(text)
    if n == 0 or text.isspace():
        return "empty"
    if n < cfg.min_chars:
        return "too_short"
    if n > cfg.max_chars:
        return "too_long"
    if removed_controls / (n + removed_controls) > cfg.max_non_printable_fraction:
        return "non_printable"
    visible = n - sum(text.count(c) for c in " \n\t")
    if visible and symbol_count(text) / visible > cfg.max_non_alnum_fraction:
        return "non_alphanumeric"
    if repeated_line_fraction(text) > cfg.max_repeated_line_fraction:
        return "repeated_lines"
    return None


def symbol_count(text: str) -> int:
    """Characters that are neither word characters nor whitespace (`[^\\w\\s]`, Unicode)."""
    if text.isascii():  # one C pass over the bytes, about 8x faster than a regex match per character
        return len(text.encode("ascii").translate(None, _ASCII_WORD_OR_SPACE))
    return len(_NON_ALNUM.findall(text))


def content_hash(text: str) -> bytes:
    """16-byte hash of a document's normalized content (whitespace runs folded)."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()
