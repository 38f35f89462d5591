"""Raw text -> a dataset artifact of packed token blocks, on Ray Data.

    python -m jobs.prepare jobs/configs/prepare_demo.yaml [--set source.paths=[DIR] --set name=mine]

Reads txt / jsonl / json / parquet files (optionally .gz; local paths, s3://,
gs://), cleans and filters them, removes exact and near duplicates, trains a
byte-level BPE tokenizer (or reuses one), tokenizes and packs documents into
blocks of `block_size + 1` tokens, and writes `{storage}/datasets/{name}/`.
With no `source.paths`, it reads the Python standard library of this interpreter.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from cluster.cli import UserError, run_job, format_summary
from cluster.config import to_dict
from cluster.runtime import JobConfig, connect_job, scoped_attrs
from cluster.sources import SourceConfig, expand_sources
from cluster.storage import Storage, resolve
from models.minhash import MinHashConfig
from models.text import QualityConfig
from models.tokenizer import TokenizerConfig

log = logging.getLogger("helio")


@dataclass(frozen=True)
class PackConfig:
    block_size: int = 256  # blocks hold block_size + 1 tokens (inputs and shifted targets)
    val_fraction: float = 0.05  # documents sent to val/, chosen by content hash
    shard_mb: float = 2.0  # input per read block; each block becomes one train and one val shard

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError("block_size: must be at least 2")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction: must be in [0, 1)")
        if self.shard_mb <= 0:
            raise ValueError("shard_mb: must be positive")


@dataclass(frozen=True)
class PrepareConfig(JobConfig):
    name: str = "stdlib"
    source: SourceConfig = field(default_factory=SourceConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: MinHashConfig = field(default_factory=MinHashConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)


def _sample(batch: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    """Kept documents whose content hash falls in the first `fraction` of the hash space."""
    pick = np.array([r == "" and int.from_bytes(h[8:16], "little") % 1_000_000 < fraction * 1_000_000
                     for r, h in zip(batch["reason"], batch["hash"])], dtype=bool)
    return {"text": batch["text"][pick]}


def run(cfg: PrepareConfig) -> dict[str, Any]:
    """Runs the whole job; returns the artifact's manifest."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    store = Storage(cfg.storage)
    store.artifact_path("dataset", cfg.name)  # validates the name before any work
    files = expand_sources(cfg.source)
    reused_tokenizer = load_tokenizer(cfg.tokenizer.path) if cfg.tokenizer.path else None
    connect_job(cfg)
    ctx = ray.data.DataContext.get_current()
    # Same input, same blocks, same shards. The only shuffle (LSH band rows) is small; the task-based
    # sort shuffle starts in well under a second where the actor-based hash shuffle takes seconds.
    # Both for this job only: a pipeline's next stage gets Ray Data's context as it was.
    with scoped_attrs(ctx.execution_options, preserve_order=True), \
            scoped_attrs(ctx, shuffle_strategy=ShuffleStrategy.SORT_SHUFFLE_PULL_BASED):
        return build_dataset(cfg, store, files, reused_tokenizer)


