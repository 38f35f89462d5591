from __future__ import annotations

import random
import re

from models.text import (QualityConfig, content_hash, decode, normalize, quality_reason, repeated_line_fraction,
                         symbol_count)

GOOD = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # three\n" * 3 + "x = 1\n"


def test_decode():
    assert decode("héllo".encode()) == ("héllo", None)
    assert decode(b"\xff\xfe bad") == (None, "invalid_utf8")
    assert decode(b"PK\x03\x04\x00\x00binary") == (None, "binary")


def test_normalize_line_endings_controls_and_nfc():
    text, removed = normalize("a\r\nb\rc\x07d\te\x1b\n" + "e\u0301")
    assert text == "a\nb\ncd\te\n" + "\u00e9"
    assert removed == 2


def test_quality_reasons():
    cfg = QualityConfig(min_chars=10, max_chars=200)
    assert quality_reason(GOOD, 0, cfg) is None
    assert quality_reason("   \n ", 0, cfg) == "empty"
    assert quality_reason("short", 0, cfg) == "too_short"
    assert quality_reason("word " * 100, 0, cfg) == "too_long"
    assert quality_reason(GOOD, 50, cfg) == "non_printable"
    assert quality_reason("!@#$%^&*()" * 5, 0, cfg) == "non_alphanumeric"
    assert quality_reason("same line\n" * 10 + "other\n", 0, cfg) == "repeated_lines"


def test_symbol_count_is_the_regex_count_on_ascii_and_unicode():
    rng = random.Random(0)
    samples = ["".join(chr(rng.randrange(128)) for _ in range(400)) for _ in range(20)]  # every ASCII class
    samples += ["héllo, wörld! ✓ — 東京 x_1\u00a0y", "", "a_b c-d\t(e)"]
    for text in samples:
        assert symbol_count(text) == len(re.findall(r"[^\w\s]", text))


def test_repeated_line_fraction():
    assert repeated_line_fraction("a\nb\na\n\n\na\n") == 0.5
    assert repeated_line_fraction("") == 0.0


def test_content_hash_folds_whitespace_only():
    assert content_hash("a  b\n c") == content_hash("a b c")
    assert content_hash("a b c") != content_hash("a b d")
