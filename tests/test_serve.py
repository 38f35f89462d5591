"""jobs.serve on a real local Ray Serve, over real HTTP on 127.0.0.1: every route, batching, bad requests.

The hosted models are the session store's (tests/tiny_data.py): a small GPT,
its int8 quantization, a BERT-style embedding encoder and a classifier, all on
one BPE tokenizer trained on stdlib source. What is checked is that the server
answers exactly what the same artifact computes in this process.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from actors.model_loader import open_runnable
from actors.serve_limits import key_id
from cluster.config import ConfigError, load_config
from cluster.storage import Storage
from jobs import serve as serve_job
from models.hf import save_model
from models.quant import QuantSpec, quantize_model, save_quantized
from models.task_heads import embed
from tiny_data import STORE_LABELS, write_model_artifact
from waiting import metric, poll, ray_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # full tier: the pipeline test runs each component once in make test-fast
KEY = "test-key-0123"
FILE_KEY = "file-key-4567"  # from api_key_file, read by the ingress replica
RATE_KEY, TOKEN_KEY = "rate-key-89ab", "token-key-cdef"  # limited: one request per 5 s; 10 tokens a minute


@pytest.fixture(scope="module")
def server(serve_ports, tiny_store, tmp_path_factory):
    """The session store's models, an int8 copy and a rejected one, served by jobs.serve; yields
    (base URL, storage, config)."""
    store = tiny_store
    root = store.root
    tok = store.open("model", "tiny_gpt").read_bytes("tokenizer.json").decode()
    gpt = _local(store, "tiny_gpt")
    q, desc = quantize_model(gpt, QuantSpec(method="int8"))

    def quantized(d: str) -> list[str]:  # what jobs.quantize writes: the float config, the integer weights
        return sorted(set(save_model(gpt, d)) | set(save_quantized(q, desc, d)))

    write_model_artifact(store, "serve_gpt_int8", quantized, tok)
    key_file = tmp_path_factory.mktemp("secret") / "keys"
    key_file.write_text(f"# one key a line\n\n{FILE_KEY}\n")
    write_model_artifact(store, "serve_gpt_rejected", quantized, tok, rejected=True,
                         quality_gate={"reason": "perplexity moved by +9.00%"})
    cfg = load_config(serve_job.ServeConfig, None, [
        f"storage={root}", "name=test_app", f"http.port={serve_ports['http']}", f"grpc.port={serve_ports['grpc']}",
        f"api_keys=[{KEY}, {RATE_KEY}, {TOKEN_KEY}]", f"api_key_file={key_file}", "max_items=8",
        f"limits={{keys: {{{key_id(RATE_KEY)}: {{requests_per_second: 0.2}}, "
        f"{key_id(TOKEN_KEY)}: {{tokens_per_minute: 10}}}}}}",
        "start_timeout_s=300",  # a starved cluster fails the module in 5 minutes, not the default 10
        "models=[{id: gpt, artifact: tiny_gpt, num_cpus: 0.2}, {id: gpt-int8, artifact: serve_gpt_int8, num_cpus: 0.2},"
        " {id: gpt-narrow, artifact: tiny_gpt, num_cpus: 0.2, max_batch_size: 1, max_ongoing_requests: 1,"
        "  max_queued_requests: 1},"
        " {id: emb, artifact: tiny_enc, task: embed, max_batch_size: 8, batch_wait_s: 0.05, replicas: 2, num_cpus: 0.2},"
        " {id: clf, artifact: tiny_clf, task: classify, num_cpus: 0.2, drain_s: 5}]"])
    url = serve_job.deploy(cfg)
    yield url, store, cfg
    from ray import serve

    serve.delete(cfg.name)


def test_an_app_the_cluster_has_no_room_for_fails_in_one_sentence_and_is_deleted(serve_ports, tiny_store):
    """Before `server` takes the route: a replica asking for more CPUs than the 2-CPU cluster has is
    never placed; the job says so and deletes the app instead of waiting forever."""
    from ray import serve

    from cluster.cli import UserError

    cfg = load_config(serve_job.ServeConfig, None, [
        f"storage={tiny_store.root}", "name=too_big", f"http.port={serve_ports['http']}",
        f"grpc.port={serve_ports['grpc']}", "start_timeout_s=3",
        # drain_s: deleting the never-placed replica waits this long for it to finish its requests
        "models=[{id: gpt, artifact: tiny_gpt, num_cpus: 3, drain_s: 1}]"])
    with pytest.raises(UserError, match=r"^application 'too_big' did not start and was deleted: not serving after "
                                        r"3 s \(start_timeout_s\): deployment '.*' is .*the cluster has .* CPU free$"):
        serve_job.deploy(cfg)
    assert "too_big" not in serve.status().applications  # deleted before the job fails: the route is free


def call(url: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None,
         headers: dict | None = None, with_headers: bool = False):
    """(status, JSON body or text), plus the response headers when asked."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET")
    req.add_header("content-type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text, status, got = r.read().decode(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        text, status, got = e.read().decode(), e.code, dict(e.headers)
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        answer = text
    return (status, answer, {k.lower(): v for k, v in got.items()}) if with_headers else (status, answer)


def _local(store: Storage, name: str):
    return open_runnable(store, name)[0]


def _tok(store: Storage):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(store.open("model", "tiny_gpt").read_bytes("tokenizer.json").decode())


def test_each_deployment_drains_as_its_model_entry_says(server, dashboard_url):
    """Serve's own record of the running app (the dashboard's REST API): each model's drain_s is its
    deployment's graceful shutdown timeout, and every replica checks for finished requests every 0.2 s."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient  # what `serve status` asks

    from actors.serve_app import DRAIN_POLL_S

    _, _, cfg = server
    details = ServeSubmissionClient(dashboard_url).get_serve_details()
    deployments = details["applications"][cfg.name]["deployments"]
    drained = {name: (d["deployment_config"]["graceful_shutdown_timeout_s"],
                      d["deployment_config"]["graceful_shutdown_wait_loop_s"]) for name, d in deployments.items()}
    expected = {f"{m.task}-{m.id}": (m.drain_s, DRAIN_POLL_S) for m in cfg.models}
    assert {name: drained[name] for name in expected} == expected, drained
    assert expected["classify-clf"] == (5, DRAIN_POLL_S) and expected["generate-gpt"] == (20, DRAIN_POLL_S)
    assert all(loop == DRAIN_POLL_S for _, loop in drained.values()), drained  # the ingress's too


def test_health_models_and_the_sample_requests_make_demo_prints(server):
    from ray import serve

    url, store, cfg = server
    assert call(url, "/health", key=None) == (200, {"status": "ok", "models": [
        "clf", "emb", "gpt", "gpt-int8", "gpt-narrow"]})
    status, body = call(url, "/v1/models")
    assert status == 200 and {m["id"]: m["task"] for m in body["data"]} == {
        "gpt": "generate", "gpt-int8": "generate", "gpt-narrow": "generate", "emb": "embed", "clf": "classify"}
    lines = serve_job.samples(cfg, url).splitlines()
    assert [ln.split('"model": "')[1].split('"')[0] for ln in lines if ln.startswith("POST")] == [
        "gpt", "gpt-int8", "gpt-narrow", "emb", "clf"]
    assert "64 floats" in lines[lines.index(next(ln for ln in lines if '"emb"' in ln)) + 1]
    assert lines[-1].endswith("grpc.health.v1.Health/Check -> SERVING")
    assert isinstance(serve_job.app({"storage": store.root, "models": "[{id: g, artifact: tiny_gpt}]"}), serve.Application)


@pytest.mark.parametrize("model,artifact", [("gpt", "tiny_gpt"), ("gpt-int8", "serve_gpt_int8")])
def test_greedy_completion_is_what_the_artifact_generates_here(server, model, artifact):
    url, store, _ = server
    prompt = "def read(path):\n    return"
    status, body = call(url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert status == 200, body
    tok = _tok(store)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    expected = _local(store, artifact).generate(torch.tensor([ids]), 12, temperature=0.0)[0, len(ids):].tolist()
    assert body["choices"][0]["text"] == tok.decode(expected)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}
    assert body["choices"][0]["finish_reason"] == "length" and body["object"] == "text_completion"


def test_streaming_sends_the_same_text_in_pieces_then_done(server):
    url, _, _ = server
    req = {"model": "gpt", "prompt": "import os\n", "max_tokens": 10, "temperature": 0}
    whole = call(url, "/v1/completions", req)[1]["choices"][0]["text"]
    status, text = call(url, "/v1/completions", req | {"stream": True})
    events = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 10


def test_seeded_sampling_repeats_and_stop_strings_cut(server):
    url, _, _ = server
    for seed in range(7, 17):  # a sampled text long enough to cut (an early end of text is possible)
        req = {"model": "gpt", "prompt": "class ", "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": seed}
        a, b = call(url, "/v1/completions", req)[1], call(url, "/v1/completions", req)[1]
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
        text = a["choices"][0]["text"]
        if len(text) > 2:
            break
    assert len(text) > 2, "ten seeds sampled no text of three characters"
    cut = call(url, "/v1/completions", req | {"stop": [text[2]]})[1]["choices"][0]
    assert cut["text"] == text[:text.index(text[2])] and cut["finish_reason"] == "stop"


def test_embeddings_equal_the_in_process_model_for_every_caller_under_concurrency(server):
    url, store, _ = server
    texts = [f"def f{i}(x):\n    return x * {i}" + " + 1" * (i % 7) for i in range(24)]
    with ThreadPoolExecutor(8) as pool:  # single-text requests that the replica batches together
        got = list(pool.map(lambda t: call(url, "/v1/embeddings", {"model": "emb", "input": t}), texts))
    tok = _tok(store)
    model = _local(store, "tiny_enc")
    for t, (status, body) in zip(texts, got):
        ids = torch.tensor([tok.encode(t).ids])
        expected = embed(model, ids, torch.tensor([ids.size(1)]))[0]
        assert status == 200 and torch.allclose(torch.tensor(body["data"][0]["embedding"]), expected, atol=1e-5)
    status, body = call(url, "/v1/embeddings", {"model": "emb", "input": texts[:3], "encoding_format": "base64"})
    floats = [struct.unpack(f"<{64}f", base64.b64decode(d["embedding"])) for d in body["data"]]
    singles = [torch.tensor(b["data"][0]["embedding"]) for _, b in got[:3]]
    assert all(torch.allclose(torch.tensor(f), s, atol=1e-5) for f, s in zip(floats, singles))
    assert body["usage"]["prompt_tokens"] == sum(len(tok.encode(t).ids) for t in texts[:3])


def test_classify_names_labels_with_probabilities(server):
    url, store, _ = server
    texts = ["good", "bad and long " * 5]
    status, body = call(url, "/v1/classify", {"model": "clf", "input": texts})
    assert status == 200
    tok, model = _tok(store), _local(store, "tiny_clf")
    for text, row in zip(texts, body["data"]):
        ids = torch.tensor([tok.encode(text).ids])
        probs = model(ids, torch.tensor([ids.size(1)])).softmax(-1)[0]
        assert row["label"] == STORE_LABELS[int(probs.argmax())]
        assert torch.allclose(torch.tensor([row["probabilities"][n] for n in STORE_LABELS]), probs, atol=1e-5)


BAD = [
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "gpt"}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt", "prompt": [["a"]]}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt", "prompt": [[1, 2], []]}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt", "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt", "prompt": ["a"] * 9}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt", "prompt": ["a", "b"], "stream": True}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "logprobs": "2"}, 400, "logprobs"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "echo": "yes"}, 400, "echo"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "top_k": 0}, 400, "top_k"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "seed": "s"}, 400, "seed"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "gpt", "prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "gpt", "prompt": "word " * 200}, 400, "prompt"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": "emb", "prompt": "x"}, 400, "model"),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/embeddings", {"model": "emb"}, 400, "input"),
    ("/v1/embeddings", {"model": "emb", "input": []}, 400, "input"),
    ("/v1/embeddings", {"model": "emb", "input": ""}, 400, "input"),
    ("/v1/embeddings", {"model": "emb", "input": [1, 2]}, 400, "input"),
    ("/v1/embeddings", {"model": "emb", "input": ["a"] * 9}, 400, "input"),
    ("/v1/embeddings", {"model": "emb", "input": "word " * 100}, 400, "input"),
    ("/v1/embeddings", {"model": "emb", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ("/v1/embeddings", {"model": "gpt", "input": "x"}, 400, "model"),
    ("/v1/classify", {"model": "clf", "input": None}, 400, "input"),
    ("/v1/classify", {"model": "emb", "input": "x"}, 400, "model"),
]


def test_malformed_requests_get_a_4xx_naming_the_field_and_the_server_keeps_serving(server):
    url, _, _ = server
    for path, body, status, param in BAD:
        got, answer = call(url, path, body)
        assert got == status, (body, got, answer)
        assert isinstance(answer, dict) and set(answer["error"]) == {"message", "type", "param", "code"}, answer
        if param:
            assert (answer["error"]["param"] or "").split(".")[0] == param, (body, answer)
    for raw in (b"{not json", b'{"model": "gpt", "prompt": "\xff\xfe"}', b""):
        got, answer = call(url, "/v1/completions", raw=raw)
        assert 400 <= got < 500 and "error" in answer, (raw, got, answer)
    got, answer = call(url, "/v1/completions", raw=b'{"model": "gpt", "prompt": "' + b"a" * (2 << 20) + b'"}')
    assert got == 413 and answer["error"]["code"] == "body_too_large"
    assert call(url, "/health", key=None)[0] == 200
    assert call(url, "/v1/embeddings", {"model": "emb", "input": "word " * 100, "truncate": True})[0] == 200
    assert call(url, "/v1/completions", {"model": "gpt", "prompt": "x", "max_tokens": 2})[0] == 200


def test_the_openapi_document_describes_every_body_answer_and_error_and_the_answers_fit_it(server):
    """GET /openapi.json is a valid OpenAPI 3.1 document: each POST route's request body is the model the
    ingress validates with, each route's answers and error statuses are described, and real answers of
    every route fit their documented shapes (which allow no undocumented field)."""
    from openapi_spec_validator import validate

    from actors import serve_openapi as docs

    url, _, _ = server
    status, doc = call(url, "/openapi.json", key=None)
    assert status == 200
    validate(doc)
    bodies = doc["components"]["schemas"]  # each names the models it can: another is a 404
    assert bodies["CompletionRequest"]["properties"]["model"]["enum"] == ["gpt", "gpt-int8", "gpt-narrow"]
    assert bodies["EmbeddingRequest"]["properties"]["model"]["enum"] == ["emb"]
    for path, (body, answer, _) in docs.ROUTES.items():
        [(method, op)] = doc["paths"][path].items()
        if body is not None:
            assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(body.__name__)
            assert {"400", "401", "404", "413", "429", "503", "504"} <= set(op["responses"]), path
            assert "Retry-After" in op["responses"]["429"]["headers"], path
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(answer.__name__)
        assert op["responses"]["405"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")
    answers = {
        "/health": call(url, "/health", key=None)[1], "/v1/models": call(url, "/v1/models")[1],
        "/v1/completions": call(url, "/v1/completions", {"model": "gpt", "prompt": "x", "max_tokens": 2,
                                                         "logprobs": 1, "echo": True})[1],
        "/v1/chat/completions": call(url, "/v1/chat/completions", {"model": "gpt", "max_tokens": 2,
                                                                   "messages": [{"role": "user", "content": "x"}]})[1],
        "/v1/embeddings": call(url, "/v1/embeddings", {"model": "emb", "input": ["x"]})[1],
        "/v1/classify": call(url, "/v1/classify", {"model": "clf", "input": "x"})[1]}
    for path, answer in answers.items():
        docs.ROUTES[path][1].model_validate(answer)
    docs.ErrorBody.model_validate(call(url, "/v1/completions", {"model": "nope", "prompt": "x"})[1])


# Every check schemathesis has for a stateless API but positive_data_acceptance: a schema cannot say "at most
# the model's context in tokens" of a text, so a schema-valid prompt can get its (documented) 400.
FUZZ_CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
               "response_schema_conformance,negative_data_rejection,missing_required_header,unsupported_method,"
               "allow_header_conformance,ignored_auth")


def test_schemathesis_fuzzing_the_http_api_from_its_document_finds_nothing(server, tmp_path):
    """schemathesis generates requests for every operation from GET /openapi.json (valid and invalid,
    a bounded number, a fixed seed) and checks each answer: no 5xx, every status, header and body as
    documented, invalid data refused, a missing key refused. The server answers normally afterwards."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    url, store, _ = server
    st = Path(sys.executable).parent / "st"
    done = subprocess.run([str(st), "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {KEY}",
                           "--checks", FUZZ_CHECKS, "--max-examples", "10", "--seed", "7", "--request-timeout", "60",
                           "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml")],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "NO_COLOR": "1"})
    summary = done.stdout[-3000:]
    print(summary)  # schemathesis's own account: operations, test cases generated, checks passed
    assert done.returncode == 0, summary
    import xml.etree.ElementTree as ET

    suites = ET.parse(tmp_path / "junit.xml").getroot()
    cases = suites.findall(".//testcase")
    assert len(cases) == 6 and not suites.findall(".//failure") and not suites.findall(".//error"), summary
    assert call(url, "/health", key=None)[0] == 200
    assert call(url, "/v1/completions", {"model": "gpt", "prompt": "x", "max_tokens": 2})[0] == 200


