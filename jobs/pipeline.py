"""Raw text to a served, watched model in one run: prepare -> pretrain -> make_tasks -> finetune ->
quantize -> serve -> evaluate -> monitor.

    python -m jobs.pipeline jobs/configs/demo.yaml [--set pretrain.train.steps=50 ...]
    ray job submit --working-dir . -- python -m jobs.pipeline jobs/configs/demo.yaml --set storage=/shared/runs

Each stage section has the schema of that stage's own job; `config: FILE` in a section starts it
from that stage YAML and the section's own keys override it. `storage`, `ray_address` and
`local_cpus` are set once, at the top, for every stage. A stage reads what the stage before it
wrote, by artifact name: pretrain the dataset prepare made, a finetune the model pretrain made
(unless it imports a Hugging Face folder) and the tasks make_tasks made, quantize the first
finetune of the pretrained model (else the pretrained model), serve the artifacts its `models`
name, each evaluate section (label -> a jobs.evaluate config) the model it names (default: the
first finetune) on the tasks make_tasks made, and the same model as the serve stage serves it (its
URL and id) when it does; the monitor the served application. An input that a section names itself must be made by
an earlier stage or already be in storage; that is checked before any work starts.

A stage is skipped, with a line saying so, when what it made is still there and was made from the
same configuration and the same parents: a hash of both, kept with the artifact's digest in
`{storage}/pipelines/{name}.json` after every stage that succeeds. A failed run, run again,
continues at the stage that failed (pretrain and finetune also resume from their last
checkpoint). The run ends with the lineage: dataset -> checkpoint -> pretrained model -> finetuned
model -> quantized model -> served version, with each one's key metrics.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from actors.serve_app import app_url
from cluster.cli import USER_ERRORS, JobFailed, UserError, format_summary, run_job
from cluster.config import ConfigError, to_dict
from cluster.pipeline_config import RUNTIME_KEYS, PipelineSections, build, default, section, value_at
from cluster.runtime import connect_job, embedded
from cluster.sources import SourceConfig, expand_sources
from cluster.storage import Storage

log = logging.getLogger("helio")
# Per-stage keys that say how long to linger, not what to make.
TRANSIENT_KEYS = RUNTIME_KEYS + ("serve_seconds", "monitor_seconds", "restart", "tracking")  # tracking: where runs are logged


@dataclass(frozen=True)
class PipelineConfig(PipelineSections):
    """The pipeline's keys (cluster/pipeline_config.py), every stage section checked on loading."""

    def __post_init__(self) -> None:
        super().__post_init__()
        plan(self)  # every section validated against its job's schema, with the dotted key in errors


# ---- the plan: stage configs, wired together --------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    label: str  # prepare, pretrain, make_tasks, finetune.<label>, quantize, serve, evaluate.<label>, monitor
    job: str  # the module under jobs/
    config: Any  # that job's config dataclass
    kind: str | None  # the artifact kind it writes; None for serve (an application) and monitor (an actor)
    name: str  # what it makes: the artifact's name, or the application's
    inputs: tuple[tuple[str, str], ...] = ()  # (kind, name) of the artifacts it reads


