"""Pretrain a GPT (causal LM) or a BERT-style encoder (masked LM) on a dataset artifact.

    python -m jobs.pretrain jobs/configs/pretrain_demo.yaml [--set storage=DIR ...]

Reads `{storage}/datasets/{dataset}` (made by jobs.prepare) and streams it to
`resources.num_workers` Ray Train workers, each running a DeepSpeed ZeRO engine
(actors/train_loop.py). Checkpoints go to `{storage}/runs/{name}/` with
`metrics.jsonl` and `loss.png`; running the job again with the same name and
storage resumes from the latest checkpoint. The consolidated fp32 model is
exported to `{storage}/models/{name}/` in Hugging Face layout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actors.train_loop import EXPORT_DIR, FaultConfig, LoopConfig, TrainConfig
from cluster.cli import JobFailed, UserError, run_job, format_summary
from cluster.config import ConfigError, to_dict
from cluster.storage import Artifact, ArtifactError, Storage, resolve, write_file_atomic
from cluster.zero import OptimConfig, ZeroConfig
from models.arch import ModelConfig

log = logging.getLogger("helio")


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = 2
    cpus_per_worker: float = 0.5  # on a small machine leave CPU for Ray Data's read tasks
    use_gpu: bool = False

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError("num_workers: must be at least 1")
        if self.cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker: must be positive")


@dataclass(frozen=True)
class FailureConfig:
    max_failures: int = 1  # worker-group restarts from the latest checkpoint; -1: unlimited
    num_to_keep: int = 2  # checkpoints kept in the run folder
    # A worker group that cannot be placed (a lost node that never comes back, resources the cluster
    # will never have) is retried this many times, each after start_timeout_s, then the job fails
    # instead of waiting forever. -1: retry forever (an autoscaler that is slow to add nodes).
    controller_failure_limit: int = 3
    start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_failures < -1:
            raise ValueError("max_failures: must be -1 (unlimited) or >= 0")
        if self.controller_failure_limit < -1:
            raise ValueError("controller_failure_limit: must be -1 (unlimited) or >= 0")
        if self.num_to_keep < 1:
            raise ValueError("num_to_keep: must be at least 1")
        if not self.start_timeout_s > 0:
            raise ValueError("start_timeout_s: must be positive")


@dataclass(frozen=True)
class SampleConfig:
    """Continuations printed from the exported GPT at the end (a quick look at what it learned)."""

    prompt: str = "def"
    count: int = 0
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: int = 50


@dataclass(frozen=True)
class PretrainConfig:
    name: str = "pretrain"
    storage: str = "./runs"
    dataset: str = "stdlib"  # a dataset artifact under storage
    ray_address: str | None = None  # else RAY_ADDRESS, else an embedded local cluster
    local_cpus: int | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)  # testing aid: fail one worker once


def open_dataset(store: Storage, name: str) -> tuple[Artifact, dict[str, Any]]:
    art = store.open("dataset", name, verify=False)  # sizes checked here; shards are not re-hashed on the driver
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
    t, w = cfg.train, cfg.resources.num_workers
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
                      pad_id=pad_id if pad_id is not None else 0, special_ids=special_ids, fault=cfg.fault)


def check_resources(cfg: PretrainConfig, embedded: bool) -> None:
    """On the embedded cluster, refuse what would wait forever instead of failing."""
    import ray

    if not embedded:
        return  # a cloud cluster's autoscaler may add what is missing
    res, r = ray.cluster_resources(), cfg.resources
    if r.use_gpu and res.get("GPU", 0) < r.num_workers:
        raise ConfigError("resources.use_gpu", f"{r.num_workers} GPU workers asked for, this machine has "
                                               f"{int(res.get('GPU', 0))} GPUs")
    cpus, asked = res.get("CPU", 0), r.num_workers * r.cpus_per_worker
    if asked >= cpus:
        raise ConfigError("resources.cpus_per_worker", f"{r.num_workers} workers x {r.cpus_per_worker} CPU take all "
                                                       f"{cpus:g} CPUs and leave none for Ray Data's reads (the run "
                                                       f"would hang); use at most {max(cpus - 1, 0.5) / r.num_workers:g}")


def check_resumable(run_uri: str, loop: LoopConfig, num_workers: int) -> None:
    """A run folder with checkpoints is resumed; refuse it if they came from a different run."""
    import pyarrow.fs as pafs

    from cluster.zero import COMPLETE

    fs, path = resolve(run_uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    folders = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                     if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    for folder in reversed(folders):
        try:
            with fs.open_input_stream(f"{folder}/{COMPLETE.format(rank=0)}") as f:
                record = json.loads(f.read())
        except FileNotFoundError:
            continue
        theirs, ours = record["client_state"].get("run", {}), loop.identity()
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if record["world_size"] != num_workers:
            differ.append(f"num_workers ({record['world_size']} there)")
        if differ:
            raise UserError(f"run folder {run_uri} holds a checkpoint (step {record['client_state']['step']}) of a "
                            f"run that differs in {', '.join(differ)}; resuming it would mix two runs: pick "
                            f"another name, or delete that folder to start over")
        return


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Trains, exports the model artifact and returns its manifest."""
    from cluster.runtime import connect

    store = Storage(cfg.storage)
    store.artifact_path("model", cfg.name)  # validates the name before any work
    art, info = open_dataset(store, cfg.dataset)
    tokenizer_json = art.read_bytes("tokenizer.json")
    loop = loop_config(cfg, art, info, tokenizer_json)
    embedded = not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    log.info(connect(cfg.ray_address, cfg.local_cpus))
    check_resources(cfg, embedded)
    run_uri = store.to_uri(f"{store.root_path}/runs/{cfg.name}")
    check_resumable(run_uri, loop, cfg.resources.num_workers)

    train_uris = [art.file_uri(f) for f in info["splits"]["train"]["shards"]]
    t = cfg.train
    log.info("pretraining a %s (%s) for %d steps of %d x %d tokens on %d workers, ZeRO stage %d; run folder %s",
             cfg.model.arch, _size(cfg.model), t.steps, t.micro_batch * t.grad_accum * cfg.resources.num_workers,
             loop.block_len - 1, cfg.resources.num_workers, cfg.zero.stage, run_uri)
    result, records, seconds = fit(cfg.name, store, loop, train_uris, cfg.resources, cfg.failure,
                                   f"{cfg.name}: {cfg.model.arch}", columns=["input_ids"])
    manifest = export_artifact(cfg, store, art, tokenizer_json, result, records, run_uri, seconds)
    print(summary(manifest, run_uri))
    if cfg.sample.count and cfg.model.arch == "gpt":
        print(samples(store, cfg))
    return manifest


