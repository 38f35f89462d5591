"""Finetune a Helio or Hugging Face model for instruction following, classification or embeddings.

    python -m jobs.finetune jobs/configs/finetune_embed_demo.yaml [--set storage=DIR ...]

The base is a model artifact under `storage` (`base.artifact`) or a Hugging
Face GPT-2 / BERT folder (`base.hf_folder`, imported once as a model artifact).
Task records (JSONL or Parquet, local or cloud) are tokenized by Ray Data; the
same Ray Train + DeepSpeed worker loop as pretraining (actors/train_loop.py)
then trains the whole model or LoRA adapters. Outputs under `storage`:
`models/{name}` (a standalone Hugging Face model; for LoRA the merged one),
`adapters/{name}` (LoRA only, PEFT format), `runs/{name}` (checkpoints,
metrics.jsonl, loss.png, the tokenized data). The held-out task metrics of the
base and of the result go into both manifests and the summary.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actors.chat import ChatFormat, tokenizer_files
from actors.model_import import import_model, source_folder
from actors.model_loader import artifact_arch
from actors.train_driver import fit
from actors.train_tracking import TrackingConfig, log_files, tracking_targets
from actors.train_loop import EXPORT_DIR, FaultConfig, LoopConfig, TrainConfig
from cluster.cli import JobFailed, UserError, format_summary, run_job
from cluster.config import ConfigError, to_dict
from cluster.runtime import JobConfig, connect_job, embedded
from cluster.storage import Artifact, Storage, iter_files, resolve
from cluster.train_run import (FailureConfig, ResourcesConfig, check_elastic, check_resources, check_resumable,
                               elastic_max)
from cluster.zero import OptimConfig, ZeroConfig
from models.arch import CAUSAL
from models.finetune import TaskSpec
from models.image_objective import AugmentConfig
from models.lora import LoraSpec

log = logging.getLogger("helio")


@dataclass(frozen=True)
class BaseConfig:
    artifact: str = ""  # a model artifact under storage
    hf_folder: str = ""  # or a Hugging Face folder: a path, a URI, or pkg:<python package>/<subfolder>
    import_as: str = ""  # the model artifact an hf_folder is imported into; default: the folder's name

    def __post_init__(self) -> None:
        if bool(self.artifact) == bool(self.hf_folder):
            raise ValueError("artifact: set exactly one of base.artifact and base.hf_folder")


def padding(cols: dict[str, np.ndarray]) -> float:
    """The share of a table's token slots that are padding: real tokens are the `length` / `*_len`
    columns' sum (not sft's `prompt_len`, a part of `length`), slots the `*_ids` columns' size."""
    real = sum(int(v.sum()) for k, v in cols.items() if k == "length" or (k.endswith("_len") and k != "prompt_len"))
    return 1 - real / sum(v.size for k, v in cols.items() if k.endswith("_ids"))


@dataclass(frozen=True)
class DataConfig:
    tasks: str = ""  # a tasks artifact under storage (jobs.make_tasks): reads {task_dir}/train.jsonl, val.jsonl
    images: str = ""  # task image_classify: an image dataset artifact (jobs.prepare_images) instead
    task_dir: str = ""  # folder in that artifact; default: sft / classify / retrieval by task
    train: str = ""  # or explicit files / folders / URIs (.jsonl, .json or .parquet)
    val: str = ""
    max_len: int = 128  # tokens per text (sft: prompt + response)
    max_query_len: int = 64  # embed: tokens per query
    pack: bool = True  # several examples (embed: pairs) per training row, none attending to another (false: one each)

    def __post_init__(self) -> None:
        if sum(map(bool, (self.tasks, self.train, self.images))) != 1:
            raise ValueError("tasks: set exactly one of data.tasks, data.train and data.images")
        if self.train and not self.val:
            raise ValueError("val: data.train needs a held-out data.val")
        if self.max_len < 8 or self.max_query_len < 4:
            raise ValueError("max_len: must be at least 8 (max_query_len at least 4)")


@dataclass(frozen=True)
class EvalConfig:
    max_examples: int = 500  # held-out rows scored before and after (sft: greedy generations)
    max_new_tokens: int = 128  # sft exact-match: generation budget
    threads: int = 2  # torch threads of the evaluator (it runs while training does not)


