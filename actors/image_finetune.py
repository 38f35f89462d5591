"""jobs.finetune's image branch (`task: image_classify`): a vision checkpoint (jobs.pretrain on an image
dataset) finetuned for an image dataset's labels on the same Ray Train + DeepSpeed loop, then scored on
the dataset's test split with the classification report (actors/image_report.py).

With `compare_scratch`, the same architecture is also trained from random weights on the same data for
the same steps: the transfer table (pretrained vs from scratch) goes into the manifest, so what
pretraining bought is measured, not claimed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from actors.image_report import accuracy_and_f1, classification_report, confusion_png, predict_split
from actors.train_driver import fit
from actors.train_loop import EXPORT_DIR, ImageSpec, LoopConfig
from actors.train_tracking import log_files, tracking_targets
from cluster.cli import JobFailed, format_summary
from cluster.config import ConfigError, to_dict
from cluster.storage import Artifact, Storage
from cluster.train_run import check_resumable, elastic_max
from models.arch import ModelConfig
from models.finetune import TaskSpec

log = logging.getLogger("helio")


def vision_arch(base: Artifact) -> ModelConfig:
    """The base's architecture as a ModelConfig (the resume check's record of what is trained)."""
    hf = json.loads(base.read_bytes("config.json"))
    if hf.get("model_type") == "resnet":
        return ModelConfig(arch="resnet", widths=tuple(hf["hidden_sizes"]), depths=tuple(hf["depths"]),
                           bottleneck=hf.get("layer_type") == "bottleneck", stem_width=hf["embedding_size"])
    if hf.get("model_type") == "vit":
        return ModelConfig(arch="vit", n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                           n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                           patch_size=hf["patch_size"])
    raise ConfigError("base.artifact", f"task image_classify needs a vision base (resnet or vit); model artifact "
                                       f"'{base.name}' is a {hf.get('model_type')}")


def open_images(store: Storage, name: str) -> tuple[Artifact, dict[str, Any]]:
    art = store.open("dataset", name, verify=False)
    if "images" not in art.manifest:
        raise ConfigError("data.images", f"dataset '{name}' holds no images: make one with jobs.prepare_images")
    return art, art.manifest["images"]


def run(cfg: Any, store: Storage) -> dict[str, Any]:
    """Finetunes (and, with compare_scratch, trains from scratch), scores both on the test split, writes the
    model artifact (and the adapter for LoRA) with the report; returns the model's manifest."""
    import ray

    if not cfg.base.artifact:
        raise ConfigError("base.artifact", "task image_classify starts from a vision model artifact (jobs.pretrain "
                                           "on an image dataset); base.hf_folder imports text models only")
    base = store.open("model", cfg.base.artifact, verify=False)
    arch = vision_arch(base)
    data, images = open_images(store, cfg.data.images)
    hf = json.loads(base.read_bytes("config.json"))
    if hf.get("num_channels", 3) != images["channels"] or (arch.arch == "vit" and hf["image_size"] != images["size"]):
        raise ConfigError("data.images", f"dataset '{data.name}' holds {images['size']}x{images['size']}x"
                                         f"{images['channels']} images; base '{base.name}' takes "
                                         f"{hf.get('image_size', 'any')} pixels a side, {hf.get('num_channels', 3)} "
                                         f"channel(s)")
    t, w = cfg.train, cfg.resources.max_workers
    splits = images["splits"]
    if splits["train"]["images"] < t.micro_batch * t.grad_accum * w:
        raise ConfigError("train.micro_batch", f"a global batch of {t.micro_batch * t.grad_accum * w} images "
                                               f"exceeds the dataset's {splits['train']['images']} training images")
    if splits["val"]["images"] < t.micro_batch * w or not splits["test"]["images"]:
        raise ConfigError("data.images", f"dataset '{data.name}' has {splits['val']['images']} validation and "
                                         f"{splits['test']['images']} test images: it needs one evaluation batch of "
                                         f"{t.micro_batch * w} and a test split")
    labels = tuple(images["classes"])
    spec = TaskSpec(kind="image_classify", method=cfg.method, lora=cfg.lora, labels=labels)
    image_spec = ImageSpec(size=images["size"], channels=images["channels"], labels=labels, augment=cfg.augment)

    def loop(scratch: bool) -> LoopConfig:
        return LoopConfig(model=arch, train=t, zero=cfg.zero, optim=cfg.optim, vocab_size=0, block_len=0,
                          train_blocks=splits["train"]["images"],
                          val_files=tuple(data.file_uri(f) for f in splits["val"]["shards"]), fault=cfg.fault,
                          task=TaskSpec(**{**spec.__dict__, "scratch": scratch}), base_uri=base.uri,
                          base_name=base.name, images=image_spec, max_workers=elastic_max(cfg.resources))

    runs = {"pretrained": cfg.name} | ({"scratch": f"{cfg.name}-scratch"} if cfg.compare_scratch else {})
    for kind, name in runs.items():
        check_resumable(store.to_uri(f"{store.root_path}/runs/{name}"), loop(kind == "scratch").identity(), cfg.resources)
    train_uris = [data.file_uri(f) for f in splits["train"]["shards"]]
    test_uris = [data.file_uri(f) for f in splits["test"]["shards"]]
    tracking = tracking_targets(cfg.tracking, cfg.storage)
    results: dict[str, Any] = {}
    for kind, name in runs.items():
        log.info("finetuning %s for %s (%s, %s%s) for %d steps of %d images on %s workers", base.name, data.name,
                 cfg.method, arch.arch, ", from scratch" if kind == "scratch" else "", t.steps,
                 t.micro_batch * t.grad_accum * w, cfg.resources.describe())
        result, records, seconds = fit(name, store, loop(kind == "scratch"), train_uris, cfg.resources, cfg.failure,
                                       f"{name}: image_classify ({cfg.method})", columns=["pixels", "label"],
                                       tracking=tracking, params=to_dict(cfg))
        final = result.metrics or {}
        if result.checkpoint is None or final.get("step") != t.steps:
            raise JobFailed(f"the run {name} ended without a final checkpoint at step {t.steps}")
        model_uri = f"{store.to_uri(result.checkpoint.path)}/{EXPORT_DIR}/model"
        results[kind] = {"result": result, "records": records, "seconds": seconds,
                         "test": predict_split.remote(model_uri, test_uris)}
    for r in results.values():
        r["test"] = ray.get(r["test"])
    report, text = classification_report(results["pretrained"]["test"]["labels"],
                                         results["pretrained"]["test"]["predicted"], list(labels))
    png = confusion_png(results["pretrained"]["test"]["labels"], results["pretrained"]["test"]["predicted"],
                        list(labels), f"{cfg.name} on {data.name} (test split)")
    manifest = export(cfg, store, base, data, results, report, text, png)
    log_files(tracking, store.to_uri(f"{store.root_path}/runs/{cfg.name}"), cfg.name, to_dict(cfg),
              {"helio.json": json.dumps(manifest, indent=1).encode()})
    print(f"\nclassification report of {cfg.name} on the test split of {data.name}:\n{text}")
    print(summary(cfg, manifest))
    return manifest


