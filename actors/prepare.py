"""Ray Data UDFs of the prepare job. Thin: the text maths lives in models/.

Stages, each a `map_batches` or `map_groups` over plain column batches:
  read_records    pieces of files (whole files, or line-aligned byte ranges of
                  large ones: `read_piece`) -> one row per record (decoded,
                  cleaned, filtered, hashed, MinHash-signed); dropped rows keep their reason
  count_reasons   per batch: records and bytes by drop reason
  band_rows / duplicate_edges   LSH bands, grouped by bucket: exact and
                  near-duplicate pairs (the driver resolves their components)
  TokenizePack    (callable class, holds the tokenizer) one block of kept
                  documents -> a train and a val Parquet shard of fixed blocks
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import zlib
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tokenizers import Tokenizer

from cluster.storage import resolve, write_parquet_file
from models.minhash import MinHashConfig, MinHasher, band_bucket_edges
from models.text import QualityConfig, content_hash, decode, normalize, quality_reason
from models.tokenizer import EOT, pack

_STRUCTURED = (".jsonl", ".json", ".ndjson", ".parquet")


def record_id(path: str, index: int) -> int:
    """A stable 63-bit id for record `index` of file `path`."""
    d = hashlib.blake2b(f"{path}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") >> 1


def _records(path: str, raw: bytes, text_field: str) -> Iterator[tuple[Any, str | None]]:
    """(bytes-or-str, None) for each record of one file, or (None, reason) for a bad one."""
    name = path.lower()
    if name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            yield None, "unreadable_file"
            return
        name = name[:-3]
    if not name.endswith(_STRUCTURED):
        yield raw, None
        return
    if name.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(raw))
        except (pa.ArrowException, OSError):
            yield None, "unreadable_file"
            return
        if text_field not in table.column_names:
            for _ in range(table.num_rows):
                yield None, "missing_text_field"
            return
        for value in table.column(text_field).to_pylist():
            yield (value, None) if isinstance(value, str) else (None, "missing_text_field")
        return
    text, reason = decode(raw)
    if text is None:
        yield None, reason
        return
    stripped = text.lstrip()
    if name.endswith(".json") and stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            yield None, "invalid_json"
            return
    else:
        items = (line for line in text.split("\n") if line.strip())
    for item in items:
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except json.JSONDecodeError:
                yield None, "invalid_json"
                continue
        value = item.get(text_field) if isinstance(item, dict) else None
        yield (value, None) if isinstance(value, str) else (None, "missing_text_field")


def splittable(path: str) -> bool:
    """Whether a file's records are lines that a byte range can be cut between: plain text
    and JSON Lines, uncompressed. (gzip has no random access; a Parquet or JSON-array file
    is one unit.)"""
    name = path.lower()
    return not name.endswith((".gz", ".json", ".parquet"))


_SCAN = 1 << 16  # bytes read at a time while looking for a line end


def _after_line_end(f, pos: int, size: int) -> int:
    """The offset just past the first newline at or after `pos` (the file size if none)."""
    while pos < size:
        chunk = f.read_at(min(_SCAN, size - pos), pos)
        cut = chunk.find(b"\n")
        if cut >= 0:
            return pos + cut + 1
        pos += len(chunk)
    return size


def read_piece(uri: str, start: int, end: int) -> bytes | None:
    """Raw bytes (never decompressed here) of the lines that start in [start, end) of a file,
    or None if it cannot be read. (0, size) is the whole file.

    A line starts at 0 or just after a newline, so consecutive ranges covering a
    file give every line to exactly one piece, however the cuts fall; a piece
    reads its own range plus the end of its last line, never the whole file.
    """
    try:
        fs, path = resolve(uri)
        with fs.open_input_file(path) as f:
            size = f.size()
            if start == 0 and end >= size:
                return f.read_at(size, 0)
            lo = _after_line_end(f, start - 1, size) if start > 0 else 0
            hi = max(lo, _after_line_end(f, end - 1, size) if end < size else size)
            return f.read_at(hi - lo, lo)
    except OSError:
        return None


def read_records(batch: dict[str, np.ndarray], text_field: str, quality: dict, minhash: dict) -> dict[str, Any]:
    """Read blocks (a row's `paths`, `starts`, `ends`: its pieces) -> one row per record: reason
    ('' when kept), text, hash, signature. A piece of a plain-text file is one document."""
    qcfg, hasher = QualityConfig(**quality), MinHasher(MinHashConfig(**minhash))
    ids, reasons, texts, hashes, sigs, sizes = [], [], [], [], [], []
    empty_sig = np.zeros(hasher.cfg.num_perm, dtype=np.uint32)
    pieces = ((str(p), int(s), int(e)) for row in zip(batch["paths"], batch["starts"], batch["ends"]) for p, s, e in zip(*row))
    for path, start, end in pieces:
        raw = read_piece(path, start, end)
        records = _records(path, raw, text_field) if raw is not None else iter([(None, "unreadable_file")])
        where = path if start == 0 else f"{path}@{start}"  # a whole file's ids do not depend on the cut
        for index, (value, reason) in enumerate(records):
            text = ""
            size = len(value.encode("utf-8")) if isinstance(value, str) else len(value or b"")
            if reason is None and isinstance(value, bytes):
                value, reason = decode(value)
            if reason is None:
                text, removed = normalize(value)
                reason = quality_reason(text, removed, qcfg)
            kept = reason is None
            ids.append(record_id(where, index))
            reasons.append("" if kept else reason)
            texts.append(text if kept else "")
            hashes.append(content_hash(text) if kept else b"")
            sigs.append(hasher.signature(text) if kept else empty_sig)
            sizes.append(size)
    return {
        "doc_id": np.array(ids, dtype=np.int64),
        "reason": np.array(reasons, dtype=object),
        "text": np.array(texts, dtype=object),
        "hash": np.array(hashes, dtype=object),
        "sig": np.stack(sigs) if sigs else np.zeros((0, hasher.cfg.num_perm), dtype=np.uint32),
        "nbytes": np.array(sizes, dtype=np.int64),
    }


def count_reasons(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per batch: records and input bytes by drop reason ('' = kept)."""
    reasons, inverse = np.unique(batch["reason"].astype(str), return_inverse=True)
    return {
        "reason": reasons.astype(object),
        "count": np.bincount(inverse, minlength=len(reasons)).astype(np.int64),
        "nbytes": np.bincount(inverse, weights=batch["nbytes"], minlength=len(reasons)).astype(np.int64),
    }


def band_rows(batch: dict[str, np.ndarray], minhash: dict, num_buckets: int) -> dict[str, np.ndarray]:
    """One row per (kept document, band): band key, its bucket, id, content hash, signature."""
    keep = batch["reason"] == ""
    hasher = MinHasher(MinHashConfig(**minhash))
    bands = hasher.cfg.bands
    sigs = batch["sig"][keep]
    keys = np.concatenate([hasher.band_keys(s) for s in sigs]) if len(sigs) else np.zeros(0, np.int64)
    return {
        "band_key": keys,
        "bucket": keys % num_buckets,
        "doc_id": np.repeat(batch["doc_id"][keep], bands),
        "hash": np.repeat(batch["hash"][keep], bands),
        "sig": np.repeat(sigs, bands, axis=0),
    }


def duplicate_edges(group: dict[str, np.ndarray], minhash: dict) -> dict[str, np.ndarray]:
    """One bucket of band rows -> its exact and near-duplicate pairs."""
    exact, near = band_bucket_edges(group["band_key"], group["doc_id"], group["hash"], group["sig"], MinHashConfig(**minhash))
    arr = np.array(exact + near, dtype=np.int64).reshape(-1, 2)
    return {"a": arr[:, 0], "b": arr[:, 1], "exact": np.array([True] * len(exact) + [False] * len(near), dtype=bool)}


class TokenizePack:
    """One block of documents -> token blocks written as a train and a val shard.

    Holds the tokenizer (heavy per-batch state). A shard is named by the
    smallest document id it holds, so the same input always gives the same
    files whatever worker processes it.
    """

    def __init__(self, tokenizer_json: str, drop_ref: list, out_uri: str, block_len: int, val_fraction: float):
        # One tokenizer thread per actor: the pool already has an actor per CPU.
        # (Set before the tokenizer's thread pool first starts; a runtime_env
        # would stop Ray Data fusing this stage with the one before it.)
        os.environ["RAYON_NUM_THREADS"] = "1"
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.eot = self.tok.token_to_id(EOT)
        self.drop = np.asarray(ray.get(drop_ref[0]), dtype=np.int64)
        self.out_uri, self.block_len = out_uri, block_len
        self.val_cut = int(val_fraction * 1_000_000)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = (batch["reason"] == "") & ~np.isin(batch["doc_id"], self.drop)
        ids, texts, hashes = batch["doc_id"][keep], batch["text"][keep], batch["hash"][keep]
        order = np.argsort(ids, kind="stable")
        is_val = np.array([int.from_bytes(hashes[i][:8], "big") % 1_000_000 < self.val_cut for i in order], dtype=bool)
        encoded = self.tok.encode_batch_fast([str(texts[i]) for i in order], add_special_tokens=False)
        rows: dict[str, list] = {k: [] for k in ("file", "split", "sha256", "bytes", "blocks", "tokens", "tail_tokens", "docs")}
        for split, mask in (("train", ~is_val), ("val", is_val)):
            if not mask.any():
                continue
            docs = [np.asarray(e.ids, dtype=np.int32) for e, m in zip(encoded, mask) if m]
            blocks, tail = pack(docs, self.block_len, self.eot)
            rel = f"{split}/shard-{int(ids[order][mask][0]):016x}.parquet"
            column = pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1), pa.int32()), self.block_len)
            entry = write_parquet_file(posixpath.join(self.out_uri, rel), pa.table({"input_ids": column}))
            for key, value in (("file", rel), ("split", split), ("sha256", entry["sha256"]), ("bytes", entry["bytes"]),
                               ("blocks", len(blocks)), ("tokens", blocks.size), ("tail_tokens", tail), ("docs", len(docs))):
                rows[key].append(value)
        return {k: np.array(v, dtype=object if k in ("file", "split", "sha256") else np.int64) for k, v in rows.items()}