@dataclass(frozen=True)
class FinetuneConfig(JobConfig):
    name: str = "finetune"
    task: str = "sft"  # sft | classify | embed | image_classify (actors/image_finetune.py)
    method: str = "full"  # full | lora
    base: BaseConfig = field(default_factory=lambda: BaseConfig(artifact="pretrain_demo"))
    data: DataConfig = field(default_factory=lambda: DataConfig(tasks="stdlib_tasks"))
    lora: LoraSpec = field(default_factory=LoraSpec)
    temperature: float = 0.05  # embed: contrastive softmax temperature
    dropout: float | None = None  # overrides the base's dropout; None: keep it
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, micro_batch=8, eval_every=50,
                                                                   checkpoint_every=50))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10))
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow / TensorBoard
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # image_classify: on-the-fly augmentation
    compare_scratch: bool = False  # image_classify: also train the architecture from scratch (the transfer table)

    def __post_init__(self) -> None:
        if self.task not in ("sft", "classify", "embed", "image_classify"):
            raise ValueError(f"task: must be sft, classify, embed or image_classify, not {self.task!r}")
        if (self.task == "image_classify") != bool(self.data.images):
            raise ValueError("task: image_classify trains on data.images (an image dataset), and only it does")
        if self.method not in ("full", "lora"):
            raise ValueError(f"method: must be full or lora, not {self.method!r}")
        if not self.temperature > 0:
            raise ValueError("temperature: must be positive")


# ---- the base model -------------------------------------------------------------------------------

def open_base(store: Storage, cfg: BaseConfig) -> Artifact:
    """The base model artifact; an hf_folder is imported (validated by loading it) the first time."""
    if cfg.artifact:
        return store.open("model", cfg.artifact, verify=False)
    folder = source_folder(cfg.hf_folder, "base.hf_folder")
    name = cfg.import_as or Path(folder.rstrip("/")).name.replace(".", "-") or "imported"
    if store.exists("model", name):
        art = store.open("model", name, verify=False)
        imported = art.manifest.get("config", {})
        # "hf_folder": what artifacts imported before jobs.import_model existed recorded
        if cfg.hf_folder not in (imported.get("source"), imported.get("hf_folder")):
            raise UserError(f"model artifact '{name}' exists and was not imported from {cfg.hf_folder}: "
                            f"set base.import_as to another name")
        return art
    return import_model(store, cfg.hf_folder, name, "base.hf_folder")


# ---- task data ------------------------------------------------------------------------------------

def data_uris(store: Storage, cfg: FinetuneConfig) -> tuple[dict[str, list[str]], dict | None]:
    """{split: [file URIs]} and the tasks artifact's lineage entry (if the data came from one)."""
    d = cfg.data
    if d.tasks:
        art = store.open("task", d.tasks, verify=False)
        sub = d.task_dir or {"sft": "sft", "classify": "classify", "embed": "retrieval"}[cfg.task]
        uris = {s: [art.file_uri(f) for f in art.files(f"{sub}/{s}.")] for s in ("train", "val")}
        for split, found in uris.items():
            if not found:
                raise ConfigError("data.task_dir", f"tasks artifact '{art.uri}' has no {sub}/{split}.* file")
        return uris, {"kind": "task", "name": art.name, "uri": art.uri, "created_at": art.manifest["created_at"]}
    import pyarrow.fs as pafs

    uris = {}
    for split, spec in (("train", d.train), ("val", d.val)):
        fs, path = resolve(spec)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise ConfigError(f"data.{split}", f"'{spec}' does not exist")
        uris[split] = [u for u, _ in iter_files(spec) if u.endswith((".jsonl", ".json", ".parquet"))]
        if not uris[split]:
            raise ConfigError(f"data.{split}", f"'{spec}' holds no .jsonl, .json or .parquet file")
    return uris, None


def tokenize_split(cfg: FinetuneConfig, uris: list[str], tokenizer_files: dict[str, str]
                   ) -> tuple[dict[str, np.ndarray], dict[str, int], int]:
    """Reads and tokenizes one split with Ray Data; (kept columns, drops by reason, records read)."""
    import ray.data

    from actors.finetune_data import tokenize_records

    if all(u.endswith(".parquet") for u in uris):
        ds = ray.data.read_parquet(uris)
    elif not any(u.endswith(".parquet") for u in uris):
        ds = ray.data.read_json(uris, lines=True) if all(u.endswith(".jsonl") for u in uris) else ray.data.read_json(uris)
    else:
        raise ConfigError("data", f"mixed Parquet and JSON files in {uris[:3]}: use one format per split")
    ds = ds.map_batches(tokenize_records, batch_format="numpy",
                        fn_kwargs={"kind": cfg.task, "tokenizer_files": tokenizer_files, "max_len": cfg.data.max_len,
                                   "max_query_len": cfg.data.max_query_len})
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    if not parts:
        return {}, {}, 0
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    drop = cols.pop("drop")
    drops = dict(sorted(Counter(r for r in drop if r).items()))
    keep = drop == ""
    return {k: v[keep] for k, v in cols.items()}, drops, int(len(drop))