def test_a_method_a_route_does_not_take_is_405_with_allow(server):
    url, _, _ = server
    for method, path, allowed in (("TRACE", "/v1/models", "GET"), ("DELETE", "/v1/completions", "POST"),
                                  ("PUT", "/health", "GET")):
        req = urllib.request.Request(url + path, method=method, headers={"authorization": f"Bearer {KEY}"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 405 and e.value.headers["allow"] == allowed, (method, path, dict(e.value.headers))
        assert json.loads(e.value.read())["error"]["type"] == "invalid_request_error"


def test_api_keys_are_required(server):
    url, _, _ = server
    for key in (None, "wrong", KEY + "x"):
        status, body = call(url, "/v1/models", key=key)
        assert status == 401 and body["error"]["type"] == "authentication_error"
    assert call(url, "/v1/completions", {"model": "gpt", "prompt": "x"}, key=None)[0] == 401
    assert call(url, "/v1/completions", {"prompt": 5}, key=None)[0] == 401  # the key is checked before the body
    assert call(url, "/v1/models", key=FILE_KEY)[0] == 200  # a key from api_key_file
    assert call(url, "/v1/models", key="# one key a line")[0] == 401  # a comment line is no key


def test_only_the_key_over_its_limit_is_throttled_and_each_keys_usage_reaches_the_metrics_by_id(server):
    import grpc

    from actors.proto import helio_pb2 as pb

    url, _, cfg = server
    emb = {"model": "emb", "input": "def f(): pass"}
    # RATE_KEY may send one request per 5 s: of three in a row, the first is answered, the others wait
    got = [call(url, "/v1/embeddings", emb, key=RATE_KEY, with_headers=True) for _ in range(3)]
    assert got[0][0] == 200 and [s for s, _, _ in got[1:]] == [429, 429], [(s, b) for s, b, _ in got]
    for _, body, headers in got[1:]:
        assert body["error"]["code"] == "rate_limit_exceeded" and "requests_per_second" in body["error"]["message"]
        assert 1 <= int(headers["retry-after"]) <= 5, headers
    assert [call(url, "/v1/embeddings", emb)[0] for _ in range(5)] == [200] * 5  # an unlimited key meanwhile
    poll(lambda: call(url, "/v1/embeddings", emb, key=RATE_KEY)[0], lambda s: s == 200, timeout_s=30, every=1)

    # TOKEN_KEY may use 10 tokens a minute: a request of more overdraws it, and the next one is throttled
    prompt = "def read(path):\n    with open(path) as f:\n        return f.read()\n"
    status, first = call(url, "/v1/completions", {"model": "gpt", "prompt": prompt, "max_tokens": 4}, key=TOKEN_KEY)
    assert status == 200 and first["usage"]["total_tokens"] > 10, first
    status, body, headers = call(url, "/v1/completions", {"model": "gpt", "prompt": "x", "max_tokens": 1},
                                 key=TOKEN_KEY, with_headers=True)
    assert status == 429 and "tokens_per_minute" in body["error"]["message"], body
    # 10 tokens a minute refill one every 6 s: the wait covers what the first request overdrew
    assert int(headers["retry-after"]) >= 6 * (first["usage"]["total_tokens"] - 10) - 1, (headers, first["usage"])
    assert call(url, "/v1/completions", {"model": "gpt", "prompt": "x", "max_tokens": 1})[0] == 200
    channel, stub = _grpc(cfg)
    with channel:
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(pb.EmbedRequest(model="emb", input=["x"]), metadata=(("authorization", f"Bearer {TOKEN_KEY}"),),
                       timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens_per_minute" in e.value.details()
    assert re.search(r"retry in \d+\.\d s", e.value.details()), e.value.details()  # the wait, as over HTTP

    # the metrics name keys by id only: the requests each one sent, throttled or not, and its tokens
    rate, token = key_id(RATE_KEY), key_id(TOKEN_KEY)
    text = poll(ray_metrics, lambda t: metric(t, "ray_helio_api_tokens_total", key=token, kind="completion") > 0
                and metric(t, "ray_helio_api_requests_total", key=token, result="throttled") >= 2, timeout_s=120, every=2)
    assert metric(text, "ray_helio_api_tokens_total", key=token, kind="prompt") == first["usage"]["prompt_tokens"]
    assert metric(text, "ray_helio_api_tokens_total", key=token, kind="completion") == \
        first["usage"]["completion_tokens"]
    assert metric(text, "ray_helio_api_requests_total", key=token, route="grpc/Embed", result="throttled") == 1
    assert metric(text, "ray_helio_api_requests_total", key=rate, route="/v1/embeddings", result="throttled") >= 2
    assert metric(text, "ray_helio_api_requests_total", key=rate, result="admitted") >= 2
    assert metric(text, "ray_helio_api_requests_total", key=key_id(KEY), result="throttled") == 0
    assert not any(k in text for k in (KEY, FILE_KEY, RATE_KEY, TOKEN_KEY))


def test_a_rejected_artifact_is_not_served_unless_forced(server, capsys):
    _, store, _ = server
    argv = ["--set", f"storage={store.root}", "--set", "models=[{id: r, artifact: serve_gpt_rejected}]"]
    assert serve_job.main(argv) == 2
    assert "rejected by its quality gate (perplexity moved by +9.00%)" in capsys.readouterr().err
    cfg = load_config(serve_job.ServeConfig, None, [f"storage={store.root}",
                                                   "models=[{id: r, artifact: serve_gpt_rejected, force: true}]"])
    assert serve_job.entries(cfg)[0]["task"] == "generate"


def test_a_quantized_artifact_on_gpu_replicas_is_refused_at_config_time(server):
    """No CUDA integer kernels are wired in: a quantized model on `num_gpus` would run a dequantized copy."""
    _, store, _ = server
    cfg = load_config(serve_job.ServeConfig, None, [f"storage={store.root}",
                                                   "models=[{id: g, artifact: serve_gpt_int8, num_gpus: 1}]"])
    with pytest.raises(ConfigError, match=r"'models\[0\].num_gpus': artifact 'serve_gpt_int8' is int8-quantized and "
                                          r"Helio has no CUDA integer kernels wired in"):
        serve_job.entries(cfg)
    cfg = load_config(serve_job.ServeConfig, None, [f"storage={store.root}",
                                                   "models=[{id: g, artifact: tiny_gpt, num_gpus: 1}]"])
    assert serve_job.entries(cfg)[0]["task"] == "generate"  # a float model may take a GPU


def _greedy_local(store: Storage, artifact: str, prompt: str, n: int) -> str:
    tok = _tok(store)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    return tok.decode(_local(store, artifact).generate(torch.tensor([ids]), n, temperature=0.0)[0, len(ids):].tolist())


def test_concurrent_generations_are_batched_and_each_caller_gets_its_own(server):
    url, store, _ = server
    prompts = [f"def f{i}(" + "x, " * i for i in range(8)]
    with ThreadPoolExecutor(8) as pool:  # the replica decodes these in one running batch
        got = list(pool.map(lambda p: call(url, "/v1/completions", {
            "model": "gpt", "prompt": p, "max_tokens": 20, "temperature": 0}), prompts))
    for p, (status, body) in zip(prompts, got):
        assert status == 200 and body["choices"][0]["text"] == _greedy_local(store, "tiny_gpt", p, 20)


def test_chat_completions_apply_the_template_whole_and_streamed(server):
    from actors.serve_requests import CHAT_STOP, chat_prompt, ChatMessage

    url, store, _ = server
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "open a file"}]
    req = {"model": "gpt", "messages": messages, "max_tokens": 16, "temperature": 0}
    status, body = call(url, "/v1/chat/completions", req)
    assert status == 200 and body["object"] == "chat.completion", body
    expected = _greedy_local(store, "tiny_gpt", chat_prompt([ChatMessage(**m) for m in messages]), 16).split(CHAT_STOP)[0]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["usage"]["completion_tokens"] <= 16
    status, text = call(url, "/v1/chat/completions", req | {"stream": True})
    events = [e[len("data: "):] for e in text.split("\n\n") if e]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == expected
    for bad in ({"model": "gpt", "messages": []}, {"model": "gpt", "messages": [{"role": "robot", "content": "x"}]},
                {"model": "gpt", "messages": [{"role": "user"}]}, {"model": "gpt", "messages": "hi"}):
        status, answer = call(url, "/v1/chat/completions", bad)
        assert status == 400 and answer["error"]["param"].startswith("messages"), (bad, answer)


def _piece(tok, token: int) -> str:
    return tok.decode([token], skip_special_tokens=False)


@pytest.mark.parametrize("model,artifact", [("gpt", "tiny_gpt"), ("gpt-int8", "serve_gpt_int8")])
def test_logprobs_with_echo_are_the_artifacts_log_softmax_whole_streamed_and_over_grpc(server, model, artifact):
    """OpenAI's legacy logprobs: every token of the echoed prompt and the greedy reply with its
    log-probability and the 2 likeliest alternatives; the first prompt token is unscored; offsets index
    the returned text. The values are what the replica's engine computes on the same artifact here
    (1e-4), and that is log_softmax of the model's logits: for the float model, of one forward over
    prompt and reply; for int8, whose activations are quantized per forward (a scale per tensor),
    of one forward over the prompt for the prompt's tokens. Streamed and gRPC chunks carry the same."""
    import asyncio

    from actors.generation_engine import Engine
    from actors.proto import helio_pb2 as pb

    url, store, cfg = server
    tok = _tok(store)
    prompt = "def read(path):\n    return"
    ids = tok.encode(prompt, add_special_tokens=False).ids
    params = {"max_tokens": 6, "temperature": 0.0, "stop_ids": [tok.token_to_id("<|endoftext|>")], "logprobs": 2,
              "prompt_logprobs": True}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replica (num_cpus 0.2: one thread)
    try:
        async def engine_run(model):
            return [t async for piece in Engine(model, 1).generate(ids, params) for t in piece]

        here = asyncio.run(engine_run(_local(store, artifact)))
        every = [t.token for t in here]
        local = _local(store, artifact)
        with torch.no_grad():
            n = len(every) if model == "gpt" else len(ids)
            ref = torch.log_softmax(local(torch.tensor([every[:n]]))[0][0].double(), dim=-1)  # row i scores i + 1
    finally:
        torch.set_num_threads(threads)
    assert every[:len(ids)] == ids and len(every) == len(ids) + 6
    assert all(abs(t.logprob - ref[i - 1, t.token].item()) < 1e-4 for i, t in enumerate(here[1:n], start=1))

    req = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True}
    status, body = call(url, "/v1/completions", req)
    assert status == 200, body
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt + tok.decode(every[len(ids):]) and choice["finish_reason"] == "length"
    assert lp["tokens"] == [_piece(tok, t) for t in every]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    offsets = [0]
    for piece in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(piece))
    assert lp["text_offset"] == offsets and offsets[len(ids)] == len(prompt)
    for i, t in enumerate(here[1:], start=1):
        assert abs(lp["token_logprobs"][i] - t.logprob) < 1e-4, i
        top = lp["top_logprobs"][i]
        assert set(top) == {_piece(tok, x) for x, _ in t.top} | {_piece(tok, t.token)}
        assert all(abs(top[_piece(tok, x)] - v) < 1e-4 for x, v in t.top)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}

    status, text = call(url, "/v1/completions", req | {"stream": True})
    chunks = [json.loads(e[len("data: "):]) for e in text.split("\n\n") if e and e != "data: [DONE]"]
    assert status == 200 and "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    streamed = {k: [v for c in chunks for v in c["choices"][0]["logprobs"][k]] for k in lp}
    assert streamed["tokens"] == lp["tokens"] and streamed["text_offset"] == lp["text_offset"]
    assert all(a == b or abs(a - b) < 1e-5 for a, b in zip(streamed["token_logprobs"][1:], lp["token_logprobs"][1:]))

    channel, stub = _grpc(cfg)
    with channel:
        got = [t for c in stub.Complete(pb.CompleteRequest(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                                           logprobs=2, echo=True), metadata=AUTH, timeout=60)
               for t in c.logprobs]
    assert [t.token for t in got] == lp["tokens"] and [t.text_offset for t in got] == lp["text_offset"]
    assert not got[0].HasField("logprob") and all(t.HasField("logprob") for t in got[1:])
    assert all(abs(t.logprob - w) < 1e-5 for t, w in zip(got[1:], lp["token_logprobs"][1:]))
    assert all({x.token for x in t.top} == set(w) for t, w in zip(got[1:], lp["top_logprobs"][1:]))


