"""A pipeline config as plain data: one section per stage, each in the schema of that stage's job,
and how a section becomes the stage's config.

`config: FILE` in a section starts it from that stage YAML, the section's own keys over it; the
runtime keys (`storage`, `ray_address`, `local_cpus`) are set once, at the top, for every stage.
jobs.pipeline checks every section against its job's config class and runs the stages; jobs.query
reads the serve section alone, so it needs none of the other jobs.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cluster.config import ConfigError, apply_override, from_dict
from cluster.runtime import JobConfig

T = TypeVar("T")
# Set once for the whole pipeline; never part of a stage's identity.
RUNTIME_KEYS = ("storage", "ray_address", "local_cpus")


@dataclass(frozen=True)
class PipelineSections(JobConfig):
    """The pipeline's keys, each stage section unchecked (jobs.pipeline's PipelineConfig checks them)."""

    name: str = "demo"  # the pipeline's record: {storage}/pipelines/{name}.json
    prepare: dict[str, Any] | None = None  # each section: that stage's job config (absent: no such stage)
    prepare_images: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> a jobs.prepare_images config
    pretrain: dict[str, Any] | None = None
    make_tasks: dict[str, Any] | None = None
    finetune: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> a jobs.finetune config
    quantize: dict[str, Any] | None = None
    serve: dict[str, Any] | None = None
    evaluate: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> a jobs.evaluate config
    monitor: dict[str, Any] | None = None
    serve_seconds: float | None = None  # embedded cluster, after the last stage: None serves until
    #                                     interrupted, 0 stops at once; on a cluster the app stays up

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name: '{self.name}' is not a valid name (no '/', not starting with '.')")


def section(cfg: PipelineSections, key: str, body: Any) -> dict[str, Any]:
    """A stage section as plain data: its `config:` file (if any) with the section's keys over it."""
    if not isinstance(body, dict):
        raise ConfigError(key, f"must be a mapping (that stage's job config), got {type(body).__name__}")
    body = copy.deepcopy(body)
    for name in RUNTIME_KEYS:
        if name in body:
            raise ConfigError(f"{key}.{name}", f"is set once for every stage: set the pipeline's top-level "
                                               f"'{name}' instead")
    path = body.pop("config", None)
    data: dict[str, Any] = {}
    if path is not None:
        if not isinstance(path, str) or not Path(path).is_file():
            raise ConfigError(f"{key}.config", f"stage config file {path!r} does not exist (relative paths "
                                               "start at the working directory)")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}.config", f"'{path}' is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{key}.config", f"'{path}' must hold a mapping at the top level")
    _merge(data, body)
    for name in RUNTIME_KEYS:
        data.pop(name, None)  # a stage file's own storage / address yield to the pipeline's
    return data


def default(data: dict[str, Any], dotted: str, upstream: list[str]) -> None:
    """Feeds a stage the artifact of the stage before it, unless the section names one itself."""
    if upstream and value_at(data, dotted) in (None, ""):
        apply_override(data, f"{dotted}={json.dumps(upstream[0])}")


def build(cfg: PipelineSections, key: str, cls: type[T], data: dict[str, Any]) -> T:
    """The stage's config: its section's data with the pipeline's runtime keys, checked by `cls`."""
    data = {**data, "storage": cfg.storage, "ray_address": cfg.ray_address, "local_cpus": cfg.local_cpus}
    return from_dict(cls, data, prefix=key)


def value_at(data: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key of plain data, or None."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