def write_rows(uri: str, cols: dict[str, np.ndarray]) -> None:
    """Fixed-width token columns as one Parquet file (fixed_size_list columns, as the train loop reads)."""
    import pyarrow as pa

    from cluster.storage import write_parquet_file

    arrays = {}
    for k, v in cols.items():
        if v.ndim == 2:
            arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1).astype(np.int32)), v.shape[1])
        else:
            arrays[k] = pa.array(v.astype(np.int32))
    write_parquet_file(uri, pa.table(arrays))


def prepare_data(cfg: FinetuneConfig, store: Storage, run_uri: str, tokenizer_files: dict[str, str]) -> dict[str, Any]:
    """Tokenizes train and val into `{run}/data/`; checks counts and labels. Returns what the run needs."""
    uris, lineage = data_uris(store, cfg)
    out: dict[str, Any] = {"lineage": lineage, "labels": (), "rows": {}, "drops": {}, "read": {}, "uris": {}}
    tables = {}
    for split in ("train", "val"):
        cols, drops, read = tokenize_split(cfg, uris[split], tokenizer_files)
        if read == 0:
            raise UserError(f"the {split} data ({', '.join(uris[split][:3])}) holds no records")
        if not cols or not len(next(iter(cols.values()))):
            raise UserError(f"none of the {read} {split} records is usable: dropped {drops}")
        tables[split] = cols
        out["drops"][split], out["read"][split] = drops, read
        if drops:
            log.warning("%s: %d of %d records dropped: %s", split, sum(drops.values()), read, drops)
    if cfg.task == "classify":
        labels = sorted(set(tables["train"]["label_name"].tolist()))
        unknown = sorted(set(tables["val"]["label_name"].tolist()) - set(labels))
        if unknown:
            raise UserError(f"the val data has labels the train data never shows: {unknown[:5]} "
                            f"(in {', '.join(uris['val'][:2])}); a classifier cannot learn them")
        if len(labels) < 2:
            raise UserError(f"the train data has {len(labels)} distinct label(s); classification needs two or more")
        index = {name: i for i, name in enumerate(labels)}
        for cols in tables.values():
            cols["label"] = np.array([index[n] for n in cols.pop("label_name")], dtype=np.int32)
        out["labels"] = tuple(labels)
    if cfg.data.pack:  # validation rows stay one per example
        from actors.chat import ChatFormat
        from actors.finetune_data import pack_pairs, pack_rows

        before = tables["train"]
        pack = pack_pairs if cfg.task == "embed" else pack_rows
        tables["train"] = pack(before, ChatFormat(tokenizer_files).pad_id)
        out["packing"] = {"examples": len(before["pos_len" if cfg.task == "embed" else "length"]),
                          "rows": len(next(iter(tables["train"].values()))),
                          "padding_unpacked": padding(before), "padding_packed": padding(tables["train"])}
        log.info("packed %d training examples into %d rows: padding %.0f%% -> %.0f%%", out["packing"]["examples"],
                 out["packing"]["rows"], 100 * out["packing"]["padding_unpacked"],
                 100 * out["packing"]["padding_packed"])
    for split, cols in tables.items():
        out["uris"][split] = f"{run_uri}/data/{split}.parquet"
        write_rows(out["uris"][split], cols)
        out["rows"][split] = len(next(iter(cols.values())))
    return out


# ---- the run --------------------------------------------------------------------------------------

