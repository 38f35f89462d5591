"""actors/chat.py: a checkpoint's chat template renders what `transformers` renders, its end-of-turn ids
come from its own files, an SFT example's loss covers the assistant's reply only, and a model without
a template is told apart from one Helio trained."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from actors.chat import ChatFormat, NoChatTemplate
from actors.finetune_data import TokenizeTask
from tiny_hf import SPECIALS, save_family, tokenizer

MESSAGES = [{"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Read a file."},
            {"role": "assistant", "content": "def read(path):\n    return open(path).read()"},
            {"role": "user", "content": "  And write one.  "}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    save_family("llama", out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return out


def _files(folder, *names):
    return {n: (folder / n).read_text() for n in ("tokenizer.json", *names)}


def test_the_template_renders_and_tokenizes_as_transformers_does(folder):
    chat = ChatFormat(_files(folder, "tokenizer_config.json", "generation_config.json"))
    theirs = AutoTokenizer.from_pretrained(folder)
    for prompt in (True, False):
        text = chat.render(MESSAGES, add_generation_prompt=prompt)
        assert text == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt)
        ids = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=prompt)
        assert chat.encode(text) == list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert text.startswith(SPECIALS[0]) and "And write one.<|eot_id|>" in text  # bos once, contents trimmed
    # the reply ends at generation_config's ids first, then the tokenizer's own eos (<|eot_id|>, id 2)
    assert chat.eos_ids == (1, 2) and chat.eos_id == 2 and chat.pad_id == 3 and chat.templated


def test_an_sft_example_learns_the_reply_and_its_end_of_turn_only(folder):
    chat = ChatFormat(_files(folder, "tokenizer_config.json"))
    ids, [(start, end)] = chat.conversation([{"role": "user", "content": "Read a file."},
                                             {"role": "assistant", "content": "def read(path): ..."}])
    head, reply = ids[:start], ids[start:end]
    assert end == len(ids)  # the reply ends the conversation
    assert chat.tokenizer.decode(head, skip_special_tokens=False).endswith("<|start|>assistant<|end|>\n\n")
    assert chat.tokenizer.decode(reply, skip_special_tokens=False) == "def read(path): ...<|eot_id|>"
    task = TokenizeTask("sft", _files(folder, "tokenizer_config.json"), max_len=64, max_query_len=8)
    out = task({"prompt": ["Read a file."], "response": ["def read(path): ..."]})
    n, p = int(out["length"][0]), int(out["prompt_len"][0])
    assert out["input_ids"][0, :n].tolist() == head + reply and p == len(head) and out["drop"][0] == ""
    assert out["input_ids"][0, n:].tolist() == [3] * (65 - n)  # padded with the tokenizer's pad token


CONVERSATION = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Read a file."},
                {"role": "assistant", "content": "def read(path): ..."},
                {"role": "user", "content": "And write one."},
                {"role": "assistant", "content": "def write(path, text): ..."},
                {"role": "user", "content": "Thanks."}]


def _learned(out, i: int, tok) -> list[str]:
    """The spans of row i that the loss covers, decoded."""
    ids, mask = out["input_ids"][i].tolist(), out["loss_mask"][i].tolist()
    spans, start = [], None
    for j, m in enumerate(mask + [0]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            spans.append(tok.decode(ids[start:j], skip_special_tokens=False))
            start = None
    return spans


def test_a_conversation_learns_every_assistant_reply_and_nothing_else(folder):
    files = _files(folder, "tokenizer_config.json")
    task = TokenizeTask("sft", files, max_len=192, max_query_len=8)
    single = {"role": "user", "content": "Read a file."}, {"role": "assistant", "content": "def read(path): ..."}
    out = task({"messages": [CONVERSATION, list(single), float("nan")],  # NaN: a JSON line without messages
                "prompt": [None, None, "Read a file."], "response": [None, None, "def read(path): ..."]})
    assert out["drop"].tolist() == ["", "", ""]
    tok = ChatFormat(files).tokenizer
    # the whole conversation as transformers renders it, cut after the last reply (the user's thanks teaches nothing)
    theirs = AutoTokenizer.from_pretrained(folder).apply_chat_template(CONVERSATION[:5], tokenize=True)
    theirs = list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    n = int(out["length"][0])
    assert out["input_ids"][0, :n].tolist() == theirs
    assert _learned(out, 0, tok) == ["def read(path): ...<|eot_id|>", "def write(path, text): ...<|eot_id|>"]
    # exact match continues from where the last reply starts
    p = int(out["prompt_len"][0])
    last_reply = tok.decode(out["input_ids"][0, p:n].tolist(), skip_special_tokens=False)
    assert last_reply == "def write(path, text): ...<|eot_id|>"
    # a one-turn conversation is the same row as the prompt + response record
    for col in ("input_ids", "loss_mask", "prompt_len", "length"):
        assert out[col][1].tolist() == out[col][2].tolist(), col

    # cut at max_len inside the second reply: the first reply whole, the second as far as it fits
    cut = TokenizeTask("sft", files, max_len=p + 2, max_query_len=8)({"messages": [CONVERSATION]})
    learned = _learned(cut, 0, tok)
    assert learned[0] == "def read(path): ...<|eot_id|>" and len(learned) == 2 and int(cut["length"][0]) == p + 3


def test_conversations_that_cannot_be_learned_are_counted_by_reason(folder):
    task = TokenizeTask("sft", _files(folder, "tokenizer_config.json"), max_len=64, max_query_len=8)
    bad = [[{"role": "user", "content": "hi"}],  # nothing to learn
           [{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "ok"}],
           [{"role": "user", "content": 3}, {"role": "assistant", "content": "ok"}],
           "not a list", [], [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "ok"}]]
    out = task({"messages": bad})
    assert out["drop"].tolist() == ["no_reply:messages", "bad_role:messages", "bad_type:messages",
                                    "bad_type:messages", "empty:messages", "prompt_too_long"]
    helio = tokenizer(["plain text"] * 10, 300)  # a tokenizer Helio trained: no chat template to render with
    helio.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    out = TokenizeTask("sft", {"tokenizer.json": helio.to_str()}, max_len=64, max_query_len=8)(
        {"messages": [CONVERSATION], "prompt": [None], "response": [None]})
    assert out["drop"].tolist() == ["no_chat_template:messages"]


def test_no_template_is_refused_and_a_helio_tokenizer_keeps_its_specials_by_name(folder):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    files = _files(folder) | {"tokenizer_config.json": json.dumps(config)}
    chat = ChatFormat(files)
    assert not chat.templated and chat.eos_ids == (2,)
    with pytest.raises(NoChatTemplate, match="sets no chat_template"):
        chat.render(MESSAGES)
    helio = tokenizer(["plain text"] * 10, 300)  # no tokenizer_config.json: a tokenizer Helio trained
    helio.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    chat = ChatFormat({"tokenizer.json": helio.to_str()})
    assert not chat.templated and chat.hf is None
    assert chat.eos_ids == (helio.token_to_id("<|endoftext|>"),) and chat.pad_id == helio.token_to_id("<|pad|>")
