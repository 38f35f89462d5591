"""jobs.pipeline on the shipped demo config at tiny sizes, for real: every stage on the session's Ray
(a run that fails in pretraining, then the rerun that continues from it), a second run that skips
every stage, and the same pipeline submitted with `ray job submit` to a real local head with token
auth, whose served application then answers over HTTP.

The session's run keeps everything on an object store: `storage: s3://...` on a real S3 API server
on loopback (tests/s3_server.py), reached through the standard AWS environment variables. Ray Train's
checkpoints, every artifact, the replicas' model loading and the monitor's state go through it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sysconfig
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from actors.train_driver import POLL_ENV, START_TIMEOUT_ENV
from cluster.cli import JobFailed
from cluster.config import ConfigError, load_config
from cluster.storage import Storage, fetch_folder, resolve
from jobs import pipeline
from ray_head import RayHead
from tiny_data import free_port

pytestmark = pytest.mark.ray
DEMO = str(Path(pipeline.__file__).parent / "configs" / "demo.yaml")
LIB = sysconfig.get_paths()["stdlib"]
TINY = [
    f"prepare.source.paths=[{LIB}/json, {LIB}/email]", "prepare.source.extensions=[.py]",
    "prepare.tokenizer.vocab_size=512", "prepare.pack.block_size=64", "prepare.pack.val_fraction=0.1",
    "pretrain.model.n_layer=2", "pretrain.model.n_head=2", "pretrain.model.n_kv_head=1", "pretrain.model.n_embd=32",
    "pretrain.train.steps=6", "pretrain.train.micro_batch=2", "pretrain.train.log_every=2",
    "pretrain.train.eval_every=3",
    "pretrain.train.eval_batches=1", "pretrain.train.checkpoint_every=2", "pretrain.train.shuffle_buffer=16",
    "pretrain.optim.warmup_steps=2", "pretrain.sample.count=0", "pretrain.failure.num_to_keep=3",
    f"make_tasks.paths=[{LIB}/email, {LIB}/xml]", "make_tasks.val_fraction=0.3", "make_tasks.classify_labels=2",
    "finetune.sft.train.steps=2", "finetune.sft.train.micro_batch=2", "finetune.sft.train.eval_every=2",
    "finetune.sft.train.checkpoint_every=2", "finetune.sft.train.eval_batches=1", "finetune.sft.data.max_len=64",
    "finetune.sft.eval.max_examples=4", "finetune.sft.eval.max_new_tokens=8", "finetune.sft.optim.warmup_steps=1",
    "finetune.embed.train.steps=2", "finetune.embed.train.micro_batch=4", "finetune.embed.train.eval_every=2",
    "finetune.embed.train.checkpoint_every=2", "finetune.embed.train.eval_batches=1",
    "finetune.embed.train.shuffle_buffer=64", "finetune.embed.data.max_len=32", "finetune.embed.data.max_query_len=16",
    "finetune.embed.eval.max_examples=16", "finetune.embed.optim.warmup_steps=1",
    # embeddings from the tiny Llama pretrained above (MiniLM's demo finetune is tests/test_demo.py's)
    "finetune.embed.base.artifact=pretrain_demo", "finetune.embed.base.hf_folder=",
    "finetune.embed.lora.targets=[q_proj, k_proj, v_proj, o_proj]",
    "quantize.eval.max_examples=8", "quantize.eval.shards=1", "quantize.eval.seq_len=32", "quantize.eval.iters=2",
    "quantize.eval.threads=1", "quantize.eval.decode_tokens=4", "quantize.max_quality_delta=0.2",
    "quantize.lm_eval.limit=4", "quantize.lm_eval.max_delta=0.2",
    "evaluate.sft.limit=4", "evaluate.sft.num_cpus=0.5", "evaluate.int8.limit=4", "evaluate.int8.num_cpus=0.5",
    "monitor.period_s=2", "serve_seconds=0",
]
FAULT = ["pretrain.fault.at_step=3", "pretrain.failure.max_failures=0"]  # rank 0 raises once at step 3


def _run(overrides: list[str]) -> tuple[dict, str]:
    """One pipeline run in this process (on the session's Ray); its record and what it printed."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            state = pipeline.run(load_config(pipeline.PipelineConfig, DEMO, overrides))
    finally:
        print(out.getvalue())  # shown by pytest when a test fails
    return state, out.getvalue()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _object(storage: str, rel: str) -> pafs.FileInfo:
    fs, path = resolve(f"{storage}/{rel}")
    return fs.get_file_info(path)


def _read(storage: str, rel: str) -> bytes:
    fs, path = resolve(f"{storage}/{rel}")
    with fs.open_input_stream(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def demo(ray_cluster, serve_ports, s3_server, tmp_path_factory):
    """The tiny demo pipeline on S3: a run that fails at pretraining step 3, then the run that continues it."""
    from ray import serve

    from actors.monitor import NAMESPACE, actor_name
    from s3_server import S3Server

    storage = S3Server.create_bucket("helio-pipeline") + "/demo"
    environ_before = {k: os.environ.get(k) for k in (START_TIMEOUT_ENV, POLL_ENV)}
    port = serve_ports["http"]
    tracking = tmp_path_factory.mktemp("tracking")  # MLflow's database and TensorBoard's events: local files
    overrides = [f"storage={storage}", *TINY, f"serve.http.port={port}", f"serve.grpc.port={serve_ports['grpc']}",
                 "pretrain.tracking.mlflow=true", f"pretrain.tracking.mlflow_uri=sqlite:///{tracking}/mlflow.db",
                 "pretrain.tracking.tensorboard=true", f"pretrain.tracking.tensorboard_dir={tracking}/tb",
                 "finetune.sft.tracking.mlflow=false", "finetune.sft.tracking.tensorboard=false",  # not on S3 storage
                 "finetune.embed.tracking.mlflow=false", "finetune.embed.tracking.tensorboard=false"]
    # no retries: the run fails with one sentence saying why and how to resume, and exports nothing
    with pytest.raises(JobFailed, match="stage 'pretrain': training failed .*injected fault on rank 0 at step 3.*"
                                        "run the job again with the same name and storage to resume"):
        _run(overrides + FAULT)
    assert not Storage(storage).exists("model", "pretrain_demo")
    failed = Storage(storage).read_json(pipeline.state_path("demo"))
    state, printed = _run(overrides)
    # what a stage sets for Ray Train's controller is its own: the driver's environment is as it was
    assert {k: os.environ.get(k) for k in environ_before} == environ_before
    yield {"storage": storage, "port": port, "grpc_port": serve_ports["grpc"], "overrides": overrides, "tracking": tracking,
           "failed": failed, "state": state, "printed": printed}
    ray_cluster.kill(ray_cluster.get_actor(actor_name("serve_demo"), namespace=NAMESPACE), no_restart=True)
    serve.delete("serve_demo")


def test_a_failed_run_continues_at_the_failed_stage_and_then_runs_every_stage(demo):
    assert list(demo["failed"]["stages"]) == ["prepare"]  # nothing after the failure was recorded
    printed, storage = demo["printed"], demo["storage"]
    assert re.search(r"\[1/10\] prepare: skipped, dataset 'prepare_demo' exists for this configuration", printed)
    assert "[2/10] pretrain: running" in printed
    # pretraining resumed from the checkpoint at step 2 that the failed run left, and finished
    records = [json.loads(line) for line in _read(storage, "runs/pretrain_demo/metrics.jsonl").splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["attempt_start_step"] == 2, records[-1]
    assert _object(storage, "runs/pretrain_demo/loss.png").size > 1000  # the loss curve
    assert _object(storage, "adapters/finetune_embed_demo/adapter_model.safetensors").size > 0
    stages = demo["state"]["stages"]
    assert list(stages) == ["prepare", "pretrain", "make_tasks", "finetune.sft", "finetune.embed", "quantize",
                            "serve", "evaluate.sft", "evaluate.int8", "monitor"]
    store = Storage(storage)
    for label, rec in stages.items():
        if rec["kind"]:
            art = store.open(rec["kind"], rec["name"])  # complete, every file's sha256 verified
            assert pipeline.digest(art.manifest) == rec["digest"], label
    # each artifact was made from its upstream stage's
    assert store.open("model", "pretrain_demo").manifest["parents"][0]["name"] == "prepare_demo"
    sft = store.open("model", "finetune_sft_demo").manifest
    assert [p["name"] for p in sft["parents"]] == ["pretrain_demo", "stdlib_tasks"]
    q = store.open("model", "quantize_demo").manifest
    assert q["parents"][0]["name"] == "finetune_sft_demo" and q["rejected"] is False
    assert q["quality_gate"]["lm_eval"]["metric"] == "helio_code_perplexity/byte_perplexity"


def test_lm_eval_scores_the_sft_model_and_its_int8_in_process_and_as_served_and_they_agree(demo):
    """evaluate.sft: lm-eval's HF backend and its local-completions client against the served
    demo-llama; evaluate.int8: Helio's loader and the served demo-llama-int8. Same model, same documents:
    the two ways agree on every metric."""
    store = Storage(demo["storage"])
    for name, model, served, backend in (("evaluate_demo", "finetune_sft_demo", "demo-llama", "hf"),
                                         ("evaluate_int8_demo", "quantize_demo", "demo-llama-int8", "helio")):
        art = store.open("evaluation", name)
        report = json.loads(art.read_bytes("results.json"))
        assert report["model"] == model and report["backends"] == {"in_process": backend, "served": "local-completions"}
        assert all(a["agree"] for a in report["agreement"].values()), report["agreement"]
        assert {p["name"] for p in art.manifest["parents"]} == {model, "stdlib_tasks"}
        assert art.manifest["config"]["served"]["model"] == served
        assert f":{demo['port']}" in art.manifest["config"]["served"]["url"]
        assert sum(report["documents"].values()) > 0


def test_everything_lives_on_the_object_store_and_no_credential_or_endpoint_is_written(demo, s3_server):
    fs, root = resolve(demo["storage"])
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]
    assert {p.removeprefix(root + "/").split("/")[0] for p in files} >= {
        "datasets", "tasks", "models", "adapters", "runs", "pipelines", "serving", "monitor"}
    assert any("/runs/pretrain_demo/checkpoint_" in p for p in files)  # Ray Train's checkpoints too
    secrets = (s3_server.env["AWS_ACCESS_KEY_ID"], s3_server.env["AWS_SECRET_ACCESS_KEY"], f":{s3_server.port}")
    written = [p for p in files if p.endswith((".json", ".jsonl", ".yaml"))]
    assert len(written) > 20
    for p in written:
        with fs.open_input_stream(p) as f:
            text = f.read().decode()
        assert not any(s in text for s in secrets), p
    assert not any(s in demo["printed"] for s in secrets)


def test_pretraining_is_one_mlflow_run_through_its_failure_and_its_events_are_in_tensorboard(demo):
    """The run that failed at step 3 and the rerun that resumed it are one MLflow run (found by its run
    folder), with every reported step once, the config as params and the loss curve and manifest as
    artifacts; TensorBoard's event files hold the same steps. Read back with their own readers."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in _read(demo["storage"], "runs/pretrain_demo/metrics.jsonl").splitlines()]
    client = MlflowClient(f"sqlite:///{demo['tracking']}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("helio").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.run_name == "pretrain_demo" and run.data.params["train.steps"] == "6"
    assert run.data.params["model.arch"] == "llama"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [r["step"] for r in records] == [2, 3, 4, 6]  # 3: an evaluation
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in records], rel=1e-12)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [3, 6]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"loss.png", "helio.json"}
    events = EventAccumulator(str(demo["tracking"] / "tb" / "pretrain_demo"))
    events.Reload()
    assert sorted({e.step for e in events.Scalars("loss")}) == [2, 3, 4, 6]


def test_the_pretrained_llama_with_one_key_value_head_loads_in_transformers_with_the_same_logits(demo):
    import torch
    from transformers import AutoModelForCausalLM

    from models.hf import load_model
    from models.llama import Llama

    with fetch_folder(f"{demo['storage']}/models/pretrain_demo", ("config.json", "model.safetensors")) as folder:
        model = load_model(folder).eval()
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(model, Llama) and (model.cfg.n_head, model.cfg.n_kv_head) == (2, 1)  # multi-query attention
    assert hf.config.model_type == "llama" and hf.config.num_key_value_heads == 1
    ids = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=1e-4, rtol=0)


def test_the_lineage_runs_from_the_dataset_to_the_served_version(demo):
    lineage = demo["state"]["lineage"]
    assert [part.split(" ")[0] for part in lineage] == ["dataset", "checkpoint", "model", "model", "quantized",
                                                        "served"], lineage
    assert "prepare_demo" in lineage[0] and "/runs/pretrain_demo/checkpoint_" in lineage[1]
    assert "(step 6)" in lineage[1] and "finetune_sft_demo" in lineage[3] and "int8" in lineage[4]
    assert "'demo-llama-int8'" in lineage[5] and f":{demo['port']}/v1" in lineage[5]
    assert "lineage: dataset prepare_demo" in demo["printed"]


def test_the_served_models_answer_over_http_and_grpc_and_every_monitor_probe_passed(demo):
    import grpc

    from actors.proto import helio_pb2 as pb
    from actors.proto import helio_pb2_grpc

    url = f"http://127.0.0.1:{demo['port']}/v1"
    request = {"model": "demo-llama-int8", "prompt": "def ", "max_tokens": 4, "temperature": 0}
    completion = _post(f"{url}/completions", request)
    assert completion["usage"]["completion_tokens"] >= 1
    with grpc.insecure_channel(f"127.0.0.1:{demo['grpc_port']}") as channel:  # the same answer over gRPC
        chunks = list(helio_pb2_grpc.HelioStub(channel).Complete(pb.CompleteRequest(**request), timeout=60))
    assert "".join(c.text for c in chunks) == completion["choices"][0]["text"]
    assert chunks[-1].usage.completion_tokens == completion["usage"]["completion_tokens"]
    vectors = _post(f"{url}/embeddings", {"model": "minilm-code-search", "input": ["open a file"]})["data"]
    assert len(vectors[0]["embedding"]) == 32  # the tiny Llama's width (pretrain.model.n_embd)
    monitor = Storage(demo["storage"]).read_json("monitor/serve_demo/state.json")
    assert sorted(monitor["health"]) == ["demo-llama", "demo-llama-int8", "minilm-code-search"]
    for model, h in monitor["health"].items():  # a state turns only after fail_after rounds: read the probes
        last = h["rounds"][-1]
        assert last["verdict"] == "ok" and all(p["ok"] for p in last["probes"]), (model, last)


def test_the_llama_embedder_quantizes_to_int8_and_is_scored_on_its_retrieval_rows(demo):
    """The pipeline's LoRA-finetuned Llama embedder (headless) through jobs.quantize: every Linear of
    its 2 layers runs int8, and it is scored on its finetune's held-out retrieval rows."""
    from actors.model_loader import model_kind, open_runnable
    from jobs import quantize

    cfg = load_config(quantize.QuantizeConfig, Path(pipeline.__file__).parent / "configs" / "quantize_demo.yaml", [
        f"storage={demo['storage']}", "model=finetune_embed_demo", "name=embed_llama_int8", "max_quality_delta=1.0",
        "eval.max_examples=16", "eval.shards=1", "eval.seq_len=32", "eval.iters=2", "eval.threads=1",
        "lm_eval.tasks_artifact=", "lm_eval.gate="])  # lm-eval scores causal LMs
    manifest = quantize.run(cfg)
    assert manifest["model"] | {"arch": "llama", "kind": "embed", "quantized": True} == manifest["model"]
    store = Storage(demo["storage"])
    report = json.loads(store.open("model", "embed_llama_int8").read_bytes("report.json"))
    assert report["quality"]["metric"] == "mrr" and "runs/finetune_embed_demo" in report["quality"]["data"]
    assert sum(report["kernels"].values()) == 2 * 7  # q, k, v, o, gate, up, down of each layer; no LM head
    # int8 per-channel weights move an output by a few percent of its norm at most (tests/test_quant.py's
    # bounds): a relative error e costs a cosine of about 1 - e^2 / 2, and 0.99 still allows e = 0.14
    assert report["quality"]["cosine_to_float"]["min"] > 0.99, report["quality"]
    model, _ = open_runnable(store, "embed_llama_int8")
    assert model_kind(model) == "embed"


def test_a_second_run_skips_every_stage(demo):
    state, printed = _run(demo["overrides"])
    skipped = re.findall(r"\[\d+/10\] (\S+): skipped", printed)
    assert skipped == list(demo["state"]["stages"]), printed
    assert "running jobs." not in printed
    assert state["stages"] == demo["state"]["stages"]  # same keys, same artifacts (digests), nothing rewritten


def test_a_stage_key_moves_with_its_own_config_and_not_with_where_it_runs():
    """Keys alone, without parents (a parent's new digest moves its children's keys the same way)."""
    cfg = load_config(pipeline.PipelineConfig, DEMO, ["finetune.sft.train.steps=3"])
    base = load_config(pipeline.PipelineConfig, DEMO)
    keyed = {s.label: pipeline.stage_key(s, {}) for s in pipeline.plan(cfg)}
    same = {s.label: pipeline.stage_key(s, {}) for s in pipeline.plan(base)}
    assert [k for k in keyed if keyed[k] != same[k]] == ["finetune.sft"]
    runtime = load_config(pipeline.PipelineConfig, DEMO, ["ray_address=ray://elsewhere:10001", "storage=/x"])
    assert {s.label: pipeline.stage_key(s, {}) for s in pipeline.plan(runtime)} == same


def test_bad_pipeline_configs_name_the_dotted_key():
    cases = {
        "pretrain.train.steps=x": "pretrain.train.steps",
        "finetune.sft.storage=/elsewhere": "finetune.sft.storage",
        "quantize.bogus=1": "quantize.bogus",
        "prepare.config=missing.yaml": "prepare.config",
        "finetune.embed.name=finetune_sft_demo": "finetune.embed.name",
        "serve.models=[]": "serve.models",
    }
    for override, key in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(pipeline.PipelineConfig, DEMO, [override])
        assert e.value.key == key, (override, str(e.value))


def test_an_input_no_stage_makes_is_refused_before_any_work(tmp_path):
    from cluster.cli import UserError

    cfg = load_config(pipeline.PipelineConfig, DEMO, [f"storage={tmp_path}", "quantize.model=nowhere"])
    with pytest.raises(UserError, match="stage 'quantize' reads model 'nowhere', which no earlier stage makes"):
        pipeline.check_inputs(pipeline.plan(cfg), Storage(str(tmp_path)))


@pytest.mark.slow  # a second Ray head and a job upload: the full tier
def test_ray_job_submit_to_a_local_head_with_token_auth_serves_the_pipeline(demo, tmp_path):
    head = RayHead().start()
    try:
        refused = head.cli("job", "list", "--address", head.address,
                           env={**head.env(), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
        assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()
        port = free_port()
        sets = [a for o in demo["overrides"] if not o.startswith(("serve.http.port", "serve.grpc.port"))
                for a in ("--set", o)]
        done = head.submit(["python", "-m", "jobs.pipeline", "jobs/configs/demo.yaml", *sets, "--set",
                            f"serve.http.port={port}", "--set", f"serve.grpc.port={free_port()}",
                            # one model: what this test adds is the way in, not the models (served above)
                            "--set", "serve.models=[{id: demo-llama, artifact: finetune_sft_demo}]",
                            "--set", "evaluate={}"], timeout=600)
        log = done.stdout + done.stderr
        assert done.returncode == 0 and "succeeded" in log, log[-4000:]
        for label in ("prepare", "pretrain", "make_tasks", "finetune.sft", "finetune.embed", "quantize"):
            assert re.search(rf"\] {re.escape(label)}: skipped", log), (label, log[-4000:])
        assert "serve: running jobs.serve" in log  # not running on this cluster yet
        # the job has ended; its application keeps serving
        answer = _post(f"http://127.0.0.1:{port}/v1/completions",
                       {"model": "demo-llama", "prompt": "import ", "max_tokens": 4, "temperature": 0})
        assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] >= 1
    finally:
        head.stop()
    assert not head.pids()
