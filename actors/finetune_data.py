"""Ray Data UDF: task records (JSONL / Parquet rows) -> fixed-width token columns for training.

`tokenize_records` runs as plain Ray Data tasks, in the cluster's already running
worker processes (an actor pool would start processes of its own, seconds each on a
small machine); it builds the tokenizer from its JSON for every batch, which costs
little next to tokenizing the batch. Nothing is
skipped silently: a record that cannot be used keeps its row with a `drop`
reason (missing_field:<name>, bad_type:<name>, empty:<name>, prompt_too_long, and for a
conversation bad_role:messages, no_reply:messages and no_chat_template:messages) so the job
counts every one; usable rows have drop == "".
"""

from __future__ import annotations

from typing import Any

import numpy as np

FIELDS = {"sft": ("prompt", "response"), "classify": ("text", "label"), "embed": ("query", "positive")}
OPTIONAL = {"embed": ("negative",)}
MESSAGES = "messages"  # sft: a whole conversation ([{role, content}, ...]) in place of prompt + response
ROLES = ("system", "user", "assistant")


def conversation(value: Any) -> list[dict[str, str]] | str | None:
    """A record's `messages` as [{role, content}] ready for a chat template; a drop reason when it is
    not one; None when the record has none (it is a prompt + response record)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):  # JSON lines without it read as NaN
        return None
    if not isinstance(value, (list, tuple, np.ndarray)):
        return "bad_type:messages"
    if not len(value):
        return "empty:messages"
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return "bad_type:messages"  # each message an object with a string role and content
        if m["role"] not in ROLES:
            return "bad_role:messages"
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        return "no_reply:messages"  # nothing to learn
    return out


class TokenizeTask:
    """A batch of records (dict of object arrays) -> token columns, right-padded with the pad token.

    `tokenizer_files` as actors.chat.tokenizer_files gives them: with a chat template (an imported
    checkpoint), an SFT prompt is rendered as the user's turn and the reply as the assistant's, the
    loss on the reply and its end-of-turn token only; without one, prompt + response + eos. An SFT
    record with `messages` is a whole conversation, rendered by the chat template, the loss on every
    assistant reply (`loss_mask`); `prompt_len` is where the last reply starts (exact match writes it)."""

    def __init__(self, kind: str, tokenizer_files: dict[str, str], max_len: int, max_query_len: int):
        from actors.chat import ChatFormat

        self.kind, self.max_len, self.max_query_len = kind, max_len, max_query_len
        self.chat = ChatFormat(tokenizer_files)
        self.tok, self.pad_id, self.eos_id = self.chat.tokenizer, self.chat.pad_id, self.chat.eos_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(batch.values())))
        drop = np.array([""] * n, dtype=object)
        values: dict[str, list] = {}
        conversations = [None] * n  # sft records with messages: their fields are not prompt + response
        if self.kind == "sft" and batch.get(MESSAGES) is not None:
            conversations = [conversation(m) for m in batch[MESSAGES]]
            drop[:] = [c if isinstance(c, str) else "" for c in conversations]
        values[MESSAGES] = conversations
        for name in FIELDS[self.kind] + OPTIONAL.get(self.kind, ()):
            col = batch.get(name)
            required = name in FIELDS[self.kind]
            if col is None and not required:
                continue
            vals = [None] * n if col is None else list(col)
            for i, v in enumerate(vals):
                if drop[i] or conversations[i] is not None:
                    continue
                if v is None or (isinstance(v, float) and np.isnan(v)):
                    drop[i] = f"missing_field:{name}" if required else ""
                elif name == "label" and isinstance(v, (int, np.integer)):
                    vals[i] = str(v)
                elif not isinstance(v, str):
                    drop[i] = f"bad_type:{name}"
                elif not v.strip():
                    drop[i] = f"empty:{name}"
            values[name] = vals
        out = getattr(self, self.kind)(values, drop)
        out["drop"] = drop.astype(str)
        return out

    def _ids(self, texts: list, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, limit) ids and (n,) lengths; the tokenizer's own specials ([CLS] ... [SEP]) kept on truncation."""
        ids = np.full((len(texts), limit), self.pad_id, dtype=np.int32)
        lens = np.zeros(len(texts), dtype=np.int32)
        self.tok.enable_truncation(limit)
        for i, e in enumerate(self.tok.encode_batch([t if isinstance(t, str) else "" for t in texts])):
            lens[i] = len(e.ids)
            ids[i, :lens[i]] = e.ids
        self.tok.no_truncation()
        return ids, lens

    def sft(self, v: dict[str, list], drop: np.ndarray) -> dict[str, np.ndarray]:
        L = self.max_len + 1  # inputs are the first L-1 tokens, targets the last L-1
        n = len(drop)
        ids, mask = np.full((n, L), self.pad_id, dtype=np.int32), np.zeros((n, L), dtype=np.int32)
        prompt_len, length = np.zeros(n, np.int32), np.zeros(n, np.int32)
        for i, (row, replies) in enumerate(self._conversations(v, drop)):
            if drop[i]:
                continue
            fits = [(start, end) for start, end in replies if start < L - 1]  # a reply with a token to learn
            if not fits:
                drop[i] = "prompt_too_long"
                continue
            end = min(L, fits[-1][1])  # what follows the last reply teaches nothing
            ids[i, :end], prompt_len[i], length[i] = row[:end], fits[-1][0], end
            for start, stop in fits:
                mask[i, start:min(stop, L)] = 1
        return {"input_ids": ids, "loss_mask": mask, "prompt_len": prompt_len, "length": length}

    def _conversations(self, v: dict[str, list], drop: np.ndarray) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Each record's (ids, [start, end) of each reply): a conversation through the chat template, a
        prompt + response as its single turn (or, without a template, prompt + response + eos)."""
        texts = lambda name: [t if isinstance(t, str) else "" for t in v[name]]  # noqa: E731
        if not self.chat.templated:
            eos = [self.eos_id] if self.eos_id is not None else []
            prompts = self.tok.encode_batch(texts("prompt"), add_special_tokens=False)
            responses = self.tok.encode_batch(texts("response"), add_special_tokens=False)
        out = []
        for i, (prompt, response, messages) in enumerate(zip(texts("prompt"), texts("response"), v[MESSAGES])):
            if drop[i]:
                out.append(([], []))
            elif messages is not None and not self.chat.templated:
                drop[i] = "no_chat_template:messages"  # its tokenizer_config.json sets no chat_template
                out.append(([], []))
            elif messages is not None:
                out.append(self.chat.conversation(messages))
            elif self.chat.templated:
                out.append(self.chat.conversation([{"role": "user", "content": prompt},
                                                   {"role": "assistant", "content": response}]))
            else:
                p, r = prompts[i].ids, responses[i].ids + eos
                out.append((p + r, [(len(p), len(p) + len(r))]))
        return out

    def classify(self, v: dict[str, list], drop: np.ndarray) -> dict[str, np.ndarray]:
        ids, lens = self._ids(v["text"], self.max_len)
        labels = np.array([lab if isinstance(lab, str) else "" for lab in v["label"]], dtype=object)
        return {"input_ids": ids, "length": lens, "label_name": labels.astype(str)}

    def embed(self, v: dict[str, list], drop: np.ndarray) -> dict[str, np.ndarray]:
        q, q_len = self._ids(v["query"], self.max_query_len)
        p, p_len = self._ids(v["positive"], self.max_len)
        out = {"query_ids": q, "query_len": q_len, "pos_ids": p, "pos_len": p_len}
        if "negative" in v:
            n, n_len = self._ids(v["negative"], self.max_len)
            out |= {"neg_ids": n, "neg_len": n_len}
        return out


def tokenize_records(batch: dict[str, np.ndarray], **task: Any) -> dict[str, np.ndarray]:
    """TokenizeTask(**task) on one batch: the function Ray Data's tasks run."""
    return TokenizeTask(**task)(batch)