def plan(cfg: PipelineConfig) -> list[Stage]:
    """The stages this config runs, in order, each with its validated config and inputs."""
    from jobs import evaluate, finetune, make_tasks, monitor, prepare, prepare_images, pretrain, quantize, serve

    stages: list[Stage] = []

    def made(kind: str) -> list[Stage]:
        return [s for s in stages if s.kind == kind]

    if cfg.prepare is not None:
        c = build(cfg, "prepare", prepare.PrepareConfig, section(cfg, "prepare", cfg.prepare))
        stages.append(Stage("prepare", "prepare", c, "dataset", c.name))
    for label, body in cfg.prepare_images.items():
        key = f"prepare_images.{label}"
        c = build(cfg, key, prepare_images.PrepareImagesConfig, section(cfg, key, body))
        stages.append(Stage(key, "prepare_images", c, "dataset", c.name))
    if cfg.pretrain is not None:
        data = section(cfg, "pretrain", cfg.pretrain)
        default(data, "dataset", [s.name for s in made("dataset")])
        c = build(cfg, "pretrain", pretrain.PretrainConfig, data)
        stages.append(Stage("pretrain", "pretrain", c, "model", c.name, (("dataset", c.dataset),)))
    pretrained = next((s.name for s in stages if s.label == "pretrain"), None)
    if cfg.make_tasks is not None:
        c = build(cfg, "make_tasks", make_tasks.MakeTasksConfig, section(cfg, "make_tasks", cfg.make_tasks))
        stages.append(Stage("make_tasks", "make_tasks", c, "task", c.name))
    for label, body in cfg.finetune.items():
        key = f"finetune.{label}"
        data = section(cfg, key, body)
        if not value_at(data, "base.hf_folder"):
            default(data, "base.artifact", [pretrained] if pretrained else [])
        if not value_at(data, "data.train") and not value_at(data, "data.images"):
            default(data, "data.tasks", [s.name for s in made("task")])
        c = build(cfg, key, finetune.FinetuneConfig, data)
        inputs = ((("model", c.base.artifact),) if c.base.artifact else ()) + \
                 ((("task", c.data.tasks),) if c.data.tasks else ()) + \
                 ((("dataset", c.data.images),) if c.data.images else ())
        stages.append(Stage(key, "finetune", c, "model", c.name, inputs))
    if cfg.quantize is not None:
        data = section(cfg, "quantize", cfg.quantize)
        tuned = [s.name for s in stages if s.job == "finetune" and pretrained and s.config.base.artifact == pretrained]
        default(data, "model", tuned + ([pretrained] if pretrained else []))
        c = build(cfg, "quantize", quantize.QuantizeConfig, data)
        lm_tasks = (("task", c.lm_eval.tasks_artifact),) if c.lm_eval.tasks_artifact else ()
        stages.append(Stage("quantize", "quantize", c, "model", c.name, (("model", c.model),) + lm_tasks))
    if cfg.serve is not None:
        data = section(cfg, "serve", cfg.serve)
        data.update(monitor=None, serve_seconds=0)  # the pipeline runs the monitor stage and decides how long to serve
        c = build(cfg, "serve", serve.ServeConfig, data)
        served = [m.artifact for m in c.models] + [m.canary.artifact for m in c.models if m.canary]
        stages.append(Stage("serve", "serve", c, None, c.name, tuple(("model", a) for a in dict.fromkeys(served))))
    for label, body in cfg.evaluate.items():
        key = f"evaluate.{label}"
        data = section(cfg, key, body)
        tuned = [s.name for s in stages if s.job == "finetune" and pretrained and s.config.base.artifact == pretrained]
        default(data, "model", tuned + ([pretrained] if pretrained else []))
        default(data, "tasks_artifact", [s.name for s in made("task")])
        server = next((s.config for s in stages if s.job == "serve"), None)
        entry = next((m for m in server.models if m.artifact == value_at(data, "model")), None) if server else None
        if entry is not None and not value_at(data, "served.url"):  # scored as clients reach it, too
            default(data, "served.url", [app_url(server)])
            default(data, "served.model", [entry.id])
        c = build(cfg, key, evaluate.EvaluateConfig, data)
        stages.append(Stage(key, "evaluate", c, "evaluation", c.name, (("model", c.model), ("task", c.tasks_artifact))))
    if cfg.monitor is not None:
        data = section(cfg, "monitor", cfg.monitor)
        apps = [s.name for s in stages if s.job == "serve"]
        if not apps and not value_at(data, "app"):
            raise ConfigError("monitor", "a monitor stage needs a serve stage (or monitor.app naming a served app)")
        default(data, "app", apps)
        data.update(monitor_seconds=0)
        c = build(cfg, "monitor", monitor.MonitorConfig, data)
        stages.append(Stage("monitor", "monitor", c, None, c.app))
    if not stages:
        raise ConfigError("", "the pipeline has no stage: give at least one of prepare, pretrain, make_tasks, "
                              "finetune, quantize, serve, evaluate, monitor")
    outputs = [(s.kind, s.name) for s in stages if s.kind]
    for kind, name in outputs:
        if outputs.count((kind, name)) > 1:
            twins = [s.label for s in stages if (s.kind, s.name) == (kind, name)]
            raise ConfigError(f"{twins[1]}.name", f"{kind} '{name}' is also what stage '{twins[0]}' makes; "
                                                  "give each stage its own name")
    return stages


# ---- identity: what makes a stage's output the same as last time -------------------------------------