def export(cfg: Any, store: Storage, base: Artifact, data: Artifact, results: dict[str, Any], report: dict,
           text: str, png: bytes) -> dict[str, Any]:
    """models/{name} (and adapters/{name} for LoRA) with the report files and the transfer table."""
    main = results["pretrained"]
    records, final = main["records"], main["result"].metrics
    last_val = next((r for r in reversed(records) if "val_loss" in r), final)
    classes = len(data.manifest["images"]["classes"])
    transfer = {kind: accuracy_and_f1(r["test"]["labels"], r["test"]["predicted"], classes)
                for kind, r in results.items()}
    metrics = {"test": transfer["pretrained"], "transfer": transfer if cfg.compare_scratch else None,
               "val_loss": last_val.get("val_loss"), "val_accuracy": last_val.get("val_accuracy"),
               "steps": final["step"], "train_images": data.manifest["images"]["splits"]["train"]["images"],
               "test_images": len(main["test"]["labels"]), "seconds": round(main["seconds"], 2),
               "images_per_s": float(np.median([r["tokens_per_s"] for r in records[1:]] or [final["tokens_per_s"]])),
               "trainable_params": final.get("trainable_params")}
    parents = [{"kind": "model", "name": base.name, "uri": base.uri, "created_at": base.manifest["created_at"]},
               {"kind": "dataset", "name": data.name, "uri": data.uri, "created_at": data.manifest["created_at"]}]
    kinds = [("adapter", "adapter")] if cfg.method == "lora" else []
    with main["result"].checkpoint.as_directory() as folder:
        exported = Path(folder) / EXPORT_DIR
        for kind, sub in kinds + [("model", "model")]:
            with store.create(kind, cfg.name, to_dict(cfg), parents=parents) as out:
                for f in sorted((exported / sub).iterdir()):
                    out.write_bytes(f.name, f.read_bytes())
                out.write_bytes("report.json", json.dumps(report, indent=1).encode())
                out.write_bytes("report.txt", text.encode())
                out.write_bytes("confusion.png", png)
                out.metrics = metrics
                out.extra["finetune"] = {"base": base.name, "task": "image_classify", "method": cfg.method,
                                         "dataset": data.name, "labels": data.manifest["images"]["classes"],
                                         "run": store.to_uri(f"{store.root_path}/runs/{cfg.name}")}
                out.extra["model"] = {"arch": vision_arch(base).arch, "hf_layout": kind == "model",
                                      "merged_lora": kind == "model" and cfg.method == "lora",
                                      "image_size": data.manifest["images"]["size"],
                                      "channels": data.manifest["images"]["channels"]}
    return store.open("model", cfg.name, verify=False).manifest


def summary(cfg: Any, manifest: dict[str, Any]) -> str:
    m = manifest["metrics"]
    rows = [("task / method", f"image_classify / {cfg.method}"), ("base model", manifest["finetune"]["base"]),
            ("dataset (train / test images)", f"{manifest['finetune']['dataset']} ({m['train_images']:,} / "
                                              f"{m['test_images']:,})"),
            ("test accuracy / macro F1", f"{m['test']['accuracy']:.4f} / {m['test']['macro_f1']:.4f}")]
    if m["transfer"]:
        s = m["transfer"]["scratch"]
        rows.append(("from scratch, same steps and data", f"{s['accuracy']:.4f} / {s['macro_f1']:.4f}"))
    rows += [("steps", str(m["steps"])), ("images/s (median)", f"{m['images_per_s']:,.0f}"),
             ("trainable parameters", f"{m['trainable_params']:,}"), ("time", f"{m['seconds']:.1f} s"),
             ("model artifact", manifest["name"])]
    return format_summary("finetune summary", rows)
