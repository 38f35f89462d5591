"""jobs.evaluate: lm-evaluation-harness scores a model on Helio's offline tasks in-process (its HF
backend) and as served (its local-completions client over Helio's HTTP API on loopback), and the two
agree; a quantized model is scored served."""

from __future__ import annotations

import json

import pytest
import torch

from actors.evaluate import TASKS, task_documents
from cluster.config import ConfigError, load_config
from cluster.storage import Storage
from jobs import evaluate as evaluate_job
from jobs import serve as serve_job
from tiny_data import stdlib_sft_rows, write_sft_tasks

KEY = "eval-key-0123"


def test_task_documents_fit_the_context_are_seeded_and_what_is_left_out_is_counted():
    rows = stdlib_sft_rows()
    count = len  # a character per token: a stand-in tokenizer with a known count
    docs, dropped = task_documents(rows, count, 400, 10, seed=0)
    assert all(len(docs[t]) == 10 for t in TASKS), {t: len(d) for t, d in docs.items()}
    for d in docs["helio_docstring_choice"]:
        assert len(d["choices"]) == len(set(d["choices"])) == 4 and all(len(d["prompt"] + c) + 1 < 400
                                                                      for c in d["choices"])
        own = next(r["response"] for r in rows if r["prompt"] == d["prompt"])
        assert own.startswith(d["choices"][d["gold"]])
    assert all(len(d["text"]) + 2 < 400 for d in docs["helio_code_perplexity"])
    for d in docs["helio_signature_exact"]:
        assert d["signature"].startswith(("def ", "async def ")) and "\n" not in d["signature"]
    assert sum(dropped["helio_code_perplexity"].values()) > 0  # stdlib functions longer than 400 characters
    assert set(dropped["helio_code_perplexity"]) == {"longer than the context"}
    assert task_documents(rows, count, 400, 10, seed=0) == (docs, dropped)
    assert task_documents(rows, count, 400, 10, seed=1)[0] != docs


@pytest.fixture(scope="module")
def store_and_app(tiny_store, serve_ports):
    """A tasks artifact of held-out stdlib functions, a GPT with a 128-token context on the session's
    tokenizer and its int8 copy, both served; yields (storage, HTTP URL)."""
    from ray import serve
    from tokenizers import Tokenizer

    from models.gpt import GPT, GPTConfig
    from models.hf import save_model
    from models.quant import QuantSpec, quantize_model, save_quantized
    from tiny_data import write_model_artifact

    store = tiny_store
    write_sft_tasks(store, "eval_tasks")
    tok = store.open("model", "tiny_gpt").read_bytes("tokenizer.json").decode()
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=Tokenizer.from_str(tok).get_vocab_size(), block_size=128, n_layer=2, n_head=2,
                        n_embd=64)).eval()
    q, desc = quantize_model(gpt, QuantSpec(method="int8"))
    write_model_artifact(store, "eval_gpt", lambda d: save_model(gpt, d), tok)
    write_model_artifact(store, "eval_gpt_int8",
                         lambda d: sorted(set(save_model(gpt, d)) | set(save_quantized(q, desc, d))), tok)
    cfg = load_config(serve_job.ServeConfig, None, [
        f"storage={store.root}", "name=eval_app", f"http.port={serve_ports['http']}",
        f"grpc.port={serve_ports['grpc']}", f"api_keys=[{KEY}]", "start_timeout_s=300",
        "models=[{id: gpt, artifact: eval_gpt, num_cpus: 0.2}, {id: gpt-int8, artifact: eval_gpt_int8, num_cpus: 0.2}]"])
    url = serve_job.deploy(cfg)
    yield store, url
    serve.delete(cfg.name)


def _evaluate(store: Storage, *overrides: str) -> dict:
    cfg = load_config(evaluate_job.EvaluateConfig, None, [f"storage={store.root}", "tasks_artifact=eval_tasks",
                                                          "limit=12", "batch_size=4", "num_cpus=0.5", *overrides])
    return evaluate_job.run(cfg)


