from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cluster.config import ConfigError, from_dict, load_config, to_dict
from jobs.prepare import PrepareConfig

JOBS = Path(__file__).resolve().parent.parent / "jobs"
CONFIGS = sorted(p for p in (JOBS / "configs").glob("*.yaml") if p.name != "serve_app.yaml")  # Serve's format:
#                                                                       tests/test_serve_config.py


def job_of(config: Path) -> str:
    """The job a shipped config belongs to: the longest `_`-prefix of its name that is a module
    of jobs/ (make_tasks_demo -> jobs.make_tasks, pretrain_mlm_demo -> jobs.pretrain); demo.yaml and
    vision_demo.yaml are whole pipelines."""
    if config.stem in ("demo", "vision_demo"):
        return "jobs.pipeline"
    parts = config.stem.split("_")
    for n in range(len(parts), 0, -1):
        if (JOBS / f"{'_'.join(parts[:n])}.py").is_file():
            return f"jobs.{'_'.join(parts[:n])}"
    raise AssertionError(f"no module in jobs/ for config {config.name}")


@dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    names: tuple[str, ...] = ()

    def __post_init__(self):
        if self.rate > 1:
            raise ValueError("rate: must be at most 1")


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    steps: int = 3
    address: str | None = None
    inner: Inner = field(default_factory=Inner)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    module = importlib.import_module(job_of(path))
    cfg = load_config(module.CONFIG_CLASS, path)
    assert cfg.storage and cfg.name
    assert from_dict(module.CONFIG_CLASS, to_dict(cfg)) == cfg  # survives a trip as plain data


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\ninner:\n  rate: 0.25\n")
    cfg = load_config(Outer, path, ["steps=7", "inner.names=[p, q]", "address=null"])
    assert cfg == Outer(name="a", steps=7, address=None, inner=Inner(rate=0.25, names=("p", "q")))


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["inner.nope=1"], "inner.nope", "unknown key"),
        (["steps=three"], "steps", "integer"),
        (["inner.rate=fast"], "inner.rate", "number"),
        (["inner.rate=2"], "inner.rate", "at most 1"),
        (["inner=5"], "inner", "mapping"),
        (["steps"], "", "key=value"),
    ],
)
def test_errors_name_the_dotted_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(Outer, None, overrides)
    assert info.value.key == key
    assert words in str(info.value)


def test_prepare_config_rejects_contradictions():
    with pytest.raises(ConfigError, match="quality.max_chars"):
        load_config(PrepareConfig, None, ["quality.min_chars=100", "quality.max_chars=50"])
    with pytest.raises(ConfigError, match="dedup.bands"):
        load_config(PrepareConfig, None, ["dedup.num_perm=128", "dedup.bands=7"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_a_serve_models_context_cap_is_checked_where_it_is_written():
    from jobs.serve import ServeConfig

    with pytest.raises(ConfigError, match=r"'models\[0\].max_context': must be 0 \(the model's own\) or at least 2"):
        load_config(ServeConfig, None, ["models=[{id: m, artifact: a, max_context: -8}]"])
    cfg = load_config(ServeConfig, None, ["models=[{id: m, artifact: a, max_context: 2048}]"])
    assert cfg.models[0].max_context == 2048
    with pytest.raises(ConfigError, match=r"'models\[0\].drain_s': must not be negative, not -1"):
        load_config(ServeConfig, None, ["models=[{id: m, artifact: a, drain_s: -1}]"])
    with pytest.raises(ConfigError, match=r"'models\[0\].draft_tokens': must not be negative \(0 turns"):
        load_config(ServeConfig, None, ["models=[{id: m, artifact: a, draft_tokens: -1}]"])
    assert load_config(ServeConfig, None, ["models=[{id: m, artifact: a, draft_tokens: 0}]"]).models[0].draft_tokens == 0


def test_num_workers_is_a_size_or_an_elastic_range():
    from cluster.train_run import ResourcesConfig, check_elastic, elastic_max

    fixed = from_dict(ResourcesConfig, {"num_workers": 2})
    assert (fixed.elastic, fixed.min_workers, fixed.max_workers, elastic_max(fixed)) == (False, 2, 2, 0)
    elastic = from_dict(ResourcesConfig, {"num_workers": [1, 2], "resize_check_s": 5})
    assert (elastic.elastic, elastic.min_workers, elastic.max_workers, elastic_max(elastic)) == (True, 1, 2, 2)
    assert from_dict(ResourcesConfig, to_dict(elastic)) == elastic
    for bad, words in (([2, 1], "min 2 exceeds max 1"), ([1, 2, 3], r"is \[min, max\]"), ([0, 2], "at least 1"),
                       ("two", "must be")):
        with pytest.raises(ConfigError, match=words) as e:
            from_dict(ResourcesConfig, {"num_workers": bad}, "resources")
        assert e.value.key == "resources.num_workers"
    check_elastic(elastic, grad_accum=1, zero_stage=2)  # 1 worker takes both micro-batches, 2 one each
    check_elastic(fixed, grad_accum=1, zero_stage=3)  # a fixed group never changes size
    with pytest.raises(ConfigError, match="group of 3 workers cannot share the 4 micro-batches"):
        check_elastic(from_dict(ResourcesConfig, {"num_workers": [2, 4]}), grad_accum=1, zero_stage=2)
    check_elastic(from_dict(ResourcesConfig, {"num_workers": [2, 4]}), grad_accum=3, zero_stage=1)  # 12 = 3 x 4
    with pytest.raises(ConfigError, match="needs ZeRO stage 0, 1 or 2") as e:
        check_elastic(elastic, grad_accum=1, zero_stage=3)
    assert e.value.key == "resources.num_workers"
