from __future__ import annotations

import numpy as np

from models.tokenizer import EOT, SPECIAL_TOKENS, check_tokenizer, iter_bounded, pack, train_bpe

CORPUS = ["def f(x):\n    return x * 2\n", "class A:\n    pass\n", "héllo wörld — ünïcode ✓\n"] * 50


def test_train_has_special_tokens_first_and_round_trips():
    tok = train_bpe(CORPUS, vocab_size=400)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    check_tokenizer(tok, "trained")
    for text in CORPUS[:3] + ["unseen ∑ text\twith\ttabs\n\n"]:
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.get_vocab_size() <= 400


def test_pack_fixed_blocks_with_eot_between_docs():
    docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 30)]
    blocks, tail = pack(docs, block_len=4, eot_id=0)
    stream = [1, 2, 3, 4, 5, 0, 10, 11, 12, 0] + list(range(20, 30)) + [0]
    assert blocks.shape == (5, 4)
    assert blocks.reshape(-1).tolist() == stream[:20]
    assert tail == 1


def test_iter_bounded():
    assert list(iter_bounded(["aa", "bb", "cc"], 3)) == ["aa", "bb"]


def test_eot_is_the_first_special_token():
    assert SPECIAL_TOKENS[0] == EOT == "<|endoftext|>"