@pytest.mark.ray
@pytest.mark.slow
def test_lm_eval_in_process_and_served_agree_and_the_int8_model_is_scored_served(store_and_app, monkeypatch, capsys):
    store, url = store_and_app
    monkeypatch.setenv("HELIO_API_KEY", KEY)
    manifest = _evaluate(store, "name=eval_float", "model=eval_gpt", f"served.url={url}", "served.model=gpt")
    art = store.open("evaluation", "eval_float")
    report = json.loads(art.read_bytes("results.json"))
    assert set(report["results"]) == {"in_process", "served"}
    assert report["backends"] == {"in_process": "hf", "served": "local-completions"}
    for backend in ("in_process", "served"):
        assert set(report["results"][backend]) == set(TASKS)
        choice = report["results"][backend]["helio_docstring_choice"]
        assert 0 <= choice["acc,none"] <= 1 and choice["sample_len"] == report["documents"]["helio_docstring_choice"]
        assert report["results"][backend]["helio_code_perplexity"]["byte_perplexity,none"] > 1
    agreement = report["agreement"]
    assert {k.split("/")[0] for k in agreement} == set(TASKS)
    assert all(a["agree"] for a in agreement.values()), agreement
    ppl = agreement["helio_code_perplexity/byte_perplexity"]  # the same float model: the same loglikelihoods
    assert ppl["difference"] <= 1e-3 * ppl["in_process"], ppl
    assert manifest["evaluation"]["lm_eval"] == "0.4.13" and manifest["evaluation"]["agree"] is True
    assert {p["name"] for p in manifest["parents"]} == {"eval_gpt", "eval_tasks"}
    assert manifest["metrics"]["served/helio_docstring_choice/acc"] == report["results"]["served"][
        "helio_docstring_choice"]["acc,none"]
    assert {f"tasks/{t}.{ext}" for t in TASKS for ext in ("yaml", "jsonl")} <= set(art.manifest["files"])
    assert "evaluation summary" in capsys.readouterr().out

    # the int8 model: in-process through Helio's loader (the kernels serving uses) and served agree
    _evaluate(store, "name=eval_int8", "model=eval_gpt_int8", f"served.url={url}", "served.model=gpt-int8")
    int8 = json.loads(store.open("evaluation", "eval_int8").read_bytes("results.json"))
    assert int8["backends"] == {"in_process": "helio", "served": "local-completions"}
    assert all(a["agree"] for a in int8["agreement"].values()), int8["agreement"]
    # and it is the float model within quantization error: perplexity moved, by less than a few percent
    float_ppl = report["results"]["served"]["helio_code_perplexity"]["byte_perplexity,none"]
    int8_ppl = int8["results"]["served"]["helio_code_perplexity"]["byte_perplexity,none"]
    assert abs(int8_ppl - float_ppl) < 0.05 * float_ppl and int8_ppl != float_ppl

    with pytest.raises(ConfigError, match="in_process.*quantized.*helio"):
        _evaluate(store, "name=x", "model=eval_gpt_int8", "in_process=hf")


def test_bad_evaluate_configs_are_one_sentence(tiny_store):
    from cluster.cli import UserError

    with pytest.raises(ConfigError, match="tasks.*nope unknown"):
        load_config(evaluate_job.EvaluateConfig, None, ["tasks=[nope]"])
    with pytest.raises(ConfigError, match="served.model"):
        load_config(evaluate_job.EvaluateConfig, None, ["served.url=http://127.0.0.1:1"])
    with pytest.raises(ConfigError, match="nothing would be scored"):
        load_config(evaluate_job.EvaluateConfig, None, ["in_process=none"])
    with pytest.raises(ConfigError, match="in_process.*not one of auto, hf, helio, none"):
        load_config(evaluate_job.EvaluateConfig, None, ["in_process=gpu"])
    with tiny_store.create("task", "eval_no_sft", {"test": True}) as out:
        out.write_bytes("classify/val.jsonl", b"{}\n")
    with pytest.raises(UserError, match="no sft/val.jsonl"):
        _evaluate(tiny_store, "name=y", "model=tiny_gpt", "tasks_artifact=eval_no_sft")