def digest(manifest: dict[str, Any]) -> str:
    """An artifact's identity: its manifest, which holds every file's sha256, hashed."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def stage_key(stage: Stage, parents: dict[str, Any]) -> str:
    """A hash of the stage's configuration (less where and how long it runs) and of its parents."""
    config = {k: v for k, v in to_dict(stage.config).items() if k not in TRANSIENT_KEYS}
    payload = {"stage": stage.label, "job": stage.job, "config": config, "parents": parents}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parents_of(stage: Stage, store: Storage, keys: dict[str, str]) -> dict[str, Any]:
    """What the stage is made from: its input artifacts' digests, raw input files' names and sizes,
    or (for the monitor) the key of the serve stage it watches."""
    out: dict[str, Any] = {f"{kind}/{name}": digest(store.open(kind, name, verify=False).manifest)
                           for kind, name in stage.inputs}
    if stage.job in ("prepare", "make_tasks"):
        source = stage.config.source if stage.job == "prepare" else SourceConfig(paths=stage.config.paths,
                                                                                 extensions=(".py",))
        out["files"] = hashlib.sha256(json.dumps(sorted(expand_sources(source).items())).encode()).hexdigest()[:16]
    elif stage.job == "prepare_images" and stage.config.source.paths:
        from cluster.storage import iter_files

        found = sorted(f for root in stage.config.source.paths for f in iter_files(root))
        out["files"] = hashlib.sha256(json.dumps(found).encode()).hexdigest()[:16]
    elif stage.job == "monitor":
        out["serve"] = keys.get("serve")
    return out


def state_path(name: str) -> str:
    return f"pipelines/{name}.json"


def done_before(stage: Stage, store: Storage, record: dict[str, Any] | None, key: str) -> str | None:
    """Why the stage can be skipped (what it made is there, from this key), or None."""
    if not record or record.get("key") != key:
        return None
    if stage.kind is not None:
        if not store.exists(stage.kind, stage.name):
            return None
        if digest(store.open(stage.kind, stage.name, verify=False).manifest) != record.get("digest"):
            return None  # replaced since, by another run
        return f"{stage.kind} '{stage.name}' exists for this configuration"
    if stage.job == "serve":
        return f"application '{stage.name}' is running this configuration" if _app_running(stage.name) else None
    return f"the monitor of '{stage.name}' is running" if _monitor_running(stage.name) else None


def _app_running(app: str) -> bool:
    from ray import serve
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    try:
        status = serve.status().applications.get(app)  # no Serve on this cluster: no applications
    except (RayServeException, RayError) as e:  # Serve's controller is there but does not answer
        log.warning("pipeline: cannot ask Serve whether application '%s' runs, so its stage runs again: %s: %s",
                    app, type(e).__name__, e)
        return False
    return status is not None and status.status == "RUNNING"


def _monitor_running(app: str) -> bool:
    import ray

    from actors.monitor import NAMESPACE, actor_name

    try:
        ray.get_actor(actor_name(app), namespace=NAMESPACE)
    except ValueError:
        return False
    return True


# ---- the run ----------------------------------------------------------------------------------------

def check_inputs(stages: list[Stage], store: Storage) -> None:
    """Every input is made by an earlier stage or is in storage already: found before any work."""
    made: set[tuple[str, str]] = set()
    for s in stages:
        for kind, name in s.inputs:
            if (kind, name) not in made and not store.exists(kind, name):
                raise UserError(f"stage '{s.label}' reads {kind} '{name}', which no earlier stage makes and "
                                f"storage '{store.root}' does not hold")
        if s.kind:
            made.add((s.kind, s.name))


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Runs (or skips) every stage in order; returns the pipeline's record."""
    stages = plan(cfg)
    store = Storage(cfg.storage)
    check_inputs(stages, store)
    connect_job(cfg)
    state = store.read_json(state_path(cfg.name)) or {"pipeline": cfg.name, "stages": {}}
    keys: dict[str, str] = {}
    t0 = time.time()
    for i, stage in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {stage.label}"
        keys[stage.label] = key = stage_key(stage, parents_of(stage, store, keys))
        record = state["stages"].get(stage.label)
        why = done_before(stage, store, record, key)
        if why:
            print(f"{head}: skipped, {why} (key {key})", flush=True)
            continue
        print(f"{head}: running jobs.{stage.job} -> {stage.kind or 'application'} '{stage.name}' (key {key})",
              flush=True)
        started = time.time()
        result = run_stage(stage, record)
        state["stages"][stage.label] = {
            "key": key, "job": stage.job, "kind": stage.kind, "name": stage.name,
            "digest": digest(store.open(stage.kind, stage.name, verify=False).manifest) if stage.kind else None,
            "metrics": result.get("metrics", {}) if isinstance(result, dict) and stage.kind else {},
            "seconds": round(time.time() - started, 1), "finished_at": time.time()}
        store.write_json(state_path(cfg.name), state)
        print(f"{head}: done in {time.time() - started:.0f} s", flush=True)
    state["seconds"] = round(time.time() - t0, 1)
    state["lineage"] = lineage(stages, store)
    store.write_json(state_path(cfg.name), state)
    print(format_summary(f"pipeline '{cfg.name}'", [(s.label, _made(s, state["stages"].get(s.label)))
                                                     for s in stages]))
    print("\nlineage: " + " -> ".join(state["lineage"]), flush=True)
    hold(cfg, stages)
    return state


