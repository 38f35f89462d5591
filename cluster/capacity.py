"""Will a cluster definition hold what Helio's jobs ask for? Checked offline, before `ray up`.

`load_cluster` runs a `ray up` YAML through the autoscaler's own preparation and schema
(`prepare_config`, `validate_config`). `requests` lists what one job config asks Ray for, as
resource bundles (a Ray Train worker, a Serve replica, a data task), and `unplaceable` says what
of that the cluster could never place: a bundle no node type is large enough for, or more bundles
than every node type at its `max_workers` holds together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Bundle = dict[str, float]


@dataclass(frozen=True)
class Request:
    what: str  # e.g. "pretrain 'gpt2-124m': 8 train workers"
    bundles: tuple[Bundle, ...]  # all of them at once


def load_cluster(path: str | Path) -> dict[str, Any]:
    """The cluster definition as the autoscaler sees it: defaults filled in, validated by Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(Path(path).read_text())
    prepared = prepare_config(raw)
    validate_config(prepared)
    return prepared


def nodes_at_max(cluster: dict[str, Any]) -> list[tuple[str, Bundle]]:
    """Every node the cluster can have at once: the head and each worker type at its max_workers."""
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    out = [(head, dict(types[head].get("resources", {})))]
    for name, t in types.items():
        if name != head:
            out += [(name, dict(t.get("resources", {})))] * int(t.get("max_workers", 0))
    return out


def unplaceable(cluster: dict[str, Any], request: Request) -> str | None:
    """Why the request could never run on this cluster, or None (first-fit decreasing packing)."""
    nodes = nodes_at_max(cluster)
    for b in request.bundles:
        if not any(_covers(res, b) for _, res in nodes):
            return f"{request.what}: no node type has {_show(b)}"
    free = [dict(res) for _, res in nodes]
    for b in sorted(request.bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)), reverse=True):
        node = next((f for f in free if _covers(f, b)), None)
        if node is None:
            return f"{request.what}: {len(request.bundles)} bundles do not fit on the cluster at max_workers"
        for k, v in b.items():
            node[k] = node.get(k, 0) - v
    return None


def requests(job: str, cfg: Any) -> list[Request]:
    """What one job config (a jobs.<job> config dataclass) asks the cluster for."""
    name = f"{job} '{getattr(cfg, 'name', '')}'"
    data_task = {"CPU": 1.0}  # a Ray Data read / map task
    if job in ("pretrain", "finetune"):
        r = cfg.resources
        worker = {"CPU": r.cpus_per_worker, **({"GPU": 1.0} if r.use_gpu else {})}
        return [Request(f"{name}: {r.min_workers} train workers and a data task",  # elastic: what it needs to start
                        (worker,) * r.min_workers + (data_task,))]
    if job == "quantize":
        lm_eval = [Request(f"{name}: an lm-eval task", (data_task,))] if cfg.lm_eval.tasks_artifact else []
        return [Request(f"{name}: the timing task", ({"CPU": float(cfg.eval.threads)},)),
                Request(f"{name}: scoring", (data_task,) * (2 * cfg.eval.shards))] + lm_eval
    if job == "serve":
        bundles: list[Bundle] = [{"CPU": cfg.ingress_cpus}]
        for m in cfg.models:
            count = m.autoscaling.max_replicas if m.autoscaling else m.replicas
            replica = {"CPU": m.num_cpus, **({"GPU": m.num_gpus} if m.num_gpus else {})}
            bundles += [replica] * (count * (2 if m.canary else 1))
        return [Request(f"{name}: every replica at its maximum", tuple(bundles))]
    if job in ("prepare", "prepare_images", "make_tasks"):
        return [Request(f"{name}: data tasks", (data_task,))]
    if job == "evaluate":
        return [Request(f"{name}: an lm-eval task", ({"CPU": float(cfg.num_cpus)},))]
    return []  # monitor: a zero-CPU actor (a pipeline: the requests of each of its stages)


def _covers(have: Bundle, want: Bundle) -> bool:
    return all(have.get(k, 0) >= v - 1e-9 for k, v in want.items() if v)


def _show(b: Bundle) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(b.items())) + "}"