def test_token_id_prompts_in_a_batch_are_scored_as_lm_eval_asks(server):
    """What lm-evaluation-harness's local-completions backend sends for loglikelihood requests: several
    token-id prompts, echo, logprobs 1, max_tokens 1, one choice per prompt by index; each prompt's
    scores equal those it gets alone with max_tokens 0 (scored, nothing generated)."""
    url, store, _ = server
    tok = _tok(store)
    texts = ["import os\n", "def f(x):\n    return x", "class A:\n    pass"]
    batch = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    status, body = call(url, "/v1/completions", {"model": "gpt", "prompt": batch, "max_tokens": 1, "temperature": 0,
                                                  "logprobs": 1, "echo": True, "seed": 1234})
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["prompt_tokens"] == sum(map(len, batch)) and body["usage"]["completion_tokens"] == 3
    for text, ids, choice in zip(texts, batch, body["choices"]):
        assert choice["text"].startswith(text) and len(choice["logprobs"]["tokens"]) == len(ids) + 1
        status, alone = call(url, "/v1/completions", {"model": "gpt", "prompt": ids, "max_tokens": 0,
                                                       "logprobs": 1, "echo": True})
        scored = alone["choices"][0]
        assert status == 200 and scored["text"] == text and alone["usage"]["completion_tokens"] == 0
        assert scored["logprobs"]["tokens"] == choice["logprobs"]["tokens"][:-1]
        assert all(a is b is None or abs(a - b) < 1e-5
                   for a, b in zip(scored["logprobs"]["token_logprobs"], choice["logprobs"]["token_logprobs"]))
    status, body = call(url, "/v1/completions", {"model": "gpt", "prompt": "x = 1", "max_tokens": 0, "echo": True})
    assert status == 200 and body["choices"][0]["text"] == "x = 1" and body["choices"][0]["logprobs"] is None