def run_stage(stage: Stage, record: dict[str, Any] | None) -> Any:
    """One stage's job, in this driver; its errors name the stage."""
    job = importlib.import_module(f"jobs.{stage.job}")
    config = stage.config
    if stage.job == "monitor" and record is not None:
        import dataclasses

        config = dataclasses.replace(config, restart=True)  # new settings (or a new version) to watch
    try:
        return job.run(config)
    except ConfigError as e:
        raise ConfigError(f"{stage.label}.{e.key}" if e.key else stage.label, str(e).split(": ", 1)[-1]) from None
    except USER_ERRORS + (JobFailed,) as e:
        print(f"stage '{stage.label}' failed; run the pipeline again to continue from it", file=sys.stderr)
        raise type(e)(f"stage '{stage.label}': {e}") from None


def hold(cfg: PipelineConfig, stages: list[Stage]) -> None:
    """On an embedded cluster, keep a served application up for `serve_seconds` (None: until Ctrl-C)."""
    if not embedded(cfg) or not any(s.job == "serve" for s in stages):
        return
    if cfg.serve_seconds is None:
        print("serving until interrupted (Ctrl-C)", flush=True)
    time.sleep(cfg.serve_seconds if cfg.serve_seconds is not None else float("inf"))


# ---- what it made ------------------------------------------------------------------------------------

def _made(stage: Stage, record: dict[str, Any] | None) -> str:
    what = f"{stage.kind} '{stage.name}'" if stage.kind else (
        f"application '{stage.name}'" if stage.job == "serve" else f"monitor of '{stage.name}'")
    return what + (f" ({record['seconds']:.0f} s, key {record['key']})" if record else "")


def lineage(stages: list[Stage], store: Storage) -> list[str]:
    """The served version's ancestry, oldest first: dataset, checkpoint, model(s), quantized, served."""
    served = next((s for s in stages if s.job == "serve"), None)
    made = [s for s in stages if s.kind == "model"]
    quantized = [s.name for s in made if s.job == "quantize"]
    target = quantized[0] if quantized else (made[-1].name if made else None)
    entry = None
    if served is not None:
        entry = next((m for m in served.config.models if m.artifact == target), served.config.models[0])
        target = entry.artifact
    chain: list[str] = []
    name, seen = target, set()
    while name and name not in seen and store.exists("model", name):
        seen.add(name)
        m = store.open("model", name, verify=False).manifest
        chain.insert(0, _describe_model(m))
        if m.get("run", {}).get("checkpoint"):
            run = m["run"]
            chain.insert(0, f"checkpoint {run['checkpoint']} (step {run['step']})")
        parents = m.get("parents", [])
        dataset = next((p["name"] for p in parents if p.get("kind") == "dataset"), None)
        name = next((p["name"] for p in parents if p.get("kind") == "model"), None)
        if dataset and not name and store.exists("dataset", dataset):
            chain.insert(0, _describe_dataset(store.open("dataset", dataset, verify=False).manifest))
    if entry is not None:
        chain.append(f"served as '{entry.id}' in application '{served.name}' "
                     f"({app_url(served.config)}/v1)")
    return chain


def _describe_dataset(m: dict[str, Any]) -> str:
    r = m["metrics"]
    if "images" in m:
        return (f"dataset {m['name']} ({r['records']['kept']:,} of {r['records']['read']:,} images kept, "
                f"{len(m['images']['classes'])} classes)")
    return (f"dataset {m['name']} ({r['records']['kept']:,} of {r['records']['read']:,} documents kept, "
            f"{r['train_tokens']:,} train tokens)")


def _describe_model(m: dict[str, Any]) -> str:
    x = m.get("metrics", {})
    if "quantization" in m:
        q = m["quantization"]
        return (f"quantized {m['name']} ({q.get('method')}, {x['quality_metric']} {100 * x['quality_delta']:+.2f}%, "
                f"size x{x['size_ratio']:.2f})")
    if "finetune" in m:
        f = m["finetune"]
        after = ", ".join(f"{k} {v:.4g}" for k, v in (x.get("after") or x.get("test") or {}).items()
                          if isinstance(v, (int, float)))
        return f"model {m['name']} ({f['task']} {f['method']} of {f['base']}: {after or 'done'})"
    if "hf_folder" in m.get("config", {}):
        return f"model {m['name']} (imported from {m['config']['hf_folder']})"
    loss = x.get("val_loss")
    return f"model {m['name']} ({x.get('steps')} steps" + (f", val_loss {loss:.4f})" if loss is not None else ")")


CONFIG_CLASS = PipelineConfig


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.pipeline", __doc__, PipelineConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
