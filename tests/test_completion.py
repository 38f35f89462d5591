"""actors.serve_requests.Completion: OpenAI's legacy logprobs object from the engine's scored tokens,
without a server: what the text holds, where each token starts, end-of-text and stop strings."""

from __future__ import annotations

import asyncio

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from actors.serve_requests import Completion, Served
from actors.token_scores import Scored

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def served() -> Served:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def read(path):\n    return open(path).read()\n"] * 20,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=[EOS],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Served({"id": "g", "task": "generate", "artifact": "a", "context": 64,
                   "tokenizer_files": {"tokenizer.json": tok.to_str()}}, handle=None)


def _scored(ids: list[int], first_unscored: bool = False) -> list[Scored]:
    return [Scored(t, None if first_unscored and i == 0 else -0.5 - i, ((t, -0.5 - i), (3, -9.0)))
            for i, t in enumerate(ids)]


def _offsets(lp: dict) -> list[int]:
    out = [0]
    for piece in lp["tokens"][:-1]:
        out.append(out[-1] + len(piece))
    return out


def test_echo_and_reply_pieces_add_up_to_the_text_even_when_a_character_spans_tokens(served):
    tok = served.tokenizer
    prompt = "def read(path):"
    reply = "  é→"  # byte-level BPE: é and → are 2 and 3 bytes, unseen in training: several tokens each
    ids, new = tok.encode(prompt).ids, tok.encode(reply).ids
    assert len(new) > len(reply)  # characters split over tokens
    c = Completion(served, ids, [], 32, False, prompt, echo=True, logprobs=1)
    choice = c.whole(_scored(ids, first_unscored=True) + _scored(new))
    lp = choice["logprobs"]
    assert choice["text"] == prompt + reply and "".join(lp["tokens"]) == prompt + reply
    assert lp["text_offset"] == _offsets(lp) and lp["text_offset"][len(ids)] == len(prompt)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(ids) + len(new)


def test_end_of_text_is_listed_last_and_a_stop_string_cuts_the_tokens_too(served):
    tok = served.tokenizer
    eos = tok.token_to_id(EOS)
    ids = tok.encode("def read(path):").ids
    new = tok.encode("\n    return").ids
    c = Completion(served, ids, [], 32, False, "def read(path):", echo=False, logprobs=1)
    choice = c.whole(_scored(new + [eos, new[0]]))  # what follows end-of-text is not the reply's
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and choice["text"] == "\n    return"
    assert lp["tokens"][-1] == EOS and len(lp["tokens"]) == len(new) + 1  # lm-eval reads [ctxlen:-1]
    assert lp["text_offset"][-1] == len(choice["text"])
    c = Completion(served, ids, ["return"], 32, False, "def read(path):", echo=False, logprobs=1)
    choice = c.whole(_scored(new))
    lp = choice["logprobs"]  # the tokens that start before the cut: the last may hold part of the stop string
    assert choice["text"] == "\n    " and "".join(lp["tokens"]).startswith(choice["text"])
    assert lp["text_offset"][-1] < len(choice["text"]) and len(lp["tokens"]) < len(new)


def test_streamed_chunks_carry_each_token_once(served):
    tok = served.tokenizer
    ids, new = tok.encode("def").ids, tok.encode(" read(path):\n    return open").ids
    whole = Completion(served, ids, [], len(new), False, "def", echo=True, logprobs=2).whole(
        _scored(ids, True) + _scored(new))

    async def pieces():
        items = _scored(ids, True) + _scored(new)
        for i in range(0, len(items), 3):
            yield items[i:i + 3]

    async def stream():
        c = Completion(served, ids, [], len(new), False, "def", echo=True, logprobs=2)
        return [x async for x in c.pieces(pieces())]

    chunks = asyncio.run(stream())
    assert "".join(text for text, _, _ in chunks) == whole["text"] and chunks[-1][1] == "length"
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for _, _, lp in chunks for v in lp[key]] == whole["logprobs"][key]
