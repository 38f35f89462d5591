"""`engine: vllm` served by jobs.serve over real HTTP and gRPC, with vLLM's CPU build (make test-vllm runs
this module in its own environment, .venv-vllm; in Helio's own it is deselected, since vLLM is not
installed there). A Llama-family checkpoint with Llama 3.1's rope scaling and grouped-query attention is
served twice, by Helio's engine and by vLLM, behind the same front, and a GPT-2 checkpoint by vLLM:
each answers what `transformers` computes (greedy tokens, log-probabilities), streams what it answers
whole, and passes Serve's health checks; a checkpoint whose head size vLLM's CPU kernels lack is refused when the config is read."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from actors.model_import import import_model
from cluster.config import load_config
from cluster.storage import Storage
from jobs import serve as serve_job
from test_serve import AUTH, KEY, _grpc, call
from served import deployed
from test_serve_llama import MESSAGES, _decode
from tiny_hf import save_family, tokenizer

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
MODELS = ("helio", "vllm")
VLLM = "engine: vllm, num_cpus: 0.5, max_batch_size: 4, max_ongoing_requests: 8"


def save_gpt2(folder):
    """A tiny GPT-2 built by `transformers` (head_dim 32), with tiny_hf's tokenizer; returns the model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=96, n_embd=128, n_layer=2, n_head=4, bos_token_id=0,
                                    eos_token_id=2, initializer_range=0.1)).eval()
    hf.save_pretrained(folder)
    tokenizer(["def read(path):\n    return open(path).read()\n", "hello world, hello tokens"] * 20).save(
        str(folder / "tokenizer.json"))
    return hf


@pytest.fixture(scope="module")
def served(serve_ports, tmp_path_factory):
    """(base URL, config, {"llama": (transformers model, folder), "gpt": ...}): the Llama served by each
    engine (`helio`, `vllm`), the GPT-2 by vLLM (`vllm-gpt`)."""
    llama, gpt = tmp_path_factory.mktemp("vllm-llama"), tmp_path_factory.mktemp("vllm-gpt")
    models = {"llama": (save_family("llama", llama, hidden_size=128, head_dim=32), llama),  # vLLM's CPU
              "gpt": (save_gpt2(gpt), gpt)}  # kernels start at head_dim 32
    store = Storage(str(tmp_path_factory.mktemp("vllm-store")))
    import_model(store, str(llama), "llama")
    import_model(store, str(gpt), "gpt")
    with deployed(store.root, "vllm_app", serve_ports, KEY, f"[{{id: helio, artifact: llama, num_cpus: 0.2}}, "
                  f"{{id: vllm, artifact: llama, {VLLM}}}, {{id: vllm-gpt, artifact: gpt, {VLLM}}}]") as (url, cfg):
        yield url, cfg, models


