"""Score a model on standard-format tasks with lm-evaluation-harness, in-process and as it is served.

    python -m jobs.evaluate jobs/configs/evaluate_demo.yaml [--set model=... --set served.url=...]

Helio's three offline tasks (actors/evaluate.py; ordinary lm-eval task YAML in actors/eval_tasks/)
get their documents from the held-out functions of the tasks artifact `tasks_artifact`, the same ones
for a given seed. The model artifact `model` is scored by lm-eval (pinned), each way in a Ray task:

  in_process: hf     lm-eval's Hugging Face backend (HFLM) on the artifact's folder (float weights);
  in_process: helio  lm-eval's evaluator over Helio's own model loader (actors/evaluate.py HelioLM):
                     float or quantized (integer weights, the kernels serving uses);
  in_process: auto   hf for a float artifact, helio for a quantized one; none: not in-process;
  served.url         lm-eval's `local-completions` client against Helio's HTTP API, model `served.model`
                     (the API key from the environment variable `served.api_key_env`), so a served
                     int8 model is scored exactly as clients reach it.

With both, every metric's in-process and served values are compared: they agree when they differ by
less than twice their combined standard error (or 1e-3 relative, for metrics lm-eval gives none).

Writes the evaluation artifact `evaluations/{name}`: results.json (lm-eval's results per backend,
the agreement), tasks/ (the YAMLs and documents: rerun by hand with `lm_eval --include_path`), and
in its manifest the lineage (model, tasks artifact, lm-eval version, seed, documents left out by
reason) and the scores as metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from actors.evaluate import TASKS, prepare, scores
from cluster.cli import UserError, format_summary, run_job
from cluster.config import ConfigError, to_dict
from cluster.runtime import JobConfig, connect_job
from cluster.storage import Storage
from models.quant import QUANT_CONFIG

log = logging.getLogger("helio")
IN_PROCESS = ("auto", "hf", "helio", "none")


@dataclass(frozen=True)
class ServedConfig:
    url: str = ""  # Helio's HTTP API, e.g. http://127.0.0.1:8000 (empty: not scored as served)
    model: str = ""  # the served model's id
    api_key_env: str = "HELIO_API_KEY"  # the environment variable holding the API key (keys stay out of configs)

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url: {self.url!r} is not an http:// or https:// URL")
        if self.url and not self.model:
            raise ValueError("model: name the served model id to score at served.url")


@dataclass(frozen=True)
class EvaluateConfig(JobConfig):
    name: str = "evaluate_demo"
    model: str = "finetune_sft_demo"  # the model artifact scored (and whose tokenizer the served one uses)
    tasks_artifact: str = "stdlib_tasks"  # a jobs.make_tasks artifact: its sft/val.jsonl holds the documents
    tasks: tuple[str, ...] = TASKS
    in_process: str = "auto"  # auto | hf (lm-eval's HF backend) | helio (Helio's loader, quantized too) | none
    served: ServedConfig = field(default_factory=ServedConfig)
    limit: int = 64  # documents per task
    seed: int = 0  # which documents, and lm-eval's seeds
    batch_size: int = 8
    num_cpus: float = 1  # each scoring Ray task's

    def __post_init__(self) -> None:
        if self.limit < 1 or self.batch_size < 1:
            raise ValueError("limit and batch_size: must be positive")
        if not self.tasks:
            raise ValueError(f"tasks: name at least one of {', '.join(TASKS)}")
        if not set(self.tasks) <= set(TASKS):
            raise ValueError(f"tasks: {', '.join(sorted(set(self.tasks) - set(TASKS)))} unknown; Helio's are "
                             f"{', '.join(TASKS)}")
        if self.in_process not in IN_PROCESS:
            raise ValueError(f"in_process: {self.in_process!r} is not one of {', '.join(IN_PROCESS)}")
        if self.in_process == "none" and not self.served.url:
            raise ValueError("in_process: none and no served.url: nothing would be scored")


def served_context(served: ServedConfig, api_key: str) -> int:
    """The context the server gives `served.model` (GET /v1/models), which may be less than the
    model's own; one sentence if the server cannot be reached or does not serve it."""
    import urllib.error
    import urllib.request

    url = f"{served.url.rstrip('/')}/v1/models"
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            models = {m["id"]: m for m in json.loads(r.read())["data"]}
    except urllib.error.HTTPError as e:
        hint = f" (set {served.api_key_env})" if e.code == 401 else ""
        raise UserError(f"served.url: {url} answered {e.code}{hint}") from None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"served.url: cannot list the models at {url}: {e}") from None
    if served.model not in models:
        raise UserError(f"served.model: '{served.model}' is not served at {served.url} (it serves "
                        f"{', '.join(sorted(models)) or 'nothing'})")
    if models[served.model].get("task", "generate") != "generate":
        raise UserError(f"served.model: '{served.model}' serves {models[served.model]['task']}, not generation")
    return int(models[served.model].get("context") or 1 << 30)