def evaluate(evaluator: Any, cfg: FinetuneConfig, model_uri: str, rows_uri: str, eos_id: int | None) -> dict:
    import ray

    e = cfg.eval
    return ray.get(evaluator.evaluate.remote(cfg.task, model_uri, rows_uri, e.max_examples, eos_id, e.max_new_tokens))


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Imports the base if needed, tokenizes, evaluates the base, trains, exports, evaluates the result."""
    store = Storage(cfg.storage)
    store.artifact_path("model", cfg.name)  # validates the name before any work
    connect_job(cfg)
    check_resources(cfg.resources, embedded(cfg))
    check_elastic(cfg.resources, cfg.train.grad_accum, cfg.zero.stage)
    if cfg.task == "image_classify":
        from actors import image_finetune

        return image_finetune.run(cfg, store)
    base = open_base(store, cfg.base)
    arch = _arch_config(base).arch
    if (cfg.task == "sft" and arch not in CAUSAL) or (cfg.task == "embed" and arch not in ("encoder", "llama")):
        need = "a causal LM (GPT or Llama)" if cfg.task == "sft" else "an encoder (BERT) or Llama-family"
        raise ConfigError("task", f"task {cfg.task} needs {need} base; "
                                  f"model artifact '{base.name}' is of arch {arch}")
    files = tokenizer_files(base)
    chat = ChatFormat(files)
    pad_id, eos_id = chat.pad_id, chat.eos_id
    run_uri = store.to_uri(f"{store.root_path}/runs/{cfg.name}")
    from actors.finetune_eval import Evaluator

    evaluator = Evaluator.remote(cfg.eval.threads)  # its process starts while the data is tokenized
    data = prepare_data(cfg, store, run_uri, files)
    spec = TaskSpec(kind=cfg.task, method=cfg.method, lora=cfg.lora, labels=data["labels"],
                    temperature=cfg.temperature, dropout=cfg.dropout)
    loop = loop_config(cfg, spec, base, data, pad_id)
    check_resumable(run_uri, loop.identity(), cfg.resources)

    before = evaluate(evaluator, cfg, base.uri, data["uris"]["val"], eos_id) if cfg.task != "classify" else {}
    if before:
        log.info("base model on the held-out set: %s", before)
    t = cfg.train
    log.info("finetuning %s (%s, %s) for %d steps of %d rows on %s workers, ZeRO stage %d; run folder %s",
             base.name, cfg.task, cfg.method, t.steps, t.micro_batch * t.grad_accum * cfg.resources.max_workers,
             cfg.resources.describe(), cfg.zero.stage, run_uri)
    tracking = tracking_targets(cfg.tracking, cfg.storage)
    result, records, seconds = fit(cfg.name, store, loop, [data["uris"]["train"]], cfg.resources, cfg.failure,
                                   f"{cfg.name}: {cfg.task} ({cfg.method})", tracking=tracking, params=to_dict(cfg))
    final = result.metrics or {}
    if result.checkpoint is None or final.get("step") != t.steps:
        raise JobFailed(f"the run in {run_uri} ended without a final checkpoint at step {t.steps}")
    after = evaluate(evaluator, cfg, f"{store.to_uri(result.checkpoint.path)}/{EXPORT_DIR}/model", data["uris"]["val"], eos_id)
    with result.checkpoint.as_directory() as folder:
        export = Path(folder) / EXPORT_DIR
        manifest = export_artifacts(cfg, store, base, data, export, files, records, final, seconds,
                                    before, after, run_uri)
    log_files(tracking, run_uri, cfg.name, to_dict(cfg), {"helio.json": json.dumps(manifest, indent=1).encode()})
    print(summary(cfg, manifest, data, run_uri))
    return manifest


def loop_config(cfg: FinetuneConfig, spec: TaskSpec, base: Artifact, data: dict[str, Any], pad_id: int) -> LoopConfig:
    t, w = cfg.train, cfg.resources.max_workers
    rows = t.micro_batch * t.grad_accum * w
    if data["rows"]["train"] < rows:
        raise ConfigError("train.micro_batch", f"a global batch of {rows} rows (micro_batch x grad_accum x "
                                               f"num_workers) exceeds the {data['rows']['train']} training rows")
    if data["rows"]["val"] < t.micro_batch * w:
        raise ConfigError("train.micro_batch", f"the {data['rows']['val']} held-out rows are fewer than one "
                                               f"evaluation batch of {t.micro_batch * w}")
    return LoopConfig(model=_arch_config(base), train=t, zero=cfg.zero, optim=cfg.optim, vocab_size=0,
                      block_len=cfg.data.max_len + 1, train_blocks=data["rows"]["train"],
                      val_files=(data["uris"]["val"],), pad_id=pad_id, fault=cfg.fault, task=spec,
                      base_uri=base.uri, base_name=base.name, max_workers=elastic_max(cfg.resources))


def _arch_config(base: Artifact):
    """The base's architecture, for the resume check (the weights themselves come from base_uri)."""
    from models.arch import ModelConfig

    hf, arch = json.loads(base.read_bytes("config.json")), artifact_arch(base)
    if arch == "gpt":
        return ModelConfig(arch="gpt", n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
    if arch == "llama":
        return ModelConfig(arch="llama", n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                           n_embd=hf["hidden_size"], n_kv_head=hf.get("num_key_value_heads") or 0)
    return ModelConfig(arch="encoder", n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                       n_embd=hf["hidden_size"])


def export_artifacts(cfg: FinetuneConfig, store: Storage, base: Artifact, data: dict[str, Any], export: Path,
                     tokenizer_files: dict[str, str], records: list[dict], final: dict, seconds: float,
                     before: dict, after: dict, run_uri: str) -> dict[str, Any]:
    """models/{name} (and adapters/{name} for LoRA), each recording base, task, method and metrics."""
    last_val = next((r for r in reversed(records) if "val_loss" in r), final)
    speeds = [r["tokens_per_s"] for r in records[1:]] or [final.get("tokens_per_s", 0.0)]
    metrics = {"before": before, "after": after, "val_loss": last_val.get("val_loss"), "steps": final["step"],
               "train_rows": data["rows"]["train"], "val_rows": data["rows"]["val"],
               "tokens_per_s": float(np.median(speeds)), "seconds": round(seconds, 2),
               "trainable_params": final.get("trainable_params"), "packing": data.get("packing"),
               "peak_memory_mb_per_worker": max((r.get("peak_memory_mb", 0.0) for r in records), default=None)}
    parents = [{"kind": "model", "name": base.name, "uri": base.uri, "created_at": base.manifest["created_at"]}]
    parents += [data["lineage"]] if data["lineage"] else []
    finetune = {"base": base.name, "task": cfg.task, "method": cfg.method, "labels": list(data["labels"]),
                "records_read": data["read"], "dropped": data["drops"], "run": run_uri}
    kinds = [("adapter", "adapter")] if cfg.method == "lora" else []
    for kind, sub in kinds + [("model", "model")]:
        with store.create(kind, cfg.name, to_dict(cfg), parents=parents) as out:
            for f in sorted((export / sub).iterdir()):
                out.write_bytes(f.name, f.read_bytes())
            for rel, text in tokenizer_files.items():  # the chat template and special tokens go along
                out.write_bytes(rel, text.encode())
            out.metrics = metrics
            out.extra["finetune"] = finetune
            out.extra["model"] = {"arch": _arch_config(base).arch, "hf_layout": kind == "model",
                                  "merged_lora": kind == "model" and cfg.method == "lora"}
    return store.open("model", cfg.name, verify=False).manifest


def summary(cfg: FinetuneConfig, manifest: dict[str, Any], data: dict[str, Any], run_uri: str) -> str:
    m = manifest["metrics"]
    rows = [("task / method", f"{cfg.task} / {cfg.method}"),
            ("base model", manifest["finetune"]["base"]),
            ("records read (train / val)", f"{data['read']['train']:,} / {data['read']['val']:,}"),
            ("rows kept (train / val)", f"{m['train_rows']:,} / {m['val_rows']:,}"),
            ("dropped", json.dumps(data["drops"]) if any(data["drops"].values()) else "none")]
    for key in sorted(m["after"]):
        b = m["before"].get(key)
        rows.append((f"held-out {key}", (f"{b:.4f} -> " if b is not None else "") + f"{m['after'][key]:.4f}"))
    rows += [("validation loss", f"{m['val_loss']:.4f}"), ("steps", str(m["steps"])),
             ("tokens/s (median, no padding)", f"{m['tokens_per_s']:,.0f}"),
             ("trainable parameters", f"{m['trainable_params']:,}"),
             ("peak memory per worker", f"{m['peak_memory_mb_per_worker']:,.0f} MiB"), ("time", f"{m['seconds']:.1f} s"),
             ("run folder", run_uri), ("model artifact", manifest["name"])]
    if cfg.method == "lora":
        rows.append(("adapter artifact (PEFT)", manifest["name"]))
    return format_summary("finetune summary", rows)


CONFIG_CLASS = FinetuneConfig  # what jobs/configs/finetune_*.yaml must load into


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.finetune", __doc__, FinetuneConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