def pack_rows(cols: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Rows of one example each (sft or classify), right-padded to width L, -> packed rows of several.

    Best-fit decreasing: the longest example first, each into the fullest row it still fits, else a new
    row. Token columns (input_ids, sft's loss_mask) sit side by side; `segment` is 1, 2, ... for each
    example's tokens and 0 for the padding after the last (models.decoding.packed keeps attention,
    positions and the loss inside each example); `length` is the row's real tokens; a per-example
    column (classify's label) becomes (rows, K): the row's examples' values in order, -1 after. sft's
    `prompt_len` (where an example's reply starts, for exact match) has no meaning in a packed row and
    is dropped: validation rows stay unpacked."""
    import bisect

    lengths, width = cols["length"], cols["input_ids"].shape[1]
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted: the fullest row that fits comes first
    rows: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        at = bisect.bisect_left(rooms, (int(lengths[i]), -1))
        if at == len(rooms):
            rows.append([int(i)])
            room, row = width - int(lengths[i]), len(rows) - 1
        else:
            room, row = rooms.pop(at)
            rows[row].append(int(i))
            room -= int(lengths[i])
        if room > 0:
            bisect.insort(rooms, (room, row))
    per_token = {k: v for k, v in cols.items() if v.ndim == 2}
    per_example = {k: v for k, v in cols.items() if v.ndim == 1 and k not in ("length", "prompt_len")}
    slots = max(map(len, rows))
    out = {k: np.full((len(rows), width), pad_id if k == "input_ids" else 0, dtype=v.dtype) for k, v in per_token.items()}
    out |= {k: np.full((len(rows), slots), -1, dtype=v.dtype) for k, v in per_example.items()}
    out["segment"] = np.zeros((len(rows), width), dtype=np.int32)
    out["length"] = np.zeros(len(rows), dtype=lengths.dtype)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, start=1):
            n = int(lengths[i])
            for k, v in per_token.items():
                out[k][r, at:at + n] = v[i, :n]
            for k, v in per_example.items():
                out[k][r, s - 1] = v[i]
            out["segment"][r, at:at + n] = s
            at += n
        out["length"][r] = at
    return out


def pack_pairs(cols: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Contrastive rows of one pair each (query, positive, optional hard negative), right-padded, ->
    packed rows of several pairs: pair k of a row is segment k + 1 of its query row, its positive row
    and its negative row alike, so the pairing survives packing.

    Best-fit decreasing on the positives (the long texts): the longest first, each into the fullest
    row whose positive, query and negative rows all still have room, else a new row. Columns: query_ids
    and query_segment (rows, Lq), pos_* and neg_* (rows, L), and per-pair lengths query_len, pos_len,
    neg_len (rows, K), 0 after the row's pairs (a pair without a negative has neg_len 0 and no tokens
    in the negative row)."""
    import bisect

    parts = [p for p in ("query", "pos", "neg") if f"{p}_ids" in cols]
    width = {p: cols[f"{p}_ids"].shape[1] for p in parts}
    lengths = {p: cols[f"{p}_len"].astype(np.int64) for p in parts}
    rooms: list[tuple[int, int]] = []  # (room left in the positive row, row), sorted
    left: list[dict[str, int]] = []  # per row: room left in each part
    rows: list[list[int]] = []
    for i in np.argsort(-lengths["pos"], kind="stable"):
        need = {p: int(lengths[p][i]) for p in parts}
        at = bisect.bisect_left(rooms, (need["pos"], -1))
        # the fullest rows first: up to 8 tries for one whose other parts fit too
        stop = min(len(rooms), at + 8)
        while at < stop and any(left[rooms[at][1]][p] < need[p] for p in parts):
            at += 1
        if at < len(rooms) and all(left[rooms[at][1]][p] >= need[p] for p in parts):
            _, row = rooms.pop(at)
        else:
            rows.append([])
            left.append(dict(width))
            row = len(rows) - 1
        rows[row].append(int(i))
        for p in parts:
            left[row][p] -= need[p]
        if left[row]["pos"] > 0:
            bisect.insort(rooms, (left[row]["pos"], row))
    slots = max(map(len, rows))
    out: dict[str, np.ndarray] = {}
    for p in parts:
        ids, lens = cols[f"{p}_ids"], lengths[p]
        out[f"{p}_ids"] = np.full((len(rows), width[p]), pad_id, dtype=ids.dtype)
        out[f"{p}_segment"] = np.zeros((len(rows), width[p]), dtype=np.int32)
        out[f"{p}_len"] = np.zeros((len(rows), slots), dtype=cols[f"{p}_len"].dtype)
        for r, members in enumerate(rows):
            at = 0
            for s, i in enumerate(members, start=1):
                n = int(lens[i])
                out[f"{p}_ids"][r, at:at + n] = ids[i, :n]
                out[f"{p}_segment"][r, at:at + n] = s
                out[f"{p}_len"][r, s - 1] = n
                at += n
    return out
