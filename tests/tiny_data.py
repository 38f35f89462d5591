"""A small dataset artifact made from real text the way jobs.prepare makes them, for job tests."""

from __future__ import annotations

import inspect
import socket
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from cluster.storage import Storage, write_parquet_file
from models.tokenizer import EOT, pack, train_bpe


def write_tiny_dataset(store: Storage, modules: list[ModuleType], block_len: int, shards: int = 3,
                       name: str = "tiny") -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Trains a 400-token BPE on the modules' source; the first module is the val split, the rest train.
    Writes dataset artifact `name` (blocks of `block_len` tokens in `shards` shards per split) and returns
    (tokenizer, train blocks, val blocks)."""
    docs = [inspect.getsource(m) for m in modules]
    tok = train_bpe(docs, vocab_size=400)
    eot = tok.token_to_id(EOT)
    ids = [np.array(tok.encode(d).ids, dtype=np.int32) for d in docs]
    train, _ = pack(ids[1:], block_len, eot)
    val, _ = pack(ids[:1], block_len, eot)
    with store.create("dataset", name, {"test": True}) as out:
        splits = {}
        for split, arr in (("train", train), ("val", val)):
            files = []
            for i, part in enumerate(np.array_split(arr, shards)):
                rel = f"{split}/shard-{i:04d}.parquet"
                col = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), block_len)
                out.add_files({rel: write_parquet_file(out.tmp_uri + "/" + rel, pa.table({"input_ids": col}))})
                files.append(rel)
            splits[split] = {"blocks": len(arr), "tokens": int(arr.size), "shards": files}
        out.write_bytes("tokenizer.json", tok.to_str().encode())
        out.extra["dataset"] = {"block_size": block_len - 1, "block_len": block_len, "vocab_size": tok.get_vocab_size(),
                                "splits": splits}
    return tok, train, val


def write_model_artifact(store: Storage, name: str, write, tokenizer: str, **extra) -> None:
    """A model artifact of the files `write(folder)` saves (and names), plus tokenizer.json and
    `extra` manifest fields."""
    with tempfile.TemporaryDirectory() as d, store.create("model", name, {"test": True}) as out:
        for f in write(d):
            out.write_bytes(f, Path(d, f).read_bytes())
        out.write_bytes("tokenizer.json", tokenizer.encode())
        out.extra.update(extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
