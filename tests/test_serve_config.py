"""The shipped Serve config file and gRPC stubs, checked offline (no cluster)."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import yaml

from cluster.config import load_config
from jobs import serve as serve_job

ROOT = Path(__file__).resolve().parent.parent
SERVE_APP = ROOT / "jobs" / "configs" / "serve_app.yaml"


def test_the_serve_config_file_is_valid_and_matches_what_the_job_starts():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(SERVE_APP.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (application,) = schema.applications
    assert application.import_path == "jobs.serve:app"
    cfg = serve_job.config_from_args(application.args)
    assert cfg == load_config(serve_job.ServeConfig, ROOT / "jobs" / "configs" / "serve_demo.yaml")
    expected = serve_job.proxy_options(cfg)
    assert raw["http_options"] == expected["http_options"]
    assert raw["grpc_options"] == expected["grpc_options"]
    assert application.name == cfg.name and application.route_prefix == "/"


def test_grpc_servicer_functions_resolve():
    for path in serve_job.GRPC_SERVICERS:
        module, name = path.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), name)), path


def test_committed_grpc_stubs_are_what_the_proto_generates(tmp_path):
    proto = Path("actors/proto/helio.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(proto)], cwd=ROOT, check=True)
    for name in ("helio_pb2.py", "helio_pb2.pyi", "helio_pb2_grpc.py"):
        assert (tmp_path / proto.parent / name).read_text() == (ROOT / proto.parent / name).read_text(), \
            f"{name} is stale: run `make proto`"


def test_a_public_bind_without_api_keys_is_refused_unless_auth_none_says_so(monkeypatch, tmp_path):
    import pytest

    from actors.serve_requests import read_key_file
    from cluster.config import ConfigError

    monkeypatch.delenv("HELIO_API_KEYS", raising=False)
    models = "models=[{id: g, artifact: x}]"
    for host in ("0.0.0.0", "10.1.2.3", "fd00::1", "example.com"):
        with pytest.raises(ConfigError, match=f"http.host.*{host} is reachable from other machines and no API key"):
            load_config(serve_job.ServeConfig, None, [models, f"http.host={host}"])
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert load_config(serve_job.ServeConfig, None, [models, f"http.host={host}"]).http.host == host
    for enough in ("auth=none", "api_keys=[k1]", f"api_key_file={tmp_path / 'keys'}"):
        assert load_config(serve_job.ServeConfig, None, [models, "http.host=0.0.0.0", enough]).http.host == "0.0.0.0"
    monkeypatch.setenv("HELIO_API_KEYS", "k1,k2")
    assert load_config(serve_job.ServeConfig, None, [models, "http.host=0.0.0.0"]).auth == "keys"
    with pytest.raises(ConfigError, match="auth.*'open' is not keys or none"):
        load_config(serve_job.ServeConfig, None, [models, "auth=open"])
    (tmp_path / "keys").write_text("# none yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_key_file(str(tmp_path / "keys"))
    with pytest.raises(ValueError, match="api_key_file: cannot read"):
        read_key_file(str(tmp_path / "missing"))
    (tmp_path / "keys").write_text("a\n  b  \n# c\n")
    assert read_key_file(str(tmp_path / "keys")) == ["a", "b"]


def test_limits_name_keys_by_id_and_a_bucket_lets_through_a_burst_then_its_rate(monkeypatch):
    import pytest

    from actors.serve_limits import Limiter, Limits, key_id
    from cluster.config import ConfigError, from_dict

    models = "models=[{id: g, artifact: x}]"
    with pytest.raises(ConfigError, match="limits.keys.*'secret-key' is not a key id"):
        load_config(serve_job.ServeConfig, None, [models, "limits={keys: {secret-key: {requests_per_second: 1}}}"])
    with pytest.raises(ConfigError, match="limits.default.*must be 0 .no limit. or positive"):
        load_config(serve_job.ServeConfig, None, [models, "limits={default: {tokens_per_minute: -1}}"])
    assert key_id("k1") == key_id(b"k1") and len(key_id("k1")) == 16 and key_id("k1") != key_id("k2")

    clock = [100.0]  # the buckets read time.monotonic: here it moves only when the test says
    monkeypatch.setattr("actors.serve_limits.time.monotonic", lambda: clock[0])
    a, b = key_id("a"), key_id("b")
    limiter = Limiter(from_dict(Limits, {"default": {"requests_per_second": 2},
                                         "keys": {b: {"tokens_per_minute": 60}}}))
    assert [limiter.admit(a) for _ in range(3)] == [None, None, ("requests_per_second", 0.5)]  # a burst of 2
    clock[0] += 0.25
    assert limiter.admit(a) == ("requests_per_second", 0.25)
    clock[0] += 0.25
    assert limiter.admit(a) is None  # one more after 1/rate
    assert all(limiter.admit(b) is None for _ in range(100))  # b's own limit has no request rate
    limiter.charge(b, 90)  # 60 a minute is one a second: 30 overdrawn
    assert limiter.admit(b) == pytest.approx(("tokens_per_minute", 30.0))
    clock[0] += 30.5
    assert limiter.admit(b) is None


def test_the_engine_key_is_checked_when_the_config_is_read_and_vllm_when_the_app_is_built(tmp_path):
    """`engine: vllm` serves generation only, on whole GPUs; without vLLM installed (Helio's own
    environment never has it) the app is refused in one sentence before any artifact is read."""
    import pytest

    from actors.serve_app import entries
    from cluster.config import ConfigError

    def cfg(model: str):
        return load_config(serve_job.ServeConfig, None, [f"storage={tmp_path}", f"models=[{model}]"])

    with pytest.raises(ConfigError, match=r"'models\[0\]\.engine': must be one of helio, vllm, not 'tgi'"):
        cfg("{id: g, artifact: x, engine: tgi}")
    with pytest.raises(ConfigError, match=r"'models\[0\]\.engine': vllm generates text; a embed model is served by"):
        cfg("{id: e, artifact: x, task: embed, engine: vllm}")
    with pytest.raises(ConfigError, match=r"'models\[0\]\.num_gpus': vLLM takes whole GPUs .* not 0.5"):
        cfg("{id: g, artifact: x, engine: vllm, num_gpus: 0.5}")
    assert cfg("{id: g, artifact: x}").models[0].engine == "helio"
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match=r"'models\[1\]\.engine': vllm is not installed in this environment: "
                                              r"install Helio's vllm extra"):
            entries(cfg("{id: g, artifact: x}, {id: v, artifact: x, engine: vllm, num_gpus: 1}"))