def _grpc(cfg):
    import grpc

    from actors.proto import helio_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{cfg.grpc.port}")
    return channel, helio_pb2_grpc.HelioStub(channel)


AUTH = (("authorization", f"Bearer {KEY}"),)


def test_grpc_api_answers_what_http_answers(server):
    from actors.proto import helio_pb2 as pb

    url, _, cfg = server
    channel, stub = _grpc(cfg)
    with channel:
        req = pb.CompleteRequest(model="gpt", prompt="import os\n", max_tokens=10, temperature=0)
        chunks = list(stub.Complete(req, metadata=AUTH, timeout=60))
        http = call(url, "/v1/completions", {"model": "gpt", "prompt": "import os\n", "max_tokens": 10,
                                              "temperature": 0})[1]
        assert "".join(c.text for c in chunks) == http["choices"][0]["text"]
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 10
        assert all(not c.finish_reason and not c.HasField("usage") for c in chunks[:-1])
        texts = ["read a file", "sort a list of numbers"]
        reply = stub.Embed(pb.EmbedRequest(model="emb", input=texts), metadata=AUTH, timeout=60)
        http = call(url, "/v1/embeddings", {"model": "emb", "input": texts})[1]
        for got, want in zip(reply.data, http["data"]):
            assert torch.allclose(torch.tensor(list(got.values)), torch.tensor(want["embedding"]), atol=1e-6)
        assert reply.usage.prompt_tokens == http["usage"]["prompt_tokens"]
        reply = stub.Classify(pb.ClassifyRequest(model="clf", input=texts), metadata=AUTH, timeout=60)
        http = call(url, "/v1/classify", {"model": "clf", "input": texts})[1]
        assert [c.label for c in reply.data] == [d["label"] for d in http["data"]]
        assert all(abs(c.probabilities[k] - v) < 1e-6 for c, d in zip(reply.data, http["data"])
                   for k, v in d["probabilities"].items())


