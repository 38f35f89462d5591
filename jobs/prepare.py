"""Raw text -> a dataset artifact of packed token blocks, on Ray Data.

    python -m jobs.prepare jobs/configs/prepare_demo.yaml [--set source.paths=[DIR] --set name=mine]

Reads txt / jsonl / json / parquet files (optionally .gz; local paths, s3://,
gs://), cleans and filters them, removes exact and near duplicates, trains a
byte-level BPE tokenizer (or reuses one), tokenizes and packs documents into
blocks of `block_size + 1` tokens, and writes `{storage}/datasets/{name}/`.
With no `source.paths`, it reads the Python standard library of this interpreter.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cluster.cli import UserError, run_job
from cluster.config import ConfigError, to_dict
from cluster.storage import Storage, iter_files, resolve
from models.minhash import MinHashConfig
from models.text import QualityConfig
from models.tokenizer import TokenizerConfig

log = logging.getLogger("helio")


@dataclass(frozen=True)
class SourceConfig:
    paths: tuple[str, ...] = ()  # files, folders, globs or URIs; empty: the stdlib demo corpus
    text_field: str = "text"  # field of jsonl / json / parquet records holding the text
    extensions: tuple[str, ...] = ()  # keep only files ending so (before .gz); empty: all


@dataclass(frozen=True)
class PackConfig:
    block_size: int = 256  # blocks hold block_size + 1 tokens (inputs and shifted targets)
    val_fraction: float = 0.05  # documents sent to val/, chosen by content hash
    target_shard_mb: float = 8.0  # cleaned text per shard; sets the number of shards

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ConfigError("block_size", "must be at least 2")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("val_fraction", "must be in [0, 1)")
        if self.target_shard_mb <= 0:
            raise ConfigError("target_shard_mb", "must be positive")


@dataclass(frozen=True)
class PrepareConfig:
    name: str = "stdlib"
    storage: str = "./runs"
    ray_address: str | None = None  # else RAY_ADDRESS, else an embedded local cluster
    source: SourceConfig = field(default_factory=SourceConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: MinHashConfig = field(default_factory=MinHashConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)


def stdlib_files() -> list[str]:
    """The demo corpus: every .py file of this interpreter's standard library."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return files


def expand_sources(cfg: SourceConfig) -> list[str]:
    """Every input file named by `cfg.paths` (files, folders, globs, URIs), sorted."""
    if not cfg.paths:
        return stdlib_files()
    files: list[str] = []
    for spec in cfg.paths:
        if "://" not in spec and glob.has_magic(spec):
            matched = sorted(glob.glob(spec, recursive=True))
            if not matched:
                raise UserError(f"source path '{spec}' matches no file")
            for m in matched:
                files.extend(iter_files(m))
            continue
        fs, path = resolve(spec)
        import pyarrow.fs as pafs

        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise UserError(f"source path '{spec}' does not exist")
        files.extend(iter_files(spec))
    if cfg.extensions:
        wanted = tuple(e.lower() for e in cfg.extensions)
        files = [f for f in files if f.lower().removesuffix(".gz").endswith(wanted)]
    files = sorted(dict.fromkeys(files))
    if not files:
        raise UserError(f"source.paths {list(cfg.paths)} hold no input file (extensions: {list(cfg.extensions) or 'any'})")
    return files


def _drop(batch: dict[str, np.ndarray], drop_ref: list) -> dict[str, np.ndarray]:
    import ray

    drop = ray.get(drop_ref[0])
    keep = ~np.isin(batch["doc_id"], drop)
    return {k: v[keep] for k, v in batch.items()}


