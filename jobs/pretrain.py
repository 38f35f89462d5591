"""Pretrain a GPT or Llama (causal LM), a BERT-style encoder (masked LM) or a vision model (ResNet, ViT:
supervised image classification) on a dataset artifact.

    python -m jobs.pretrain jobs/configs/pretrain_demo.yaml [--set storage=DIR ...]

Reads `{storage}/datasets/{dataset}` (made by jobs.prepare, or jobs.prepare_images for a vision model:
images augmented on the fly, `augment`) and streams it to
`resources.num_workers` Ray Train workers, each running a DeepSpeed ZeRO engine
(actors/train_loop.py). Checkpoints go to `{storage}/runs/{name}/` with
`metrics.jsonl` and `loss.png`; running the job again with the same name and
storage resumes from the latest checkpoint. The consolidated fp32 model is
exported to `{storage}/models/{name}/` in Hugging Face layout.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actors.train_driver import fit
from actors.train_tracking import TrackingConfig, log_files, tracking_targets
from actors.train_loop import EXPORT_DIR, FaultConfig, ImageSpec, LoopConfig, TrainConfig
from cluster.cli import JobFailed, run_job, format_summary
from cluster.config import ConfigError, to_dict
from cluster.runtime import JobConfig, connect_job, embedded
from cluster.storage import Artifact, ArtifactError, Storage
from cluster.train_run import (FailureConfig, ResourcesConfig, check_elastic, check_resources, check_resumable,
                               elastic_max)
from cluster.zero import OptimConfig, ZeroConfig
from models.arch import CAUSAL, VISION, ModelConfig
from models.image_objective import AugmentConfig

log = logging.getLogger("helio")


@dataclass(frozen=True)
class SampleConfig:
    """Continuations printed from the exported GPT at the end (a quick look at what it learned)."""

    prompt: str = "def"
    count: int = 0
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: int = 50


@dataclass(frozen=True)
class PretrainConfig(JobConfig):
    name: str = "pretrain"
    dataset: str = "stdlib"  # a dataset artifact under storage
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)  # testing aid: fail one worker once
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow / TensorBoard
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # image datasets only


def open_dataset(store: Storage, name: str) -> tuple[Artifact, dict[str, Any]]:
    art = store.open("dataset", name, verify=False)  # sizes checked here; shards are not re-hashed on the driver
    if "images" in art.manifest:
        return art, art.manifest["images"]
    info = art.manifest.get("dataset")
    if not info or "block_len" not in info or "splits" not in info:
        raise ArtifactError(f"dataset artifact '{art.uri}' has no 'dataset' section: was it made by jobs.prepare?")
    return art, info


def loop_config(cfg: PretrainConfig, art: Artifact, info: dict[str, Any], tokenizer_json: bytes) -> LoopConfig:
    """Checks the config against the dataset and the cluster; the worker's config."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json.decode())
    specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    special_ids = tuple(sorted(tok.token_to_id(s) for s in specials))
    mask_id, pad_id = tok.token_to_id("[MASK]"), tok.token_to_id("<|pad|>")
    if cfg.model.arch == "encoder" and mask_id is None:
        raise ConfigError("model.arch", "the dataset's tokenizer has no [MASK] token, so it cannot train a masked LM")
    t, w = cfg.train, cfg.resources.max_workers
    rows = t.micro_batch * t.grad_accum * w
    train_blocks, val_blocks = info["splits"]["train"]["blocks"], info["splits"]["val"]["blocks"]
    if train_blocks < rows:
        raise ConfigError("train.micro_batch", f"a global batch of {rows} blocks (micro_batch x grad_accum x "
                                               f"num_workers) exceeds the dataset's {train_blocks} training blocks")
    if val_blocks < t.micro_batch * w * t.eval_batches:
        raise ConfigError("train.eval_batches", f"the dataset has {val_blocks} validation blocks, fewer than "
                                                f"{t.eval_batches} evaluation batches of {t.micro_batch * w}")
    return LoopConfig(model=cfg.model, train=t, zero=cfg.zero, optim=cfg.optim, vocab_size=info["vocab_size"],
                      block_len=info["block_len"], train_blocks=train_blocks,
                      val_files=tuple(art.file_uri(f) for f in info["splits"]["val"]["shards"]),
                      mask_id=mask_id if mask_id is not None else -1,
                      pad_id=pad_id if pad_id is not None else 0, special_ids=special_ids, fault=cfg.fault,
                      max_workers=elastic_max(cfg.resources))


