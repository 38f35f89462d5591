"""Quantize a trained model (int8, int4, w8a8, awq), measure what it cost, and gate it on a quality budget.

    python -m jobs.quantize jobs/configs/quantize_demo.yaml [--set method=awq --set name=... ...]

Reads the model artifact `model` under `storage` and writes the quantized
model artifact `models/{name}`: `model.safetensors` (integer weights, scales),
`quantization.json` (method, bits, group size, layers), `report.json` (sizes,
quality against the float model, latency), `config.json`, `tokenizer.json`.
Quantizing runs as a Ray task; the float and the quantized model are scored in
parallel Ray tasks on held-out data (GPT: perplexity on a dataset's
validation split; encoder: cosine to the float embeddings and retrieval MRR;
classifier: accuracy), then timed in one task. AWQ calibrates on a dataset's
validation blocks read with Ray Data (not the ones scored). If the quality
delta exceeds `max_quality_delta` the artifact is still written, marked
rejected (`actors.model_loader.open_runnable` refuses it unless forced), and
the job exits 1.

With `lm_eval.tasks_artifact` (causal LMs), lm-evaluation-harness also scores
both models in-process on Helio's offline tasks (actors/evaluate.py, through
Helio's own loader, so the integer kernels run): the report shows each task
metric float vs quantized side by side, and `lm_eval.gate` names one
("task/metric") that the gate also holds to `lm_eval.max_delta`.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cluster.cli import JobFailed, UserError, format_summary, run_job
from cluster.config import ConfigError, to_dict
from cluster.runtime import JobConfig, connect_job, embedded, scoped_attrs
from actors.chat import TOKENIZER_FILES
from actors.model_loader import artifact_arch, artifact_kind
from cluster.storage import Artifact, Storage, resolve
from actors.evaluate import TASKS
from models.quant import KERNELS, QuantSpec

log = logging.getLogger("helio")
COPIED = ("config.json", "tokenizer.json")  # and any other TOKENIZER_FILES the parent has


@dataclass(frozen=True)
class CalibrationConfig:
    dataset: str = ""  # awq: a dataset artifact whose val split calibrates; default: the model's lineage
    samples: int = 64  # sequences

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError("samples: must be positive")


@dataclass(frozen=True)
class EvalConfig:
    dataset: str = ""  # GPT perplexity / encoder cosine: a dataset artifact (val split); default: lineage
    rows: str = ""  # task models: tokenized held-out rows (jobs.finetune's runs/{name}/data/val.parquet); default: the finetune run's
    max_examples: int = 256  # held-out blocks or rows scored
    shards: int = 2  # scoring tasks per model, run in parallel
    seq_len: int = 128  # latency: tokens per sequence
    iters: int = 20  # latency: timed forwards per model and batch size (median)
    threads: int = 2  # latency: torch threads (and CPUs the timing task reserves)
    decode_tokens: int = 32  # GPT: greedy tokens generated for the decode speed

    def __post_init__(self) -> None:
        for name in ("max_examples", "shards", "seq_len", "iters", "threads", "decode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive")


@dataclass(frozen=True)
class LmEvalConfig:
    tasks_artifact: str = ""  # a jobs.make_tasks artifact: lm-eval scores float and quantized (empty: off)
    tasks: tuple[str, ...] = TASKS
    limit: int = 32  # documents per task
    seed: int = 0
    gate: str = ""  # a "task/metric" the quality gate also holds, e.g. helio_code_perplexity/byte_perplexity
    max_delta: float = 0.02  # its budget: the relative change for the worse

    def __post_init__(self) -> None:
        if not set(self.tasks) <= set(TASKS) or not self.tasks:
            raise ValueError(f"tasks: name some of {', '.join(TASKS)}")
        if self.limit < 1:
            raise ValueError("limit: must be positive")
        if self.gate and (self.gate.split("/")[0] not in self.tasks or "/" not in self.gate):
            raise ValueError(f"gate: {self.gate!r} is not task/metric of a task in lm_eval.tasks")
        if self.gate and not self.tasks_artifact:
            raise ValueError("gate: needs lm_eval.tasks_artifact (the documents it is measured on)")


@dataclass(frozen=True)
class QuantizeConfig(JobConfig):
    name: str = "quantize_demo"
    model: str = "pretrain_demo"  # the float model artifact to compress
    method: str = "int8"  # int8 | int4 | w8a8 | awq
    group_size: int = 128  # int4 / awq
    embeddings: bool = False  # also int8 the embedding tables (and an LM head tied to them)
    skip: tuple[str, ...] = ()  # regexes of Linear layer names kept in float
    kernel: str = "auto"  # auto (fbgemm int8 on CPU where available) | fbgemm | dequant
    max_quality_delta: float = 0.02  # relative: perplexity up, MRR / cosine / accuracy down
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)

    def __post_init__(self) -> None:
        self.spec  # validates method, group_size, skip
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel: must be one of {', '.join(KERNELS)}, not {self.kernel!r}")
        if not self.max_quality_delta >= 0:
            raise ValueError("max_quality_delta: must be zero or positive")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(method=self.method, group_size=self.group_size, embeddings=self.embeddings, skip=self.skip)


# ---- what the model is, and the data that measures it ----------------------------------------------

def lineage_dataset(store: Storage, art: Artifact, depth: int = 4) -> Artifact | None:
    """The nearest dataset artifact among the model's ancestors (a finetune's base's dataset, ...)."""
    for parent in art.manifest.get("parents", []):
        if parent.get("kind") == "dataset" and store.exists("dataset", parent["name"]):
            return store.open("dataset", parent["name"], verify=False)
    for parent in art.manifest.get("parents", []):
        if depth and parent.get("kind") == "model" and store.exists("model", parent["name"]):
            found = lineage_dataset(store, store.open("model", parent["name"], verify=False), depth - 1)
            if found:
                return found
    return None