def fit(name: str, store: Storage, loop: LoopConfig, train_uris: list[str], resources: ResourcesConfig,
        failure: FailureConfig, title: str, columns: list[str] | None = None) -> tuple[Any, list[dict], float]:
    """Runs the Ray Train workers (actors/train_loop.py) over Parquet `train_uris` in `{storage}/runs/{name}`.

    Shared by pretraining and finetuning. Returns (Ray Train result, metrics
    records, seconds); draws the loss curve into the run folder.
    """
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from actors.train_loop import train_loop
    from actors.train_report import CURVE_FILE, Progress, loss_curve_png, read_metrics

    run_uri = store.to_uri(f"{store.root_path}/runs/{name}")
    # Read by Ray Train's controller, to which Ray propagates it from this driver.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(failure.start_timeout_s)
    ray.data.DataContext.get_current().enable_progress_bars = False  # workers print progress lines instead
    datasets = {"train": ray.data.read_parquet(train_uris, columns=columns)}
    exec_opts = ray.data.ExecutionOptions(preserve_order=True)  # the same order on every worker, every attempt
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=to_dict(loop),
        scaling_config=ray.train.ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                               resources_per_worker={"CPU": resources.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=store.to_uri(f"{store.root_path}/runs"),
            failure_config=ray.train.FailureConfig(max_failures=failure.max_failures,
                                                   controller_failure_limit=failure.controller_failure_limit),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=failure.num_to_keep),
            callbacks=[Progress(run_uri)]),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=exec_opts),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise JobFailed(f"training failed (failure.max_failures={failure.max_failures}, controller_failure_limit="
                        f"{failure.controller_failure_limit}): {_cause(e)}; "
                        f"checkpoints are in {run_uri}: run the job again with the same name and storage to "
                        f"resume from the latest") from None
    seconds = time.time() - t0
    records = read_metrics(run_uri)
    fs, run_path = resolve(run_uri)
    write_file_atomic(fs, f"{run_path}/{CURVE_FILE}", loss_curve_png(records, title))
    return result, records, seconds


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
    return f"{m.n_layer} layers x {m.n_embd} wide, {m.n_head} heads"


def _cause(e: Exception) -> str:
    """The worker's own error, one line, not Ray's wrapping."""
    errors = getattr(e, "worker_failures", None) or {}
    if errors:
        rank, err = sorted(errors.items())[0]
        return f"worker rank {rank}: {type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
    return str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__


CONFIG_CLASS = PretrainConfig  # what jobs/configs/pretrain_*.yaml must load into


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.pretrain", __doc__, PretrainConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
