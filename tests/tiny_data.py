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


def write_model_artifact(store: Storage, name: str, write, tokenizer: str, parents: list[dict] | None = None,
                         **extra) -> None:
    """A model artifact of the files `write(folder)` saves (and names), plus tokenizer.json, its
    `parents` (lineage) and `extra` manifest fields."""
    with tempfile.TemporaryDirectory() as d, store.create("model", name, {"test": True}, parents=parents) as out:
        for f in write(d):
            out.write_bytes(f, Path(d, f).read_bytes())
        out.write_bytes("tokenizer.json", tokenizer.encode())
        out.extra.update(extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stdlib_sft_rows() -> list[dict]:
    """SFT records {"prompt", "response"} of four stdlib modules' documented functions, as
    jobs.make_tasks writes them (what jobs.evaluate derives its task documents from)."""
    import collections
    import posixpath
    import shutil
    import textwrap

    from jobs.make_tasks import comment_prompt
    from models.pyfuncs import extract_functions

    rows = []
    for module in (collections, posixpath, textwrap, shutil):
        records, _ = extract_functions(inspect.getsource(module), module.__name__)
        rows += [{"prompt": comment_prompt(r["docstring"]), "response": r["code"]} for r in records]
    return rows


def write_sft_tasks(store: Storage, name: str) -> None:
    """A tasks artifact holding sft/val.jsonl of stdlib_sft_rows."""
    import json

    with store.create("task", name, {"test": True}) as out:
        out.write_bytes("sft/val.jsonl", "".join(json.dumps(r) + "\n" for r in stdlib_sft_rows()).encode())


# ---- the session's shared store (tests/conftest.py `tiny_store`) ------------------------------------

STORE_BLOCK_LEN = 65  # 64 inputs + 1 shifted target
STORE_LABELS = ["neg", "pos", "mixed"]


def build_store(root: str) -> Storage:
    """The artifacts several job test modules share, built once per session in `root`:

    - dataset `tiny`: a 400-token BPE and blocks of 65 tokens from four stdlib modules (val: the first);
    - model `tiny_gpt`: a 2-layer GPT fitted to those validation blocks, with the activation outliers
      trained LLMs show planted in it (six LayerNorm channels 30x louder, Dettmers et al. 2022), so
      that quantization costs it something real;
    - model `tiny_enc`: a 2-layer encoder (an embedding model), and `tiny_clf`: a 1-layer classifier
      with labels STORE_LABELS, both randomly initialised (the tests check that a job or a server
      computes what the same artifact computes in-process, not what it learned).

    Modules that add artifacts of their own give them names of their own.
    """
    import collections
    import posixpath
    import shutil
    import textwrap

    import torch

    from models.encoder import Encoder, EncoderConfig
    from models.gpt import GPT, GPTConfig
    from models.hf import save_classifier, save_model
    from models.task_heads import SequenceClassifier

    store = Storage(root)
    tok, _, val = write_tiny_dataset(store, [collections, posixpath, textwrap, shutil], STORE_BLOCK_LEN, shards=1)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=STORE_BLOCK_LEN - 1, n_layer=2, n_head=4,
                        n_embd=128))
    with torch.no_grad():
        for block in gpt.transformer.h:
            block.ln_1.weight[:6] *= 30
            block.ln_2.weight[:6] *= 30
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    data = torch.from_numpy(val.astype(np.int64))
    for step in range(400):
        batch = data[torch.randint(0, len(data), (16,), generator=torch.Generator().manual_seed(step))]
        loss = gpt.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ds = store.open("dataset", "tiny")
    parent = [{"kind": "dataset", "name": "tiny", "uri": ds.uri, "created_at": ds.manifest["created_at"]}]
    write_model_artifact(store, "tiny_gpt", lambda d: save_model(gpt.eval(), d), tok.to_str(), parents=parent)
    pad = tok.token_to_id("<|pad|>")
    enc = Encoder(EncoderConfig(vocab_size=tok.get_vocab_size(), max_position=48, n_layer=2, n_head=2, n_embd=64,
                                pad_id=pad))
    write_model_artifact(store, "tiny_enc", lambda d: save_model(enc.drop_mlm_head().eval(), d), tok.to_str())
    clf = SequenceClassifier(Encoder(EncoderConfig(vocab_size=tok.get_vocab_size(), max_position=48, n_layer=1,
                                                   n_head=2, n_embd=64)), len(STORE_LABELS)).eval()
    write_model_artifact(store, "tiny_clf", lambda d: save_classifier(clf, d, STORE_LABELS, pad_id=pad), tok.to_str())
    return store
