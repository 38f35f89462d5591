"""Ray Data UDFs of the prepare job. Thin: the text maths lives in models/.

Stages, each a `map_batches` or `map_groups` over plain column batches:
  read_records    raw file bytes -> one row per record (decoded, cleaned,
                  filtered, hashed, MinHash-signed); dropped rows keep their reason
  exact_duplicates / lsh_edges   per hash bucket: ids to drop / verified pairs
  Tokenize        (callable class, holds the tokenizer) kept text -> token ids
  pack_shard      one (split, shard) group -> one Parquet shard of fixed blocks
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import zlib
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tokenizers import Tokenizer

from cluster.storage import write_parquet_file
from models.minhash import MinHashConfig, MinHasher, candidate_edges
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


def read_records(batch: dict[str, np.ndarray], text_field: str, quality: dict, minhash: dict) -> dict[str, Any]:
    """Raw files -> one row per record, with reason ('' when kept), text, hash and signature."""
    qcfg, hasher = QualityConfig(**quality), MinHasher(MinHashConfig(**minhash))
    ids, reasons, texts, hashes, sigs, sizes = [], [], [], [], [], []
    empty_sig = np.zeros(hasher.cfg.num_perm, dtype=np.uint32)
    for path, raw in zip(batch["path"], batch["bytes"]):
        for index, (value, reason) in enumerate(_records(str(path), raw, text_field)):
            text = ""
            size = len(value.encode("utf-8")) if isinstance(value, str) else len(value or b"")
            if reason is None and isinstance(value, bytes):
                value, reason = decode(value)
            if reason is None:
                text, removed = normalize(value)
                reason = quality_reason(text, removed, qcfg)
            kept = reason is None
            ids.append(record_id(str(path), index))
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


def hash_bucket(batch: dict[str, np.ndarray], num_buckets: int) -> dict[str, np.ndarray]:
    """Adds `bucket` (from the content hash) so equal hashes meet in one group."""
    batch["bucket"] = np.array([int.from_bytes(h[:8], "little") % num_buckets for h in batch["hash"]], dtype=np.int64)
    return batch


def exact_duplicates(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Within one bucket: the ids of every document whose hash an earlier (smaller) id has."""
    order = np.argsort(group["doc_id"], kind="stable")
    seen: set[bytes] = set()
    drop = []
    for i in order:
        h = bytes(group["hash"][i])
        if h in seen:
            drop.append(group["doc_id"][i])
        seen.add(h)
    return {"doc_id": np.array(drop, dtype=np.int64)}


def band_rows(batch: dict[str, np.ndarray], minhash: dict, num_buckets: int) -> dict[str, np.ndarray]:
    """One row per (document, band): the band key, its bucket, the id and the signature."""
    hasher = MinHasher(MinHashConfig(**minhash))
    bands = hasher.cfg.bands
    keys = np.concatenate([hasher.band_keys(s) for s in batch["sig"]]) if len(batch["sig"]) else np.zeros(0, np.int64)
    return {
        "band_key": keys,
        "bucket": keys % num_buckets,
        "doc_id": np.repeat(batch["doc_id"], bands),
        "sig": np.repeat(batch["sig"], bands, axis=0),
    }


def lsh_edges(group: dict[str, np.ndarray], minhash: dict) -> dict[str, np.ndarray]:
    """Within one bucket: verified near-duplicate pairs among documents sharing a band key."""
    cfg = MinHashConfig(**minhash)
    keys = group["band_key"]
    order = np.argsort(keys, kind="stable")
    keys_sorted = keys[order]
    starts = np.flatnonzero(np.r_[True, keys_sorted[1:] != keys_sorted[:-1]])
    ends = np.r_[starts[1:], len(keys_sorted)]
    edges: list[tuple[int, int]] = []
    for s, e in zip(starts, ends):
        if e - s > 1:
            members = order[s:e]
            edges.extend(candidate_edges(group["doc_id"][members], np.stack(group["sig"][members]), cfg))
    arr = np.array(edges, dtype=np.int64).reshape(-1, 2)
    return {"a": arr[:, 0], "b": arr[:, 1]}


class Tokenize:
    """Drops near-duplicates, tokenizes kept text, assigns split and shard."""

    def __init__(self, tokenizer_json: str, drop_ref: Any, val_fraction: float, num_shards: int):
        self.tok = Tokenizer.from_str(tokenizer_json)
        drop = ray.get(drop_ref[0]) if drop_ref else np.zeros(0, np.int64)
        self.drop = np.asarray(drop, dtype=np.int64)
        self.val_cut = int(val_fraction * 1_000_000)
        self.num_shards = num_shards

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        keep = ~np.isin(batch["doc_id"], self.drop)
        texts = [str(t) for t in batch["text"][keep]]
        h = [int.from_bytes(x[:8], "big") for x in batch["hash"][keep]]
        encoded = self.tok.encode_batch_fast(texts, add_special_tokens=False) if texts else []
        return {
            "doc_id": batch["doc_id"][keep],
            "split": np.array(["val" if x % 1_000_000 < self.val_cut else "train" for x in h], dtype=object),
            "shard": np.array([(x >> 20) % self.num_shards for x in h], dtype=np.int64),
            "ids": [np.asarray(e.ids, dtype=np.int32) for e in encoded],
            "nbytes": batch["nbytes"][keep],
        }


def pack_shard(group: dict[str, np.ndarray], out_uri: str, block_len: int, eot_id: int) -> dict[str, np.ndarray]:
    """One (split, shard) group -> `{split}/shard-NNNNN.parquet` of fixed-length blocks."""
    split, shard = str(group["split"][0]), int(group["shard"][0])
    order = np.argsort(group["doc_id"], kind="stable")
    blocks, tail = pack((group["ids"][i] for i in order), block_len, eot_id)
    rel = f"{split}/shard-{shard:05d}.parquet"
    column = pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1), pa.int32()), block_len)
    entry = write_parquet_file(posixpath.join(out_uri, rel), pa.table({"input_ids": column}))
    return {
        "file": np.array([rel], dtype=object),
        "split": np.array([split], dtype=object),
        "sha256": np.array([entry["sha256"]], dtype=object),
        "bytes": np.array([entry["bytes"]], dtype=np.int64),
        "blocks": np.array([len(blocks)], dtype=np.int64),
        "tokens": np.array([blocks.size], dtype=np.int64),
        "tail_tokens": np.array([tail], dtype=np.int64),
        "docs": np.array([len(order)], dtype=np.int64),
    }


def eot_id(tokenizer_json: str) -> int:
    return Tokenizer.from_str(tokenizer_json).token_to_id(EOT)
