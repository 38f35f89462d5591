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
