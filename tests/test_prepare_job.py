"""The prepare job on a real local Ray cluster, over a corpus with planted problems."""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from cluster.storage import Storage
from jobs import prepare

pytestmark = pytest.mark.ray

CONFIG = str(Path(prepare.__file__).parent / "configs" / "prepare_demo.yaml")
VOCAB = [f"w{i}" for i in range(3000)]


def words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A folder of files with known content; returns what was planted."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("corpus")
    docs = {f"doc{i:03d}": " ".join([f"doc{i:03d}"] + words(rng, 300)) + "\n" for i in range(40)}
    for name, text in docs.items():
        (root / f"{name}.txt").write_text(text)
    for i in range(4):  # exact copies, one with other whitespace
        text = docs[f"doc{i:03d}"]
        (root / f"copy{i}.txt").write_text(text.replace(" ", "  ") if i == 0 else text)
    for i in range(4, 8):  # near copies: 3 words of 300 changed
        ws = docs[f"doc{i:03d}"].split()
        for j in (100, 200, 280):
            ws[j] = "changed"
        (root / f"near{i}.txt").write_text(" ".join(ws) + "\n")
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 40)
    (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)) * 4)
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_text("   \n\n\t\n")
    good = gzip.compress(b'{"text": "x"}\n' * 100)
    (root / "truncated.jsonl.gz").write_bytes(good[: len(good) // 2])
    extra = {f"rec{i}": " ".join([f"rec{i}"] + words(rng, 120)) for i in range(6)}
    lines = [json.dumps({"text": extra["rec0"]}), "{not json", json.dumps({"body": "no text field"}), json.dumps({"text": extra["rec1"]})]
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    (root / "records2.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": extra["rec2"]}) + "\n").encode()))
    pq.write_table(pa.table({"text": [extra["rec3"], extra["rec4"], None, extra["rec5"]]}), root / "table.parquet")
    # Larger than a read block (pack.shard_mb, 5 kB): read in line-aligned pieces by separate tasks.
    big = {f"big{i}": " ".join([f"big{i}"] + words(rng, 120)) for i in range(30)}
    (root / "big.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in big.values()))
    long = {f"long{i}": " ".join([f"long{i}"] + words(rng, 25)) for i in range(80)}
    (root / "long.txt").write_text("".join(t + "\n" for t in long.values()))
    long_pieces = math.ceil((root / "long.txt").stat().st_size / 5000)  # each piece of a text file is a document
    assert (root / "big.jsonl").stat().st_size > 3 * 5000 and long_pieces >= 3
    return {
        "root": root,
        "markers": sorted(docs) + sorted(extra) + sorted(big) + sorted(long),
        "read": 40 + 4 + 4 + 4 + 1 + 4 + 1 + 4 + len(big) + long_pieces,
        "dropped": {"binary": 1, "empty": 2, "invalid_utf8": 1, "unreadable_file": 1, "invalid_json": 1,
                    "missing_text_field": 2, "exact_duplicate": 4, "near_duplicate": 4},
    }


def run_prepare(corpus: dict, storage: Path, name: str) -> int:
    return prepare.main([CONFIG, "--set", f"storage={storage}", "--set", f"name={name}",
                         "--set", f"source.paths=[{corpus['root']}]", "--set", "quality.min_chars=20",
                         "--set", "tokenizer.vocab_size=600", "--set", "pack.block_size=32",
                         "--set", "pack.val_fraction=0.2", "--set", "pack.shard_mb=0.005"])


@pytest.fixture(scope="module")
def artifact(ray_cluster, corpus, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    assert run_prepare(corpus, storage, "first") == 0
    return Storage(str(storage)).open("dataset", "first")


def test_every_record_is_accounted_for(artifact, corpus):
    records = artifact.metrics["records"]
    assert records["read"] == corpus["read"]
    assert records["read"] == records["kept"] + sum(records["dropped"].values())
    assert {k: v for k, v in records["dropped"].items() if v} == corpus["dropped"]


def test_shards_hold_fixed_blocks_and_no_duplicate(artifact, corpus):
    tok = Tokenizer.from_str(artifact.read_bytes("tokenizer.json").decode())
    block_len = artifact.manifest["dataset"]["block_len"]
    assert block_len == 33
    splits = artifact.manifest["dataset"]["splits"]
    assert splits["train"]["blocks"] > 0 and splits["val"]["blocks"] > 0
    assert len(splits["train"]["shards"]) > 1, "expected several shards"
    texts = []
    for split, info in splits.items():
        blocks = 0
        for rel in info["shards"]:
            table = pq.read_table(artifact.file_uri(rel))
            assert table.schema.field("input_ids").type == pa.list_(pa.int32(), block_len)
            rows = table.column("input_ids").to_pylist()
            assert all(len(r) == block_len for r in rows)
            blocks += len(rows)
            ids = [t for r in rows for t in r]  # shards are cut independently: decode each on its own
            texts.append(tok.decode(ids, skip_special_tokens=False).replace("<|endoftext|>", "\n"))
        assert blocks == info["blocks"]
    text = "\n".join(texts)
    for marker in corpus["markers"]:  # each document once: one copy of every (near-)duplicate cluster kept
        assert text.split().count(marker) == 1, marker


def test_tokenizer_round_trips(artifact):
    tok = Tokenizer.from_str(artifact.read_bytes("tokenizer.json").decode())
    sample = "def f(x):\n    return w12 + w7  # ünïcode ✓\n"
    assert tok.decode(tok.encode(sample).ids) == sample


@pytest.mark.slow  # a second full prepare run
def test_rerun_is_deterministic(artifact, corpus, tmp_path):
    assert run_prepare(corpus, tmp_path, "second") == 0
    again = Storage(str(tmp_path)).open("dataset", "second")
    assert again.manifest["files"] == artifact.manifest["files"]  # same names, same sha256


def test_missing_source_is_a_clear_error(tmp_path, capsys):
    code = prepare.main([CONFIG, "--set", f"storage={tmp_path}", "--set", f"source.paths=[{tmp_path}/nope]"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jobs.prepare: error: source path '{tmp_path}/nope' does not exist"]


def test_bad_config_key_is_a_clear_error(tmp_path, capsys):
    assert prepare.main([CONFIG, "--set", "pack.blocksize=3"]) == 2
    assert "config key 'pack.blocksize': unknown key" in capsys.readouterr().err