def dataset_for(store: Storage, art: Artifact, name: str, key: str) -> Artifact:
    """The dataset named by config `key`, else the lineage's; its tokenizer must be the model's."""
    ds = store.open("dataset", name, verify=False) if name else lineage_dataset(store, art)
    if ds is None:
        raise ConfigError(key, f"model artifact '{art.name}' descends from no dataset artifact; name one")
    if ds.manifest["files"]["tokenizer.json"]["sha256"] != art.manifest["files"]["tokenizer.json"]["sha256"]:
        raise ConfigError(key, f"dataset '{ds.name}' was tokenized with another tokenizer than model "
                               f"'{art.name}'; its token ids would mean nothing to the model")
    return ds


def finetune_rows(art: Artifact, rows: str, split: str, key: str) -> str | None:
    """A task model's tokenized rows: config `rows` (val), else the finetune run's `data/{split}.parquet`."""
    uri = rows if rows and split == "val" else None
    run = art.manifest.get("finetune", {}).get("run")
    if uri is None and run:
        uri = f"{run}/data/{split}.parquet"
    if uri is None:
        return None
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ConfigError(key, f"'{uri}' does not exist (tokenized {split} rows of the finetune run)")
    return uri


def read_rows(uris: list[str], limit: int, columns: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The first `limit` rows of Parquet files, read with Ray Data, as {column: array}."""
    import ray.data

    from cluster.storage import columns as to_columns

    # files in the order given, rows in file order: the same sample on every run
    with scoped_attrs(ray.data.DataContext.get_current().execution_options, preserve_order=True):
        ds = ray.data.read_parquet(sorted(uris))
        ds = (ds.select_columns(list(columns)) if columns else ds).limit(limit)
        parts = [to_columns(b) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    if not parts:
        raise UserError(f"no rows in {', '.join(uris[:3])}")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def val_blocks(ds: Artifact, limit: int, skip: int = 0) -> np.ndarray:
    """Validation blocks `skip` to `skip + limit` of a dataset, in its file order."""
    blocks = read_rows([ds.file_uri(f) for f in ds.files("val/")], skip + limit, ("input_ids",))["input_ids"]
    return blocks[skip:]


def eval_data(cfg: QuantizeConfig, store: Storage, art: Artifact, kind: str) -> tuple[dict[str, np.ndarray], str]:
    """Held-out arrays for `score_shard` and a line saying where they came from."""
    n = cfg.eval.max_examples
    rows = finetune_rows(art, cfg.eval.rows, "val", "eval.rows") if kind != "lm" else None
    if kind == "classify":
        if rows is None:
            raise ConfigError("eval.rows", f"classifier '{art.name}' has no finetune run with held-out rows; "
                                           f"set eval.rows to tokenized rows (input_ids, length, label)")
        return read_rows([rows], n, ("input_ids", "length", "label")), rows
    if kind == "embed" and rows is not None:
        return read_rows([rows], n, ("query_ids", "query_len", "pos_ids", "pos_len")), rows
    ds = dataset_for(store, art, cfg.eval.dataset, "eval.dataset")
    return {"blocks": val_blocks(ds, n)}, f"dataset '{ds.name}' (val)"


def calibration_data(cfg: QuantizeConfig, store: Storage, art: Artifact, kind: str) -> tuple[list[np.ndarray], str]:
    """AWQ's calibration sequences, never the rows that are scored: validation blocks after the
    `eval.max_examples` the evaluation reads, or a finetuned model's training rows."""
    n = cfg.calibration.samples
    rows = None if cfg.calibration.dataset else finetune_rows(art, "", "train", "calibration.dataset")
    if rows is not None:
        cols = read_rows([rows], n)
        ids, lens = (cols["input_ids"], cols["length"]) if "input_ids" in cols else (cols["pos_ids"], cols["pos_len"])
        return [ids[i, :max(int(lens[i]), 1)] for i in range(len(ids))], rows
    ds = dataset_for(store, art, cfg.calibration.dataset, "calibration.dataset")
    skip = cfg.eval.max_examples
    blocks = val_blocks(ds, n, skip)
    if len(blocks) < n:
        raise ConfigError("calibration.samples", f"dataset '{ds.name}' has {skip + len(blocks)} validation blocks; "
                                                 f"after the {skip} that evaluation scores, {len(blocks)} are left "
                                                 f"for calibration, fewer than {n}")
    return list(blocks), f"dataset '{ds.name}' (val blocks {skip}-{skip + n - 1})"


# ---- measuring -------------------------------------------------------------------------------------

def score_parts(model_uri: str, kernel: str, data: dict[str, np.ndarray], shards: int) -> list:
    """Futures of one model's scores, one per shard of the held-out data."""
    from actors.quantize import score_shard

    n = len(next(iter(data.values())))
    bounds = np.linspace(0, n, min(shards, n) + 1).astype(int)
    return [score_shard.remote(model_uri, kernel, {k: v[a:b] for k, v in data.items()})
            for a, b in zip(bounds[:-1], bounds[1:])]


def drop(before: float, after: float) -> float:
    """The relative loss of a higher-is-better metric (0 when nothing was there to lose)."""
    return (before - after) / before if before > 0 else 0.0


def quality(kind: str, data: dict[str, np.ndarray], float_parts: list[dict], quant_parts: list[dict],
            labels: int) -> dict[str, Any]:
    """The float and quantized model's quality, and the relative delta the gate reads."""
    from models.task_heads import classification_metrics, retrieval_metrics
    import torch

    def cat(parts, key):
        return torch.from_numpy(np.concatenate([p[key] for p in parts]))

    if kind == "lm":
        ppl = [float(np.exp(sum(p["nll"] for p in ps) / sum(p["tokens"] for p in ps)))
               for ps in (float_parts, quant_parts)]
        return {"metric": "perplexity", "float": ppl[0], "quantized": ppl[1], "delta": ppl[1] / ppl[0] - 1}
    if kind == "classify":
        gold = torch.from_numpy(data["label"].astype(np.int64))
        f, q = (classification_metrics(cat(ps, "pred"), gold, labels) for ps in (float_parts, quant_parts))
        return {"metric": "accuracy", "float": f["accuracy"], "quantized": q["accuracy"],
                "delta": drop(f["accuracy"], q["accuracy"]), "macro_f1": {"float": f["macro_f1"],
                                                                                     "quantized": q["macro_f1"]}}
    keys = ("query", "pos") if "query" in float_parts[0] else ("emb",)
    cos = torch.cat([(cat(float_parts, k) * cat(quant_parts, k)).sum(-1) for k in keys])
    out: dict[str, Any] = {"cosine_to_float": {"mean": cos.mean().item(), "min": cos.min().item()}}
    if keys == ("emb",):
        return out | {"metric": "cosine", "float": 1.0, "quantized": cos.mean().item(), "delta": drop(1.0, cos.mean().item())}
    f, q = (retrieval_metrics(cat(ps, "query"), cat(ps, "pos")) for ps in (float_parts, quant_parts))
    return out | {"metric": "mrr", "float": f["mrr"], "quantized": q["mrr"], "delta": drop(f["mrr"], q["mrr"]),
                  "recall@1": {"float": f["recall@1"], "quantized": q["recall@1"]},
                  "recall@10": {"float": f["recall@10"], "quantized": q["recall@10"]}}


def fetch(refs):
    """ray.get, a failed task's cause as one sentence."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayError as e:  # a task raised, its worker died, its result was lost
        cause = getattr(e, "cause", None) or e
        raise JobFailed(f"a quantization task failed: {type(cause).__name__}: {cause}") from None


def run(cfg: QuantizeConfig) -> dict[str, Any]:
    """Quantizes, scores, times, gates and writes the artifact; returns its manifest."""
    from actors.quantize import quantize_remote, time_models
    from cluster.runtime import cluster_cpus

    store = Storage(cfg.storage)
    store.artifact_path("model", cfg.name)  # validates the name before any work
    if cfg.name == cfg.model:
        raise ConfigError("name", f"'{cfg.name}' is the float model's own name; the quantized model needs another")
    connect_job(cfg)
    if embedded(cfg) and cfg.eval.threads > cluster_cpus():
        raise ConfigError("eval.threads", f"the timing task would wait forever for {cfg.eval.threads} CPUs; "
                                          f"the embedded cluster has {cluster_cpus()}")
    parent = store.open("model", cfg.model)
    if "quantization" in parent.manifest:
        raise ConfigError("model", f"model artifact '{cfg.model}' is already quantized; quantize its float parent")
    if json.loads(parent.read_bytes("config.json")).get("model_type") in ("resnet", "vit"):
        from actors import quantize_images

        return quantize_images.run(cfg, store, parent)
    kind = artifact_kind(parent)
    if cfg.lm_eval.tasks_artifact and kind != "lm":
        raise ConfigError("lm_eval.tasks_artifact", f"lm-eval scores causal LMs; model '{parent.name}' is {kind}")
    data, data_source = eval_data(cfg, store, parent, kind)
    calibration, calibration_source = (calibration_data(cfg, store, parent, kind) if cfg.method == "awq"
                                       else (None, None))
    spec = cfg.spec
    parents = [{"kind": "model", "name": parent.name, "uri": parent.uri, "created_at": parent.manifest["created_at"]}]
    if cfg.lm_eval.tasks_artifact:  # the documents lm-eval scores it on
        t = store.open("task", cfg.lm_eval.tasks_artifact, verify=False)
        parents.append({"kind": "task", "name": t.name, "uri": t.uri, "created_at": t.manifest["created_at"]})
    writer = store.create("model", cfg.name, to_dict(cfg), parents=parents)
    try:
        log.info("quantizing model '%s' (%s) to %s on a Ray worker", parent.name, kind, cfg.method)
        done = fetch(quantize_remote.remote(parent.uri, to_dict(spec), cfg.kernel, calibration, writer.tmp_uri))
        writer.add_files(done["files"])
        for rel in COPIED + tuple(f for f in TOKENIZER_FILES if f not in COPIED and f in parent.manifest["files"]):
            writer.write_bytes(rel, parent.read_bytes(rel))  # the chat template and eos ids go along
        log.info("scoring the float and the quantized model on %s, %d tasks each", data_source, cfg.eval.shards)
        float_parts = score_parts(parent.uri, "auto", data, cfg.eval.shards)
        quant_parts = score_parts(writer.tmp_uri, cfg.kernel, data, cfg.eval.shards)
        lm_runs = lm_eval_runs(cfg, store, parent, writer.tmp_uri)
        labels = len(json.loads(parent.read_bytes("config.json")).get("id2label") or {})
        q = quality(kind, data, fetch(float_parts), fetch(quant_parts), labels)
        lm = None
        if lm_runs:
            prep, float_run, quant_run = lm_runs
            lm = lm_eval_report(cfg, prep, fetch(float_run), fetch(quant_run))
        log.info("timing both models in one task (%d threads)", cfg.eval.threads)
        e = cfg.eval
        timing = fetch(time_models.options(num_cpus=e.threads).remote(
            parent.uri, writer.tmp_uri, cfg.kernel, e.seq_len, e.iters, e.threads, e.decode_tokens))
        report = build_report(cfg, parent, kind, done, q, timing, data_source, calibration_source, lm)
        writer.write_bytes("report.json", json.dumps(report, indent=2).encode())
        passed = report["gate"]["passed"]
        writer.metrics = {"quality_metric": q["metric"], "quality_float": q["float"], "quality": q["quantized"],
                          "quality_delta": q["delta"], "size_ratio": report["size"]["file_ratio"],
                          "linear_size_ratio": report["size"]["linear_ratio"],
                          "latency_ratio_b1": report["latency"]["ratio_b1"],
                          "latency_ratio_b16": report["latency"]["ratio_b16"]}
        if lm:  # the quantized model's scores; which tasks, documents, lm-eval and seed made them
            writer.metrics.update({f"lm_eval/{k}": m["quantized"] for k, m in lm["metrics"].items()})
            writer.extra["lm_eval"] = {k: lm[k] for k in ("tasks_artifact", "lm_eval", "seed", "documents")}
        writer.extra["quantization"] = {k: v for k, v in done["description"].items() if k != "layers"}
        writer.extra["quality_gate"] = report["gate"]
        writer.extra["rejected"] = not passed
        writer.extra["model"] = {"arch": artifact_arch(parent), "kind": kind, "quantized": True}
        manifest = writer.commit().manifest
    except BaseException:
        writer.abort()
        raise
    print(render(report, cfg.name))
    if not passed:
        raise JobFailed(f"{report['gate']['reason']}; the artifact '{cfg.name}' is written but marked rejected "
                        f"(serving refuses it unless forced)")
    return manifest


def lm_eval_runs(cfg: QuantizeConfig, store: Storage, parent: Artifact, quantized_uri: str) -> tuple:
    """Starts lm-eval on the float and the quantized model (two Ray tasks, Helio's loader): (the
    prepared documents, float ref, quantized ref), or () when lm_eval is off."""
    from actors.evaluate import prepare, score

    c = cfg.lm_eval
    if not c.tasks_artifact:
        return ()
    try:
        prep = prepare(parent, store.open("task", c.tasks_artifact), c.tasks, c.limit, c.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    log.info("lm-eval: scoring the float and the quantized model on %s (%s documents)", ", ".join(c.tasks),
             ", ".join(map(str, prep.documents.values())))
    return (prep,) + tuple(score.remote("helio", uri, prep.tokenizer, prep.tasks, list(c.tasks), c.seed, 8)
                           for uri in (parent.uri, quantized_uri))


def lm_eval_report(cfg: QuantizeConfig, prep: Any, float_run: dict, quant_run: dict) -> dict[str, Any]:
    """Each task metric float vs quantized, its relative change for the worse, and the named gate's."""
    from actors.evaluate import scores

    f, q = scores(float_run["results"]), scores(quant_run["results"])
    better = {f"{t}/{m}": up for t, ms in float_run["higher_is_better"].items() for m, up in ms.items()}
    metrics = {k: {"float": f[k], "quantized": q[k],
                   "worse_by": drop(f[k], q[k]) if better.get(k, True) else (q[k] / f[k] - 1 if f[k] else 0.0)}
               for k in f if k in q}
    c = cfg.lm_eval
    if c.gate and c.gate not in metrics:
        raise ConfigError("lm_eval.gate", f"lm-eval reported no {c.gate}; it reported {', '.join(sorted(metrics))}")
    return {"tasks_artifact": c.tasks_artifact, "lm_eval": float_run["lm_eval"], "seed": c.seed,
            "documents": prep.documents, "left_out": prep.left_out, "metrics": metrics,
            "gate": {"metric": c.gate, "max_delta": c.max_delta} if c.gate else None}


def build_report(cfg: QuantizeConfig, parent: Artifact, kind: str, done: dict, q: dict, timing: dict,
                 data_source: str, calibration_source: str | None, lm: dict | None = None) -> dict[str, Any]:
    float_bytes = parent.manifest["files"]["model.safetensors"]["bytes"]
    quant_bytes = done["files"]["model.safetensors"]["bytes"]
    lb = done["layer_bytes"]
    f, qt = timing["float"], timing["quantized"]
    latency = {"threads": timing["threads"], "seq_len": timing["seq_len"], "float": f, "quantized": qt,
               "ratio_b1": qt["latency_ms_b1"] / f["latency_ms_b1"], "ratio_b16": qt["latency_ms_b16"] / f["latency_ms_b16"]}
    if "decode_tokens_per_s" in f:
        latency["decode_speedup"] = qt["decode_tokens_per_s"] / f["decode_tokens_per_s"]
    passed = q["delta"] <= cfg.max_quality_delta
    gate = {"max_quality_delta": cfg.max_quality_delta, "quality_delta": q["delta"], "passed": passed,
            "reason": (f"{q['metric']} moved by {q['delta']:+.2%} (float {q['float']:.4f}, quantized "
                       f"{q['quantized']:.4f}), over the budget of {cfg.max_quality_delta:.2%}") if not passed else ""}
    if lm and lm["gate"]:
        name, m = lm["gate"]["metric"], lm["metrics"][lm["gate"]["metric"]]
        ok = m["worse_by"] <= lm["gate"]["max_delta"]
        gate["lm_eval"] = {"metric": name, "worse_by": m["worse_by"], "max_delta": lm["gate"]["max_delta"], "passed": ok}
        if not ok:
            why = (f"lm-eval {name} got worse by {m['worse_by']:+.2%} (float {m['float']:.4f}, quantized "
                   f"{m['quantized']:.4f}), over the budget of {lm['gate']['max_delta']:.2%}")
            gate["reason"] = f"{gate['reason']}; {why}" if gate["reason"] else why
        gate["passed"] = passed = passed and ok
    kernels = timing["kernels"]
    notes = []
    if "dequant" in kernels:
        notes.append(f"{kernels['dequant']} layer(s) have no integer kernel on this device: their weights are stored "
                     f"compressed and dequantized to float once at load")
    if "fbgemm" in kernels:
        notes.append(f"{kernels['fbgemm']} layer(s) run on fbgemm's int8 GEMM, activations quantized per "
                     f"{'token' if cfg.method == 'w8a8' else 'tensor'} at run time (kernel: dequant runs int8 as "
                     f"exact weight-only, at float speed)")
    return {"model": parent.name, "kind": kind, "method": cfg.method, "kernels": kernels, "kernel_notes": notes,
            "quantization": {k: v for k, v in done["description"].items() if k != "layers"},
            "layers_quantized": len(done["description"]["layers"]),
            "size": {"float_file_bytes": float_bytes, "quantized_file_bytes": quant_bytes,
                     "file_ratio": quant_bytes / float_bytes, "linear_float_bytes": lb["float"],
                     "linear_quantized_bytes": lb["quantized"], "linear_ratio": lb["quantized"] / lb["float"]},
            "quality": q | {"data": data_source}, "latency": latency, "gate": gate,
            "calibration": calibration_source, "quantize_seconds": round(done["seconds"], 2), "lm_eval": lm}


def render(report: dict[str, Any], name: str) -> str:
    """The report as the table the job prints."""
    s, q, lat = report["size"], report["quality"], report["latency"]
    f, qt = lat["float"], lat["quantized"]
    table = [f"{'':26} {'float':>12} {report['method']:>12} {'ratio':>8}",
             f"{'model file (bytes)':26} {s['float_file_bytes']:12,} {s['quantized_file_bytes']:12,} {s['file_ratio']:8.3f}",
             f"{'quantized layers (bytes)':26} {s['linear_float_bytes']:12,} {s['linear_quantized_bytes']:12,} "
             f"{s['linear_ratio']:8.3f}",
             f"{q['metric']:26} {q['float']:12.4f} {q['quantized']:12.4f} {q['quantized'] / max(q['float'], 1e-9):8.3f}"]
    if "cosine_to_float" in q and q["metric"] != "cosine":
        table.append(f"{'cosine to float (mean)':26} {1.0:12.4f} {q['cosine_to_float']['mean']:12.4f}")
    for b in (1, 16):
        table.append(f"{f'latency batch {b} (ms)':26} {f[f'latency_ms_b{b}']:12.2f} {qt[f'latency_ms_b{b}']:12.2f} "
                     f"{lat[f'ratio_b{b}']:8.3f}")
    if "decode_speedup" in lat:
        table.append(f"{'decode (tokens/s)':26} {f['decode_tokens_per_s']:12.1f} {qt['decode_tokens_per_s']:12.1f} "
                     f"{lat['decode_speedup']:8.3f}")
    gate = report["gate"]
    rows = [("model", f"{report['model']} ({report['kind']}) -> {name}"),
            ("method", f"{report['method']}, {report['layers_quantized']} layers; kernels {report['kernels']}"),
            ("quality data", q["data"]),
            ("latency", f"{lat['threads']} threads, {lat['seq_len']} tokens per sequence, median"),
            ("quality gate", f"{'passed' if gate['passed'] else 'REJECTED'}: {q['metric']} delta {gate['quality_delta']:+.2%} "
                             f"(budget {gate['max_quality_delta']:.2%})")]
    if gate.get("lm_eval"):
        g = gate["lm_eval"]
        rows.append(("lm-eval gate", f"{'passed' if g['passed'] else 'REJECTED'}: {g['metric']} worse by "
                                     f"{g['worse_by']:+.2%} (budget {g['max_delta']:.2%})"))
    rows += [("note", n) for n in report["kernel_notes"]]
    if report.get("lm_eval"):
        lm = report["lm_eval"]
        table.append(f"lm-eval {lm['lm_eval']} on {lm['tasks_artifact']} "
                     f"({', '.join(f'{t} {n}' for t, n in lm['documents'].items())} documents):")
        for name, m in lm["metrics"].items():
            table.append(f"  {name:42} {m['float']:12.4f} {m['quantized']:12.4f}  worse by {m['worse_by']:+.2%}")
    return format_summary("quantize report", rows) + "\n\n" + "\n".join(table)


CONFIG_CLASS = QuantizeConfig  # what jobs/configs/quantize_*.yaml must load into


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.quantize", __doc__, QuantizeConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