def build_dataset(cfg: PrepareConfig, store: Storage, files: dict[str, int], reused_tokenizer: Any) -> dict[str, Any]:
    """Reads, cleans, dedupes, tokenizes, packs and writes the dataset artifact; returns its manifest."""
    import ray
    import ray.data

    from actors import prepare as udf
    from cluster.runtime import cluster_cpus
    from models.minhash import duplicates_to_drop
    from models.tokenizer import iter_bounded, train_bpe

    t0 = time.time()  # job time, not counting the start of an embedded cluster
    stage_seconds: dict[str, float] = {}

    def lap(stage: str) -> None:  # the time since the previous lap, under `stage`
        stage_seconds[stage] = round(time.time() - t0 - sum(stage_seconds.values()), 2)
    cpus = cluster_cpus()
    quality, minhash = to_dict(cfg.quality), to_dict(cfg.dedup)

    # Read blocks are sized from the input alone (never from the cluster), so a
    # block -- and the shard it becomes -- holds the same documents on any cluster.
    groups = plan_reads(files, int(cfg.pack.shard_mb * 1e6), udf.splittable)
    log.info("[1/5] read, clean, filter, hash, sign %d files in %d blocks of about %.1f MB",
             len(files), len(groups), cfg.pack.shard_mb)
    docs = (
        ray.data.from_items([{"paths": [p for p, _, _ in g], "starts": [s for _, s, _ in g], "ends": [e for _, _, e in g]}
                             for g in groups], override_num_blocks=len(groups))
        .map_batches(udf.read_records, batch_size=1,
                     fn_kwargs={"text_field": cfg.source.text_field, "quality": quality, "minhash": minhash})
        .materialize()
    )
    by_reason: dict[str, list[int]] = {}
    for row in docs.select_columns(["reason", "nbytes"]).map_batches(udf.count_reasons, batch_size=None).take_all():
        acc = by_reason.setdefault(row["reason"], [0, 0])
        acc[0] += int(row["count"])
        acc[1] += int(row["nbytes"])
    read_records = sum(c for c, _ in by_reason.values())
    read_bytes = sum(b for _, b in by_reason.values())
    kept_count, kept_bytes = by_reason.pop("", (0, 0))
    dropped = {reason: count for reason, (count, _) in sorted(by_reason.items())}
    if kept_count == 0:
        raise UserError(f"no record of the {read_records} read passed cleaning and quality filters: {dropped}")
    lap("read_clean_sign")

    log.info("[2/5] exact and near-duplicate detection on %d documents (MinHash LSH, %d bands x %d rows, Jaccard >= %.2f)",
             kept_count, cfg.dedup.bands, cfg.dedup.rows, cfg.dedup.threshold)
    buckets = max(cpus, math.ceil(kept_count * cfg.dedup.bands / 100_000))
    edges = (
        docs.select_columns(["doc_id", "reason", "hash", "sig"])
        .map_batches(udf.band_rows, fn_kwargs={"minhash": minhash, "num_buckets": buckets})
        .groupby("bucket", num_partitions=buckets)
        .map_groups(udf.duplicate_edges, batch_format="numpy", fn_kwargs={"minhash": minhash})
        .take_all()
    )
    exact = duplicates_to_drop([(e["a"], e["b"]) for e in edges if e["exact"]])
    duplicates = duplicates_to_drop([(e["a"], e["b"]) for e in edges])
    dropped["exact_duplicate"] = len(exact)
    dropped["near_duplicate"] = len(duplicates) - len(exact)
    drop_ref = [ray.put(np.fromiter(duplicates, dtype=np.int64, count=len(duplicates)))]
    lap("dedup")

    with store.create("dataset", cfg.name, config=to_dict(cfg)) as art:
        if reused_tokenizer is not None:
            log.info("[3/5] reusing tokenizer %s", cfg.tokenizer.path)
            tok = reused_tokenizer
        else:
            fraction = min(1.0, cfg.tokenizer.sample_mb * 1e6 / max(kept_bytes, 1))
            log.info("[3/5] training a %d-token byte-level BPE on %.0f%% of the kept text",
                     cfg.tokenizer.vocab_size, 100 * fraction)
            sample = docs.select_columns(["reason", "text", "hash"]).map_batches(_sample, fn_kwargs={"fraction": fraction})
            texts = (str(r["text"]) for r in sample.iter_rows())
            tok = train_bpe(iter_bounded(texts, int(cfg.tokenizer.sample_mb * 1e6)), cfg.tokenizer.vocab_size)
        tokenizer_json = tok.to_str()
        art.write_bytes("tokenizer.json", tokenizer_json.encode())
        lap("tokenizer")

        log.info("[4/5] tokenize and pack into %d-token blocks", cfg.pack.block_size + 1)
        stats = (
            docs.select_columns(["doc_id", "reason", "text", "hash"])
            .map_batches(udf.TokenizePack, batch_size=None, compute=ray.data.ActorPoolStrategy(size=min(cpus, len(groups))),
                         fn_constructor_kwargs={"tokenizer_json": tokenizer_json, "drop_ref": drop_ref,
                                                "out_uri": art.tmp_uri, "block_len": cfg.pack.block_size + 1,
                                                "val_fraction": cfg.pack.val_fraction})
            .take_all()
        )
        lap("tokenize_pack_write")
        log.info("[5/5] commit the artifact")
        art.add_files({s["file"]: {"sha256": s["sha256"], "bytes": int(s["bytes"])} for s in stats})
        final_docs = sum(int(s["docs"]) for s in stats)
        if read_records != final_docs + sum(dropped.values()):
            raise RuntimeError(f"record accounting broke: read {read_records} != kept {final_docs} + dropped {dropped}")
        splits = {
            split: {
                "blocks": sum(int(s["blocks"]) for s in stats if s["split"] == split),
                "tokens": sum(int(s["tokens"]) for s in stats if s["split"] == split),
                "documents": sum(int(s["docs"]) for s in stats if s["split"] == split),
                "tail_tokens_dropped": sum(int(s["tail_tokens"]) for s in stats if s["split"] == split),
                "shards": sorted(s["file"] for s in stats if s["split"] == split),
            }
            for split in ("train", "val")
        }
        elapsed = time.time() - t0
        art.metrics = {
            "records": {"read": read_records, "kept": final_docs, "dropped": dropped},
            "bytes_read": read_bytes,
            "train_tokens": splits["train"]["tokens"],
            "val_tokens": splits["val"]["tokens"],
            "seconds": round(elapsed, 2),
            "mb_per_s": round(read_bytes / 1e6 / elapsed, 2),
            "stage_seconds": stage_seconds,  # the commit is the rest of `seconds`
        }
        art.extra = {
            "dataset": {
                "source": {"paths": list(cfg.source.paths) or ["<python stdlib>"], "files": len(files)},
                "block_size": cfg.pack.block_size,
                "block_len": cfg.pack.block_size + 1,
                "vocab_size": tok.get_vocab_size(),
                "tokenizer_sha256": art.files["tokenizer.json"]["sha256"],
                "splits": splits,
            }
        }
    artifact = store.open("dataset", cfg.name, verify=False)
    print(summary_table(artifact.manifest, artifact.uri))
    return artifact.manifest


