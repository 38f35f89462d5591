"""A checkpoint's own conversation format, read by `transformers` from the files its tokenizer ships.

An imported checkpoint (jobs.import_model) carries tokenizer_config.json (special tokens, the Jinja
chat template) and often generation_config.json (the ids that end a reply). `ChatFormat` builds the
tokenizer `transformers` would build from those files (PreTrainedTokenizerFast.from_pretrained on a
local folder), so a conversation renders to the same string `apply_chat_template` gives. A model
Helio trained itself has no tokenizer_config.json: it keeps Helio's transcript format
(actors/serve_requests.py) and its special tokens by name.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
HELIO_EOS = ("<|endoftext|>", "</s>", "[SEP]")  # the end-of-text token of Helio's tokenizers, by name
HELIO_PAD = ("<|pad|>", "[PAD]", "<pad>")


class NoChatTemplate(ValueError):
    """The checkpoint ships a tokenizer config without a chat template: it has no conversation format."""


def tokenizer_files(art: Any) -> dict[str, str]:
    """{name: text} of the tokenizer files an artifact has (tokenizer.json always)."""
    return {rel: art.read_bytes(rel).decode() for rel in TOKENIZER_FILES
            if rel == "tokenizer.json" or rel in art.manifest["files"]}


def special_id(tok: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


class ChatFormat:
    """Special token ids and the chat template of one tokenizer (its files as `tokenizer_files` gives them)."""

    def __init__(self, files: dict[str, str]):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(files["tokenizer.json"])
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.hf = None
        if "tokenizer_config.json" not in files:  # a tokenizer Helio trained: its specials by name
            eos = special_id(self.tokenizer, HELIO_EOS)
            pad = special_id(self.tokenizer, HELIO_PAD)
            self.eos_ids = (eos,) if eos is not None else ()
            self.pad_id = pad if pad is not None else (eos if eos is not None else 0)
            return
        from transformers import PreTrainedTokenizerFast

        with tempfile.TemporaryDirectory() as d:
            for rel, text in files.items():
                Path(d, rel).write_text(text)
            self.hf = PreTrainedTokenizerFast.from_pretrained(d)
        ends = json.loads(files.get("generation_config.json") or "{}").get("eos_token_id")
        ends = [ends] if isinstance(ends, int) else list(ends or [])
        if self.hf.eos_token_id is not None:
            ends.append(self.hf.eos_token_id)
        self.eos_ids = tuple(dict.fromkeys(ends))  # generation_config's first, in order, without repeats
        pad = self.hf.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    @property
    def eos_id(self) -> int | None:
        """The token a training example ends with: the tokenizer's own eos (else generation_config's first)."""
        if self.hf is not None and self.hf.eos_token_id is not None:
            return self.hf.eos_token_id
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def templated(self) -> bool:
        """True when conversations render with the checkpoint's own chat template."""
        return self.hf is not None and bool(self.hf.chat_template)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the chat template writes it (ready for the assistant's reply)."""
        if self.hf is None or not self.hf.chat_template:
            raise NoChatTemplate("its tokenizer_config.json sets no chat_template")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text: the template wrote the special tokens itself, none are added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def conversation(self, messages: list[dict[str, str]]) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of a whole conversation as the chat template renders it, and the [start, end) span of
        each assistant reply in them: from after the assistant's header through its end-of-turn token,
        the tokens a model learns to write.

        Each reply's span comes from rendering the conversation up to it twice, ready for the reply and
        with it; a template that renders a turn differently once later turns follow (one that drops
        earlier replies' reasoning, say) has no such spans, and is refused.
        """
        ids = self.encode(self.render(messages, add_generation_prompt=False))
        replies = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.encode(self.render(messages[:i]))  # ready for the reply: ends with its header
            through = self.encode(self.render(messages[:i + 1], add_generation_prompt=False))
            if through[:len(head)] != head or ids[:len(through)] != through:
                raise ValueError(f"the chat template renders message {i} differently once later messages follow "
                                 f"it, so its reply cannot be told apart from the rest of the conversation")
            replies.append((len(head), len(through)))
        return ids, replies