GRPC_DOCUMENTED = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                   "DEADLINE_EXCEEDED")


def test_grpc_fuzzing_gets_only_documented_status_codes_and_the_server_stays_healthy(server):
    """Hypothesis sends every method of helio.v1.Helio requests with random field values (any model id,
    any text, extreme and non-finite numbers, long stop lists, any key) and raw random bytes that are
    not a valid message: every answer carries a documented status, never INTERNAL or UNKNOWN; the
    health service says SERVING afterwards."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    from actors.proto import helio_pb2 as pb

    _, _, cfg = server
    channel, stub = _grpc(cfg)
    seen: dict[str, int] = {}

    def status(call) -> str:
        try:
            call()
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        seen[code] = seen.get(code, 0) + 1
        return code

    models = st.sampled_from(["gpt", "gpt-int8", "emb", "clf", "nope", ""]) | st.text(max_size=8)
    texts = st.text(max_size=40)
    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
    i32 = st.integers(-2**31, 2**31 - 1)
    metadata = st.sampled_from([AUTH, (("authorization", "Bearer nope"),), ()])
    complete = st.builds(pb.CompleteRequest, model=models, prompt=texts, max_tokens=st.none() | i32,
                         temperature=st.none() | floats, top_p=st.none() | floats, top_k=st.none() | i32,
                         seed=st.none() | st.integers(-2**63, 2**63 - 1), stop=st.lists(texts, max_size=6),
                         logprobs=st.none() | i32, echo=st.booleans())
    inputs = st.builds(lambda cls, m, i, t: cls(model=m, input=i, truncate=t),
                       st.sampled_from([pb.EmbedRequest, pb.ClassifyRequest]), models, st.lists(texts, max_size=10),
                       st.booleans())

    @seed(11)
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(complete, inputs, metadata, st.binary(max_size=64))
    def fuzz(req, per_input, meta, raw):
        kw = {"metadata": meta, "timeout": 30}
        assert status(lambda: list(stub.Complete(req, **kw))) in GRPC_DOCUMENTED, req
        rpc = stub.Embed if isinstance(per_input, pb.EmbedRequest) else stub.Classify
        assert status(lambda: rpc(per_input, **kw)) in GRPC_DOCUMENTED, per_input
        for method in ("Embed", "Classify"):  # bytes that need not be a message at all
            send = channel.unary_unary(f"/helio.v1.Helio/{method}")  # no serializer: raw bytes both ways
            assert status(lambda: send(raw, **kw)) in GRPC_DOCUMENTED, (method, raw)

    with channel:
        fuzz()
        fuzzed = dict(seen)
        # and well-formed requests of every method still succeed after it (random fields rarely make one)
        assert status(lambda: list(stub.Complete(pb.CompleteRequest(model="gpt", prompt="def f(", max_tokens=4),
                                                 metadata=AUTH, timeout=60))) == "OK"
        assert status(lambda: stub.Embed(pb.EmbedRequest(model="emb", input=["x"]), metadata=AUTH, timeout=60)) == "OK"
        assert status(lambda: stub.Classify(pb.ClassifyRequest(model="clf", input=["x"]), metadata=AUTH,
                                            timeout=60)) == "OK"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert sum(fuzzed.values()) == 60 * 4 and {"INVALID_ARGUMENT", "UNAUTHENTICATED"} <= set(fuzzed), fuzzed
    print("gRPC fuzzing, status codes:", fuzzed)


def test_grpc_errors_carry_status_codes_and_the_health_service_answers(server):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from actors.proto import helio_pb2 as pb

    _, _, cfg = server
    channel, stub = _grpc(cfg)

    def code(rpc, req, metadata=AUTH, timeout=60):
        try:
            out = rpc(req, metadata=metadata, timeout=timeout)
            list(out) if rpc is stub.Complete else out
        except grpc.RpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""

    with channel:
        assert code(stub.Embed, pb.EmbedRequest(model="emb", input=["x"]), metadata=None)[0] == \
            grpc.StatusCode.UNAUTHENTICATED
        assert code(stub.Embed, pb.EmbedRequest(model="emb", input=["x"]),
                    metadata=(("authorization", "Bearer nope"),))[0] == grpc.StatusCode.UNAUTHENTICATED
        status, details = code(stub.Complete, pb.CompleteRequest(model="gpt", prompt="x", max_tokens=0))
        assert status == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in details
        status, details = code(stub.Complete, pb.CompleteRequest(model="gpt", prompt="x", temperature=3))
        assert status == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in details
        assert code(stub.Embed, pb.EmbedRequest(model="emb"))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert code(stub.Classify, pb.ClassifyRequest(model="nope", input=["x"]))[0] == grpc.StatusCode.NOT_FOUND
        assert code(stub.Complete, pb.CompleteRequest(model="gpt", prompt="x", max_tokens=50),
                    timeout=0.001)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "helio.v1.Helio", "emb", "gpt-int8"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=60)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert code(stub.Embed, pb.EmbedRequest(model="emb", input=["x"]))[0] == grpc.StatusCode.OK


def test_an_overloaded_model_answers_503_with_retry_after_never_500(server):
    url, _, _ = server
    req = {"model": "gpt-narrow", "prompt": "def ", "max_tokens": 60, "temperature": 0}
    with ThreadPoolExecutor(12) as pool:  # one running, one queued, the rest turned away
        got = list(pool.map(lambda _: call(url, "/v1/completions", req, with_headers=True), range(12)))
    statuses = sorted(s for s, _, _ in got)
    assert set(statuses) <= {200, 503} and statuses[0] == 200 and statuses[-1] == 503, statuses
    for status, body, headers in got:
        if status == 503:
            assert headers["retry-after"] == "1" and body["error"]["code"] == "overloaded", (body, headers)
    assert call(url, "/v1/completions", req)[0] == 200


def test_an_overloaded_model_is_resource_exhausted_over_grpc(server):
    import grpc

    from actors.proto import helio_pb2 as pb

    _, _, cfg = server
    channel, stub = _grpc(cfg)

    def one(_) -> grpc.StatusCode:
        try:
            list(stub.Complete(pb.CompleteRequest(model="gpt-narrow", prompt="def ", max_tokens=60, temperature=0),
                               metadata=AUTH, timeout=60))
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    with channel, ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(one, range(12)))
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes


def test_the_deadline_holds_whatever_timeout_headers_a_client_sends(server):
    from ray import serve

    url, store, cfg = server
    quick = load_config(serve_job.ServeConfig, None, [
        f"storage={store.root}", "name=quick_app", "http.request_timeout_s=0.001",
        "models=[{id: gpt, artifact: tiny_gpt, num_cpus: 0.1}]"])
    serve.run(serve_job.build_app(quick), name="quick_app", route_prefix="/quick")
    try:
        req = {"model": "gpt", "prompt": "def ", "max_tokens": 60, "temperature": 0}
        for headers in ({}, {"x-request-timeout-seconds": "0"}, {"x-request-timeout-seconds": "3600",
                                                                 "x-request-disconnect-disabled": "?1"}):
            status, body = call(url, "/quick/v1/completions", req, headers=headers, key=None)
            assert status == 504 and body["error"]["code"] == "timeout", (headers, status, body)
        assert call(url, "/quick/health", key=None)[0] == 200
        import grpc

        from actors.proto import helio_pb2 as pb

        channel, stub = _grpc(cfg)
        with channel, pytest.raises(grpc.RpcError) as e:  # the same deadline over gRPC
            list(stub.Complete(pb.CompleteRequest(model="gpt", prompt="def ", max_tokens=60),
                               metadata=(("application", "quick_app"),), timeout=60))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value
    finally:
        serve.delete("quick_app")


def test_a_replica_killed_under_load_fails_only_in_flight_requests_and_comes_back(server):
    import ray
    from ray import serve

    url, _, _ = server
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and "embed-emb#" in a["name"])
    statuses: list[int] = []

    def one(i: int) -> int:
        if i == 60:  # a third of the way through, with 8 requests in flight
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        return call(url, "/v1/embeddings", {"model": "emb", "input": f"def f{i}(): pass"})[0]

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(200)))
    failed = [s for s in statuses if s != 200]
    print(f"replica killed under load: {len(failed)} of {len(statuses)} requests failed {sorted(set(failed))}")
    assert len(failed) <= 8 and set(failed) <= {503}, statuses

    def replaced() -> bool:  # Serve noticed, started another, and the deployment is whole again
        replicas = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["namespace"] == "serve" and "embed-emb#" in a["name"]}
        dep = serve.status().applications["test_app"].deployments["embed-emb"]
        return (name not in replicas and len(replicas) == 2 and dep.status == "HEALTHY"
                and dep.replica_states.get("RUNNING") == 2)

    deadline = time.monotonic() + 120
    while not replaced():
        if time.monotonic() > deadline:
            pytest.fail("embed-emb did not come back to 2 running replicas within 120 s")
        time.sleep(0.5)
    assert call(url, "/v1/embeddings", {"model": "emb", "input": "still here"})[0] == 200