def load_tokenizer(path: str) -> Any:
    """A tokenizer.json from a local path or URI, checked for Helio's special tokens."""
    from models.tokenizer import check_tokenizer
    from tokenizers import Tokenizer

    try:
        fs, p = resolve(path)
        with fs.open_input_stream(p) as f:
            tok = Tokenizer.from_str(f.read().decode())
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise UserError(f"tokenizer.path '{path}' is not a readable tokenizer.json ({e})") from None
    try:
        check_tokenizer(tok, path)
    except ValueError as e:
        raise UserError(str(e)) from None
    return tok


def plan_reads(files: dict[str, int], target: int, splittable: Callable[[str], bool]) -> list[list[tuple[str, int, int]]]:
    """The read blocks: consecutive (file, start, end) pieces of about `target` bytes each.

    A `splittable` file (records are lines) larger than `target` is cut into equal
    byte ranges, read by different tasks (`actors.prepare.read_piece` moves each
    cut to a line end), so no worker ever holds a large file whole; other files
    are one piece. Depends on the input alone, so a block (and the shard it
    becomes) holds the same documents on any cluster, and blocks are even enough
    to balance CPUs.
    """
    pieces: list[tuple[str, int, int]] = []
    for f, size in files.items():
        n = max(1, math.ceil(size / target)) if splittable(f) else 1
        pieces.extend((f, size * i // n, size * (i + 1) // n) for i in range(n))
    groups: list[list[tuple[str, int, int]]] = [[]]
    filled = 0
    for piece in pieces:
        size = piece[2] - piece[1]
        if groups[-1] and filled + size > target:
            groups.append([])
            filled = 0
        groups[-1].append(piece)
        filled += size
    return groups


def summary_table(m: dict[str, Any], uri: str) -> str:
    rec = m["metrics"]["records"]
    rows = [("records read", f"{rec['read']:,}"), ("records kept", f"{rec['kept']:,}")]
    rows += [(f"  dropped: {reason}", f"{n:,}") for reason, n in rec["dropped"].items() if n]
    for split, s in m["dataset"]["splits"].items():
        rows.append((f"{split} blocks / tokens / shards", f"{s['blocks']:,} / {s['tokens']:,} / {len(s['shards'])}"))
    rows += [
        ("vocab size", f"{m['dataset']['vocab_size']:,}"),
        ("input", f"{m['metrics']['bytes_read'] / 1e6:.1f} MB in {m['metrics']['seconds']:.1f} s "
                  f"({m['metrics']['mb_per_s']:.2f} MB/s)"),
        ("artifact", uri),
    ]
    return format_summary("prepare summary", rows)


CONFIG_CLASS = PrepareConfig  # what jobs/configs/prepare_*.yaml must load into


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.prepare", __doc__, PrepareConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
