"""A Llama-family checkpoint served by jobs.serve over real HTTP and gRPC: chat renders its own chat
template and ends at its own end-of-turn ids, answering what `transformers` generates; an imported
checkpoint without a template answers chat with a 400 that says so; the same weights without the LM
head serve embeddings as transformers' LlamaModel pools them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from actors.model_import import import_model
from models.hf_llama import load_llama, save_llama
from served import deployed
from test_serve import AUTH, KEY, _grpc, call
from tiny_hf import save_family

pytestmark = [pytest.mark.ray, pytest.mark.slow]
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Read a file."}]


@pytest.fixture(scope="module")
def llama(serve_ports, tiny_store, tmp_path_factory):
    """(base URL, config, the transformers model, its folder): the checkpoint imported twice, with its
    chat template and without one, and served."""
    folder = tmp_path_factory.mktemp("llama-chat")
    hf = save_family("llama", folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    plain = tmp_path_factory.mktemp("llama-plain") / "src"
    shutil.copytree(folder, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    embedder = tmp_path_factory.mktemp("llama-embed") / "src"  # the same weights, headless (LlamaModel)
    shutil.copytree(folder, embedder)
    for weights in [*embedder.glob("*.safetensors"), *embedder.glob("*.safetensors.index.json")]:
        weights.unlink()
    save_llama(load_llama(folder).drop_lm_head(), embedder)
    import_model(tiny_store, str(folder), "serve_llama")
    import_model(tiny_store, str(plain), "serve_llama_plain")
    import_model(tiny_store, str(embedder), "serve_llama_embed")
    with deployed(tiny_store.root, "llama_app", serve_ports, KEY, "[{id: llama, artifact: serve_llama, num_cpus: 0.2}, "
                  "{id: llama-plain, artifact: serve_llama_plain, num_cpus: 0.2, max_context: 48}, "
                  "{id: llama-embed, artifact: serve_llama_embed, task: embed, num_cpus: 0.2}]") as (url, cfg):
        yield url, cfg, hf, folder, embedder


def _expected(hf, folder, ids: list[int], n: int) -> tuple[list[int], str]:
    """transformers' greedy tokens for `ids`, cut before the first end-of-turn id, and the finish reason."""
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=[2, 1],
                      pad_token_id=3)[0, len(ids):].tolist()
    end = next((i for i, t in enumerate(out) if t in (1, 2)), None)
    return (out, "length") if end is None else (out[:end], "stop")


def _decode(folder, tokens: list[int]) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).decode(tokens)  # special tokens skipped


def test_chat_uses_the_checkpoints_template_and_answers_what_transformers_generates(llama):
    url, _, hf, folder, _ = llama
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    tokens, finish = _expected(hf, folder, ids, 24)
    status, body = call(url, "/v1/chat/completions", {"model": "llama", "messages": MESSAGES, "max_tokens": 24,
                                                      "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == _decode(folder, tokens)
    assert body["choices"][0]["finish_reason"] == finish
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_completions_over_grpc_equal_http_on_the_grouped_query_cache(llama):
    from actors.proto import helio_pb2 as pb

    url, cfg, hf, folder, _ = llama
    prompt = "def read(path):"
    http = call(url, "/v1/completions", {"model": "llama", "prompt": prompt, "max_tokens": 12, "temperature": 0})[1]
    ids = AutoTokenizer.from_pretrained(folder)(prompt, add_special_tokens=False)["input_ids"]
    tokens, _ = _expected(hf, folder, ids, 12)
    assert http["choices"][0]["text"] == _decode(folder, tokens)
    channel, stub = _grpc(cfg)
    with channel:
        chunks = list(stub.Complete(pb.CompleteRequest(model="llama", prompt=prompt, max_tokens=12, temperature=0),
                                    metadata=AUTH, timeout=60))
    assert "".join(c.text for c in chunks) == http["choices"][0]["text"]


def test_a_checkpoint_without_a_chat_template_answers_chat_with_a_400(llama):
    url = llama[0]
    status, body = call(url, "/v1/chat/completions", {"model": "llama-plain", "messages": MESSAGES})
    assert status == 400 and body["error"]["param"] == "messages"
    assert "model 'llama-plain' has no chat template" in body["error"]["message"]
    status, body = call(url, "/v1/completions", {"model": "llama-plain", "prompt": "def", "max_tokens": 4})
    assert status == 200 and body["usage"]["completion_tokens"] <= 4


def test_a_context_cap_below_the_checkpoints_own_bounds_prompt_and_reply(llama):
    """llama-plain is served with max_context 48 (its checkpoint has 96 positions)."""
    url, _, hf, folder, _ = llama
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = "def read(path): return open(path).read()\n" * 6
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert 48 <= n < 96
    status, body = call(url, "/v1/completions", {"model": "llama-plain", "prompt": prompt, "max_tokens": 4})
    assert status == 400 and f"prompt: {n} tokens, the model's context is 48" in body["error"]["message"], body
    short = "def read(path):"
    ids = tok(short, add_special_tokens=False)["input_ids"]
    tokens, finish = _expected(hf, folder, ids, 48 - len(ids))
    assert finish == "length"  # this model does not stop early from this prompt: the cap is what ends it
    status, body = call(url, "/v1/completions", {"model": "llama-plain", "prompt": short, "max_tokens": 200,
                                                 "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 48 - len(ids), body["usage"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == _decode(folder, tokens)


def test_a_headless_llama_serves_embeddings_of_its_last_token_as_transformers_computes_them(llama):
    from transformers import AutoModel

    url, *_, embedder = llama
    texts = ["open a file", "def read(path): return open(path).read()"]
    status, body = call(url, "/v1/embeddings", {"model": "llama-embed", "input": texts})
    assert status == 200, body
    tok = AutoTokenizer.from_pretrained(embedder)
    hf = AutoModel.from_pretrained(embedder).eval()
    for text, item in zip(texts, body["data"]):
        ids = tok(text, return_tensors="pt")["input_ids"]  # the tokenizer's own specials, as served
        with torch.no_grad():
            expected = torch.nn.functional.normalize(hf(input_ids=ids).last_hidden_state[0, -1], dim=-1)
        assert (torch.tensor(item["embedding"]) - expected).abs().max().item() <= 1e-4