def _kept(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = batch["reason"] == ""
    return {k: v[keep] for k, v in batch.items() if k != "reason"}


def _sample(batch: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    pick = np.array([int.from_bytes(h[8:16], "little") % 1_000_000 < fraction * 1_000_000 for h in batch["hash"]], dtype=bool)
    return {"text": batch["text"][pick]}


def run(cfg: PrepareConfig) -> dict[str, Any]:
    """Runs the whole job; returns the artifact's manifest."""
    import ray
    import ray.data
    from ray.data.aggregate import Count, Sum

    from actors import prepare as udf
    from cluster.runtime import cluster_cpus, connect
    from models.tokenizer import check_tokenizer, iter_bounded, train_bpe
    from tokenizers import Tokenizer

    t0 = time.time()
    store = Storage(cfg.storage)
    store.artifact_path("dataset", cfg.name)  # validates the name before any work
    files = expand_sources(cfg.source)
    reused_tokenizer = None
    if cfg.tokenizer.path:
        try:
            fs, p = resolve(cfg.tokenizer.path)
            with fs.open_input_stream(p) as f:
                reused_tokenizer = Tokenizer.from_str(f.read().decode())
            check_tokenizer(reused_tokenizer, cfg.tokenizer.path)
        except (OSError, FileNotFoundError, ValueError, Exception) as e:  # tokenizers raises plain Exception
            raise UserError(f"tokenizer.path '{cfg.tokenizer.path}' is not a usable tokenizer.json: {e}") from None
    log.info(connect(cfg.ray_address))
    cpus = cluster_cpus()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same input, same shards
    quality, minhash = to_dict(cfg.quality), to_dict(cfg.dedup)

    log.info("[1/5] read, clean, filter, hash %d files", len(files))
    docs = (
        ray.data.read_binary_files(files, include_paths=True)
        .map_batches(udf.read_records, batch_size=8,
                     fn_kwargs={"text_field": cfg.source.text_field, "quality": quality, "minhash": minhash})
        .materialize()
    )
    by_reason = {r["reason"]: (r["count()"], r["sum(nbytes)"]) for r in
                 docs.groupby("reason").aggregate(Count(), Sum("nbytes")).take_all()}
    read_records = sum(c for c, _ in by_reason.values())
    read_bytes = sum(b for _, b in by_reason.values())
    kept_count, kept_bytes = by_reason.pop("", (0, 0))
    dropped = {reason: count for reason, (count, _) in sorted(by_reason.items())}
    if kept_count == 0:
        raise UserError(f"no record of the {read_records} read passed cleaning and quality filters: {dropped}")
    kept = docs.map_batches(_kept)

    log.info("[2/5] exact dedup of %d documents", kept_count)
    buckets = max(cpus, math.ceil(kept_count / 200_000))
    exact = (
        kept.select_columns(["doc_id", "hash"])
        .map_batches(udf.hash_bucket, fn_kwargs={"num_buckets": buckets})
        .groupby("bucket", num_partitions=buckets)
        .map_groups(udf.exact_duplicates, batch_format="numpy")
    )
    exact_ids = np.array([r["doc_id"] for r in exact.take_all()], dtype=np.int64)
    dropped["exact_duplicate"] = len(exact_ids)

    log.info("[3/5] near-duplicate detection (MinHash LSH, %d bands x %d rows, Jaccard >= %.2f)",
             cfg.dedup.bands, cfg.dedup.rows, cfg.dedup.threshold)
    exact_ref = [ray.put(exact_ids)]
    band_buckets = max(cpus, math.ceil(kept_count * cfg.dedup.bands / 200_000))
    edges = (
        kept.select_columns(["doc_id", "sig"])
        .map_batches(_drop, fn_kwargs={"drop_ref": exact_ref})
        .map_batches(udf.band_rows, fn_kwargs={"minhash": minhash, "num_buckets": band_buckets})
        .groupby("bucket", num_partitions=band_buckets)
        .map_groups(udf.lsh_edges, batch_format="numpy", fn_kwargs={"minhash": minhash})
        .take_all()
    )
    from models.minhash import duplicates_to_drop

    near = duplicates_to_drop([(e["a"], e["b"]) for e in edges])
    dropped["near_duplicate"] = len(near)
    drop_ref = [ray.put(np.concatenate([exact_ids, np.fromiter(near, dtype=np.int64, count=len(near))]))]
    final = kept.map_batches(_drop, fn_kwargs={"drop_ref": drop_ref})

    with store.create("dataset", cfg.name, config=to_dict(cfg)) as art:
        if reused_tokenizer is not None:
            log.info("[4/5] reusing tokenizer %s", cfg.tokenizer.path)
            tok = reused_tokenizer
        else:
            fraction = min(1.0, cfg.tokenizer.sample_mb * 1e6 / max(kept_bytes, 1))
            log.info("[4/5] training a %d-token byte-level BPE on %.0f%% of the kept text", cfg.tokenizer.vocab_size, 100 * fraction)
            sample = final.select_columns(["text", "hash"]).map_batches(_sample, fn_kwargs={"fraction": fraction})
            texts = (str(r["text"]) for r in sample.iter_rows())
            tok = train_bpe(iter_bounded(texts, int(cfg.tokenizer.sample_mb * 1e6)), cfg.tokenizer.vocab_size)
        tokenizer_json = tok.to_str()
        art.write_bytes("tokenizer.json", tokenizer_json.encode())

        num_shards = max(1, math.ceil(kept_bytes / (cfg.pack.target_shard_mb * 1e6)))
        log.info("[5/5] tokenize and pack into %d-token blocks, %d shards per split", cfg.pack.block_size + 1, num_shards)
        stats = (
            final.select_columns(["doc_id", "text", "hash", "nbytes"])
            .map_batches(udf.Tokenize, batch_size=64, concurrency=(1, cpus),
                         fn_constructor_kwargs={"tokenizer_json": tokenizer_json, "drop_ref": None,
                                                "val_fraction": cfg.pack.val_fraction, "num_shards": num_shards})
            .groupby(["split", "shard"])
            .map_groups(udf.pack_shard, batch_format="numpy", fn_kwargs={"out_uri": art.tmp_uri, "block_len": cfg.pack.block_size + 1,
                                                   "eot_id": udf.eot_id(tokenizer_json)})
            .take_all()
        )
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
        manifest_preview = {"metrics": art.metrics, **art.extra}
    uri = store.to_uri(store.artifact_path("dataset", cfg.name))
    print(summary_table(manifest_preview, uri))
    return manifest_preview


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
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "prepare summary", "-" * (width + 20)] + [f"{k:<{width}}  {v}" for k, v in rows])


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.prepare", __doc__, PrepareConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