def image_loop_config(cfg: PretrainConfig, art: Artifact, images: dict[str, Any]) -> LoopConfig:
    """Checks a vision model's config against an image dataset; the worker's config."""
    if cfg.model.arch not in VISION:
        raise ConfigError("model.arch", f"dataset '{art.name}' holds images: train a {' or '.join(VISION)} on it, "
                                        f"not a {cfg.model.arch}")
    if cfg.model.arch == "vit" and images["size"] % cfg.model.patch_size:
        raise ConfigError("model.patch_size", f"{cfg.model.patch_size} does not divide the dataset's "
                                              f"{images['size']}-pixel images")
    t, w = cfg.train, cfg.resources.max_workers
    train, val = images["splits"]["train"]["images"], images["splits"]["val"]["images"]
    if train < t.micro_batch * t.grad_accum * w:
        raise ConfigError("train.micro_batch", f"a global batch of {t.micro_batch * t.grad_accum * w} images "
                                               f"(micro_batch x grad_accum x num_workers) exceeds the dataset's "
                                               f"{train} training images")
    if val < t.micro_batch * w * t.eval_batches:
        raise ConfigError("train.eval_batches", f"the dataset has {val} validation images, fewer than "
                                                f"{t.eval_batches} evaluation batches of {t.micro_batch * w}")
    spec = ImageSpec(size=images["size"], channels=images["channels"], labels=tuple(images["classes"]),
                     augment=cfg.augment)
    return LoopConfig(model=cfg.model, train=t, zero=cfg.zero, optim=cfg.optim, vocab_size=0, block_len=0,
                      train_blocks=train, val_files=tuple(art.file_uri(f) for f in images["splits"]["val"]["shards"]),
                      fault=cfg.fault, images=spec, max_workers=elastic_max(cfg.resources))


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Trains, exports the model artifact and returns its manifest."""
    store = Storage(cfg.storage)
    store.artifact_path("model", cfg.name)  # validates the name before any work
    art, info = open_dataset(store, cfg.dataset)
    if "classes" in info:
        return run_images(cfg, store, art, info)
    if cfg.model.arch in VISION:
        raise ConfigError("model.arch", f"a {cfg.model.arch} trains on images; dataset '{cfg.dataset}' holds token "
                                        f"blocks (make an image dataset with jobs.prepare_images)")
    tokenizer_json = art.read_bytes("tokenizer.json")
    loop = loop_config(cfg, art, info, tokenizer_json)
    check_elastic(cfg.resources, cfg.train.grad_accum, cfg.zero.stage)
    connect_job(cfg)
    check_resources(cfg.resources, embedded(cfg))
    run_uri = store.to_uri(f"{store.root_path}/runs/{cfg.name}")
    check_resumable(run_uri, loop.identity(), cfg.resources)

    train_uris = [art.file_uri(f) for f in info["splits"]["train"]["shards"]]
    t = cfg.train
    log.info("pretraining a %s (%s) for %d steps of %d x %d tokens on %s workers, ZeRO stage %d; run folder %s",
             cfg.model.arch, _size(cfg.model), t.steps, t.micro_batch * t.grad_accum * cfg.resources.max_workers,
             loop.block_len - 1, cfg.resources.describe(), cfg.zero.stage, run_uri)
    tracking = tracking_targets(cfg.tracking, cfg.storage)
    result, records, seconds = fit(cfg.name, store, loop, train_uris, cfg.resources, cfg.failure,
                                   f"{cfg.name}: {cfg.model.arch}", columns=["input_ids"], tracking=tracking,
                                   params=to_dict(cfg))
    manifest = export_artifact(cfg, store, art, tokenizer_json, result, records, run_uri, seconds)
    log_files(tracking, run_uri, cfg.name, to_dict(cfg), {"helio.json": json.dumps(manifest, indent=1).encode()})
    print(summary(manifest, run_uri))
    if cfg.sample.count and cfg.model.arch in CAUSAL:
        print(samples(store, cfg))
    return manifest


def run_images(cfg: PretrainConfig, store: Storage, art: Artifact, images: dict[str, Any]) -> dict[str, Any]:
    """The vision branch of `run`: supervised pretraining of a ResNet or ViT on an image dataset."""
    loop = image_loop_config(cfg, art, images)
    check_elastic(cfg.resources, cfg.train.grad_accum, cfg.zero.stage)
    connect_job(cfg)
    check_resources(cfg.resources, embedded(cfg))
    run_uri = store.to_uri(f"{store.root_path}/runs/{cfg.name}")
    check_resumable(run_uri, loop.identity(), cfg.resources)
    t = cfg.train
    log.info("pretraining a %s on %d classes of %dx%dx%d images for %d steps of %d on %s workers, ZeRO stage %d; "
             "run folder %s", cfg.model.arch, len(images["classes"]), images["size"], images["size"],
             images["channels"], t.steps, t.micro_batch * t.grad_accum * cfg.resources.max_workers,
             cfg.resources.describe(), cfg.zero.stage, run_uri)
    tracking = tracking_targets(cfg.tracking, cfg.storage)
    result, records, seconds = fit(cfg.name, store, loop, [art.file_uri(f) for f in images["splits"]["train"]["shards"]],
                                   cfg.resources, cfg.failure, f"{cfg.name}: {cfg.model.arch}",
                                   columns=["pixels", "label"], tracking=tracking, params=to_dict(cfg))
    final = result.metrics or {}
    if result.checkpoint is None or final.get("step") != t.steps:
        raise JobFailed(f"the run in {run_uri} ended without a final checkpoint at step {t.steps}")
    last_val = next((r for r in reversed(records) if "val_loss" in r), final)
    speeds = [r["tokens_per_s"] for r in records[1:]] or [final.get("tokens_per_s", 0.0)]  # first: warm-up
    with result.checkpoint.as_directory() as folder, \
            store.create("model", cfg.name, to_dict(cfg), parents=[{
                "kind": "dataset", "name": art.name, "uri": art.uri, "created_at": art.manifest["created_at"]}]) as out:
        for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
            out.write_bytes(name, (Path(folder) / EXPORT_DIR / name).read_bytes())
        out.metrics = {"val_loss": last_val.get("val_loss"), "val_accuracy": last_val.get("val_accuracy"),
                       "steps": final["step"], "images": final["tokens"],
                       "images_per_s": float(np.median(speeds)), "seconds": round(seconds, 2)}
        out.extra["model"] = {"arch": cfg.model.arch, "hf_layout": True, "labels": list(images["classes"]),
                              "image_size": images["size"], "channels": images["channels"]}
        out.extra["run"] = {"uri": run_uri, "checkpoint": result.checkpoint.path, "step": final["step"]}
    manifest = store.open("model", cfg.name, verify=False).manifest
    log_files(tracking, run_uri, cfg.name, to_dict(cfg), {"helio.json": json.dumps(manifest, indent=1).encode()})
    m = manifest["metrics"]
    print(format_summary("pretrain summary", [
        ("steps / images", f"{m['steps']:,} / {m['images']:,}"),
        ("validation loss / accuracy", f"{m['val_loss']:.4f} / {m['val_accuracy']:.4f}"),
        ("images/s (median)", f"{m['images_per_s']:,.0f}"), ("time", f"{m['seconds']:.1f} s"),
        ("run folder", run_uri), ("model artifact", manifest["name"])]))
    return manifest


def export_artifact(cfg: PretrainConfig, store: Storage, dataset: Artifact, tokenizer_json: bytes, result: Any,
                    records: list[dict], run_uri: str, seconds: float) -> dict[str, Any]:
    final = result.metrics or {}
    if result.checkpoint is None or final.get("step") != cfg.train.steps:
        raise JobFailed(f"the run in {run_uri} ended without a final checkpoint at step {cfg.train.steps}")
    last_val = next((r for r in reversed(records) if "val_loss" in r), final)
    speeds = [r["tokens_per_s"] for r in records[1:]] or [final.get("tokens_per_s", 0.0)]  # first: warm-up
    mfus = [r["mfu"] for r in records[1:] if r.get("mfu") is not None]
    with result.checkpoint.as_directory() as folder, \
            store.create("model", cfg.name, to_dict(cfg), parents=[{
                "kind": "dataset", "name": dataset.name, "uri": dataset.uri,
                "created_at": dataset.manifest["created_at"]}]) as out:
        for name in ("config.json", "model.safetensors"):
            out.write_bytes(name, (Path(folder) / EXPORT_DIR / name).read_bytes())
        out.write_bytes("tokenizer.json", tokenizer_json)
        out.metrics = {
            "val_loss": last_val.get("val_loss"), "val_ppl": last_val.get("val_ppl"),
            "val_unigram_entropy": final.get("val_unigram_entropy"), "steps": final["step"], "tokens": final["tokens"],
            "tokens_per_s": float(np.median(speeds)), "mfu": float(np.median(mfus)) if mfus else None,
            "seconds": round(seconds, 2),
        }
        out.extra["model"] = {"arch": cfg.model.arch, "hf_layout": True}
        out.extra["run"] = {"uri": run_uri, "checkpoint": result.checkpoint.path, "step": final["step"]}
    return store.open("model", cfg.name, verify=False).manifest


def samples(store: Storage, cfg: PretrainConfig) -> str:
    """A few sampled continuations of `sample.prompt` from the exported model."""
    import tempfile

    import torch
    from tokenizers import Tokenizer

    from models.hf import load_model

    art = store.open("model", cfg.name)
    with tempfile.TemporaryDirectory() as d:
        for name in ("config.json", "model.safetensors"):
            (Path(d) / name).write_bytes(art.read_bytes(name))
        model = load_model(d).eval()
    tok = Tokenizer.from_str(art.read_bytes("tokenizer.json").decode())
    s = cfg.sample
    idx = torch.tensor([tok.encode(s.prompt).ids] * s.count)
    out = model.generate(idx, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                         stop_tokens=[tok.token_to_id("<|endoftext|>")], generator=torch.Generator().manual_seed(0))
    lines = [f"\nsampled continuations of {s.prompt!r}:"]
    for i, row in enumerate(out.tolist()):
        lines += [f"--- sample {i + 1}", tok.decode(row)]
    return "\n".join(lines)


def summary(manifest: dict[str, Any], run_uri: str) -> str:
    m = manifest["metrics"]
    mfu = "n/a" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%"
    rows = [("steps / tokens", f"{m['steps']:,} / {m['tokens']:,}"),
            ("validation loss / perplexity", f"{m['val_loss']:.4f} / {m['val_ppl']:.1f}"),
            ("unigram entropy of val data", f"{m['val_unigram_entropy']:.4f} nats"),
            ("tokens/s (median) / MFU", f"{m['tokens_per_s']:,.0f} / {mfu}"),
            ("time", f"{m['seconds']:.1f} s"), ("run folder", run_uri),
            ("model artifact", manifest["name"])]
    return format_summary("pretrain summary", rows)


def _size(m: ModelConfig) -> str:
    kv = f", {m.n_kv_head} key/value heads" if m.arch == "llama" and m.n_kv_head not in (0, m.n_head) else ""
    return f"{m.n_layer} layers x {m.n_embd} wide, {m.n_head} heads{kv}"


CONFIG_CLASS = PretrainConfig  # what jobs/configs/pretrain_*.yaml must load into


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.pretrain", __doc__, PretrainConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