def _greedy(hf, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens after `ids` (no early stop) and, at each, the gap between the best
    and the second-best logit: where that gap is a rounding error, two fp32 engines may choose apart."""
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=3,
                      output_logits=True, return_dict_in_generate=True)
    gaps = [float(g[0, 0] - g[0, 1]) for g in (step.topk(2, dim=-1).values for step in out.logits)]
    return out.sequences[0, len(ids):].tolist(), gaps


def _sure(want: list[int], gaps: list[float], tol: float = 1e-4) -> int:
    """How many of transformers' greedy tokens any fp32 engine must reproduce: those before the first
    whose lead over the runner-up is within `tol` (a tie, which kernels may break either way) and before
    the first end-of-text id (where the served model stops)."""
    return next((i for i, (t, g) in enumerate(zip(want, gaps)) if g < tol or t in (1, 2)), len(want))


@pytest.mark.parametrize("model, checkpoint", [("helio", "llama"), ("vllm", "llama"), ("vllm-gpt", "gpt")])
def test_completions_answer_what_transformers_generates(served, model, checkpoint):
    url, _, models = served
    hf, folder = models[checkpoint]
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode("def read(path):", add_special_tokens=False).ids
    want, gaps = _greedy(hf, ids, 16)
    status, body = call(url, "/v1/completions", {"model": model, "prompt": ids, "max_tokens": 16, "temperature": 0})
    assert status == 200, body
    sure = _sure(want, gaps)
    assert sure >= 4, "the fixture's model should lead clearly for a few tokens"
    assert body["choices"][0]["text"].startswith(_decode(folder, want[:sure]))
    assert sure <= body["usage"]["completion_tokens"] <= 16 and body["usage"]["prompt_tokens"] == len(ids)


def test_both_engines_score_a_prompt_as_transformers_does(served):
    """echo + logprobs + max_tokens 0 (how lm-evaluation-harness scores): each prompt token's log-probability
    and its top alternatives, from vLLM's prompt_logprobs as from Helio's engine."""
    url, _, models = served
    hf, folder = models["llama"]
    ids = AutoTokenizer.from_pretrained(folder)("hello world, hello tokens", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    for model in MODELS:
        status, body = call(url, "/v1/completions", {"model": model, "prompt": ids, "max_tokens": 0, "echo": True,
                                                     "logprobs": 2, "temperature": 0})
        assert status == 200, (model, body)
        lp = body["choices"][0]["logprobs"]
        assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
        for i in range(1, len(ids)):
            # fp32 logits over a 320-token vocabulary: agreement far inside 1e-3
            assert abs(lp["token_logprobs"][i] - float(want[i - 1, ids[i]])) < 1e-3, (model, i)
            assert len(lp["top_logprobs"][i]) >= 2


def test_chat_streams_over_http_and_grpc_what_it_answers_whole(served):
    from actors.proto import helio_pb2 as pb

    url, cfg, _ = served
    whole = call(url, "/v1/chat/completions", {"model": "vllm", "messages": MESSAGES, "max_tokens": 12,
                                               "temperature": 0})[1]
    channel, stub = _grpc(cfg)
    with channel:
        chunks = list(stub.Complete(pb.CompleteRequest(model="vllm", prompt="def read(path):", max_tokens=12,
                                                       temperature=0), metadata=AUTH, timeout=60))
    http = call(url, "/v1/completions", {"model": "vllm", "prompt": "def read(path):", "max_tokens": 12,
                                         "temperature": 0})[1]
    assert "".join(c.text for c in chunks) == http["choices"][0]["text"]
    assert whole["choices"][0]["finish_reason"] in ("stop", "length")
    assert whole["usage"]["completion_tokens"] <= 12


def test_sampling_is_seeded_and_the_replica_is_healthy(served):
    url = served[0]
    body = {"model": "vllm", "prompt": "def", "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first, again = (call(url, "/v1/completions", body)[1]["choices"][0]["text"] for _ in range(2))
    assert first == again
    texts = {call(url, "/v1/completions", {**body, "seed": s})[1]["choices"][0]["text"] for s in range(6)}
    assert len(texts) > 1  # six seeds at temperature 1 from a random model: not one answer
    from ray import serve

    status = serve.status().applications["vllm_app"]
    assert status.deployments["generate-vllm"].status == "HEALTHY"
    status, body = call(url, "/health", key=None)
    assert status == 200, body


def test_a_head_size_vllms_cpu_kernels_lack_is_refused_at_config_time(tmp_path):
    """tiny_hf's own Llama has head_dim 16, below the smallest CPU kernel: refused in one sentence, where
    the engine would otherwise die at the first request."""
    from actors.serve_app import entries
    from cluster.config import ConfigError

    save_family("llama", tmp_path / "narrow")
    store = Storage(str(tmp_path / "store"))
    import_model(store, str(tmp_path / "narrow"), "narrow")
    cfg = load_config(serve_job.ServeConfig, None, [f"storage={store.root}", "models=[{id: n, artifact: narrow, "
                                                                             "engine: vllm}]"])
    with pytest.raises(ConfigError, match=r"'models\[0\]\.engine': artifact 'narrow': vLLM's CPU build has no "
                                          r"attention kernel for head_dim 16"):
        entries(cfg)