def agreement(a: dict, b: dict) -> dict[str, dict]:
    """Per task and metric of two lm-eval result dicts: both values, the difference, the bound and
    whether they agree (|a - b| <= 2 x combined standard error, or 1e-3 relative without one)."""
    out = {}
    for task, metrics in a.items():
        for key, va in metrics.items():
            if not key.endswith(",none") or "_stderr" in key or not isinstance(va, int | float):
                continue
            vb = b.get(task, {}).get(key)
            if not isinstance(vb, int | float):
                continue
            metric = key.split(",")[0]
            sa, sb = (r.get(task, {}).get(f"{metric}_stderr,none") for r in (a, b))
            if isinstance(sa, int | float) and isinstance(sb, int | float) and (sa or sb):
                bound, kind = 2 * math.hypot(sa, sb), "2 x stderr"
            else:
                bound, kind = 1e-3 * max(abs(va), abs(vb), 1e-12), "1e-3 relative"
            va, vb, bound = float(va), float(vb), float(bound)  # lm-eval's may be numpy scalars
            out[f"{task}/{metric}"] = {"in_process": va, "served": vb, "difference": abs(va - vb), "bound": bound,
                                       "bound_kind": kind, "agree": bool(abs(va - vb) <= bound)}
    return out


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    import ray

    from actors.evaluate import score

    store = Storage(cfg.storage)
    store.artifact_path("evaluation", cfg.name)  # validates the name before any work
    model, tasks = store.open("model", cfg.model), store.open("task", cfg.tasks_artifact)
    quantized = QUANT_CONFIG in model.manifest["files"]
    in_process = ("helio" if quantized else "hf") if cfg.in_process == "auto" else cfg.in_process
    if in_process == "hf" and quantized:
        raise ConfigError("in_process", f"model artifact '{cfg.model}' is quantized: lm-eval's Hugging Face backend "
                                        f"loads float weights; use in_process: helio (or auto)")
    api_key = os.environ.get(cfg.served.api_key_env, "") if cfg.served.url else ""
    try:
        prep = prepare(model, tasks, cfg.tasks, cfg.limit, cfg.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    parents = [{"kind": k, "name": a.name, "uri": a.uri, "created_at": a.manifest["created_at"]}
               for k, a in (("model", model), ("task", tasks))]
    writer = store.create("evaluation", cfg.name, to_dict(cfg), parents=parents)
    try:
        for rel, data in prep.tasks.items():
            writer.write_bytes(f"tasks/{rel}", data)
        connect_job(cfg)
        runs, backends = {}, {}
        if in_process != "none":
            runs["in_process"], backends["in_process"] = score.options(num_cpus=cfg.num_cpus).remote(
                in_process, model.uri, prep.tokenizer, prep.tasks, list(cfg.tasks), cfg.seed, cfg.batch_size), in_process
        if cfg.served.url:
            # lm-eval sends prompt + continuation as one request with echo and max_tokens 1: one token to spare
            endpoint = {"url": cfg.served.url.rstrip("/"), "model": cfg.served.model, "api_key": api_key,
                        "max_length": min(prep.context, served_context(cfg.served, api_key)) - 1}
            runs["served"] = score.options(num_cpus=cfg.num_cpus).remote(
                "local-completions", None, prep.tokenizer, prep.tasks, list(cfg.tasks), cfg.seed, cfg.batch_size, endpoint)
            backends["served"] = "local-completions"
        log.info("scoring model '%s' on %s (%s) with lm-eval", cfg.model, ", ".join(cfg.tasks),
                 ", ".join(f"{k}: {v}" for k, v in backends.items()))
        try:
            got = dict(zip(runs, ray.get(list(runs.values()))))
        except ray.exceptions.RayTaskError as e:
            raise UserError(f"lm-eval failed: {str(e.cause if e.cause else e).strip().splitlines()[-1][:400]}") \
                from None
        report = {"model": cfg.model, "tasks": list(cfg.tasks), "seed": cfg.seed, "limit": cfg.limit,
                  "documents": prep.documents, "left_out": prep.left_out,
                  "lm_eval": next(iter(got.values()))["lm_eval"],
                  "backends": backends, "results": {k: v["results"] for k, v in got.items()},
                  "higher_is_better": next(iter(got.values()))["higher_is_better"]}
        if len(got) == 2:
            report["agreement"] = agreement(got["in_process"]["results"], got["served"]["results"])
        writer.write_bytes("results.json", json.dumps(report, indent=2).encode())
        writer.metrics = {f"{k}/{m}": v for k, r in got.items() for m, v in scores(r["results"]).items()}
        writer.extra["evaluation"] = {k: report[k] for k in ("model", "tasks", "seed", "limit", "documents",
                                                               "left_out", "lm_eval", "backends")}
        if "agreement" in report:
            writer.extra["evaluation"]["agree"] = all(a["agree"] for a in report["agreement"].values())
        manifest = writer.commit().manifest
    except BaseException:
        writer.abort()
        raise
    print(render(report, store.to_uri(store.artifact_path("evaluation", cfg.name))))
    return manifest


def render(report: dict, uri: str) -> str:
    rows = [("model", report["model"]), ("lm-eval", report["lm_eval"]),
            ("documents", ", ".join(f"{t} {n}" for t, n in report["documents"].items()))]
    backends = list(report["results"])
    for task in report["tasks"]:
        for metric in sorted({m for b in backends for m in scores({task: report["results"][b].get(task, {})})}):
            values = [f"{b} {scores({task: report['results'][b].get(task, {})}).get(metric, float('nan')):.4g}"
                      for b in backends]
            agree = report.get("agreement", {}).get(metric)
            rows.append((metric, ", ".join(values) + (f" ({'agree' if agree['agree'] else 'DISAGREE'}: "
                                                      f"|d| {agree['difference']:.2g} <= {agree['bound']:.2g})"
                                                      if agree else "")))
    rows.append(("evaluation artifact", uri))
    return format_summary("evaluation summary", rows)


CONFIG_CLASS = EvaluateConfig  # what jobs/configs/evaluate_*.yaml must load into


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.evaluate", __doc__, EvaluateConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
