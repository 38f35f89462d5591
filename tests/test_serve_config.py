"""The shipped Serve config file and gRPC stubs, checked offline (no cluster)."""

from __future__ import annotations

import importlib
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
