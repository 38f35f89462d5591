"""jobs.quantize on a real local Ray cluster: quantize on a worker, score in parallel tasks, gate, load back.

The model is the session store's small GPT (tests/tiny_data.py), trained on real text (a few stdlib
modules) with the activation outliers trained LLMs show planted in it (a few LayerNorm
channels 30x louder, Dettmers et al. 2022), fitted for 400 steps to the very
blocks the job scores. It is not at a minimum of that loss, and each CPU's float
GEMMs train it to a different point: there a perplexity delta has no sign of its
own (int4 scored -0.7% on one CPU, +1.5% on another). So the assertions rest on
what holds wherever it runs: the gate against the job's budget, int8's delta
against the spread of its rounding-noise model, AWQ's own objective on its
calibration data, and a cosine delta that rounding can only make positive.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from actors.model_loader import feed, load_runnable, open_runnable
from cluster.config import ConfigError, load_config
from cluster.storage import ArtifactError, Storage, write_parquet_file
from jobs import quantize
from models.encoder import Encoder, EncoderConfig
from models.hf import save_classifier, save_model
from models.quant import QuantSpec, collect_inputs, kernels_used, quantize_model
from models.task_heads import SequenceClassifier
from quant_noise import rounding_noise

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # full tier: the pipeline test runs each component once in make test-fast
BLOCK_LEN = 65
FAST = ["eval.max_examples=24", "eval.iters=3", "eval.seq_len=32", "eval.decode_tokens=8", "eval.threads=1",
        "calibration.samples=8"]


def _write_model(store: Storage, name: str, write, tokenizer_json: str, parents: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as d, store.create("model", name, {"test": True}, parents=parents) as out:
        for f in write(d):
            out.write_bytes(f, Path(d, f).read_bytes())
        out.write_bytes("tokenizer.json", tokenizer_json.encode())


@pytest.fixture(scope="module")
def storage(tiny_store) -> str:
    """The session store: dataset 'tiny' and the GPT 'tiny_gpt' fitted to its validation blocks, with
    planted activation outliers (tests/tiny_data.py `build_store`)."""
    return tiny_store.root


def _cfg(storage, *sets):
    return load_config(quantize.QuantizeConfig, None, [f"storage={storage}", "model=tiny_gpt", *FAST, *sets])


def _perplexity(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Perplexity over `blocks` (N, BLOCK_LEN) in batches of 12, as the job's two scoring tasks batch 24:
    int8 activations are quantized per batch, so the batches must match."""
    nll = 0.0
    with torch.no_grad():
        for part in blocks.split(12):
            logits = model(part[:, :-1])[0]
            nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), part[:, 1:].reshape(-1), reduction="sum").item()
    return math.exp(nll / blocks[:, 1:].numel())


def test_int8_job_scores_in_parallel_what_one_process_computes(storage, ray_cluster):
    manifest = quantize.run(_cfg(storage, "name=gpt_int8", "method=int8"))
    store = Storage(storage)
    art = store.open("model", "gpt_int8")
    report = json.loads(art.read_bytes("report.json"))
    assert manifest["rejected"] is False and manifest["parents"][0]["name"] == "tiny_gpt"
    assert report["kernels"] == {"fbgemm": 8} and report["quality"]["metric"] == "perplexity"
    assert report["size"]["linear_ratio"] <= 0.27
    assert report["gate"]["passed"] and report["gate"]["max_quality_delta"] == 0.02  # within the default budget

    # the parallel scores (two tasks of 12 blocks) equal one process scoring the same two batches of 12
    blocks = torch.from_numpy(quantize.val_blocks(store.open("dataset", "tiny"), 24).astype(np.int64))
    float_model = load_runnable(store.open("model", "tiny_gpt").uri)
    quant_model = load_runnable(art.uri)
    for model, key in ((float_model, "float"), (quant_model, "quantized")):
        ppl = _perplexity(model, blocks)
        assert abs(ppl - report["quality"][key]) < 1e-3 * ppl, (key, ppl, report["quality"][key])

    # int8's delta is one draw of what its rounding does: the float model with uniform noise of one step
    # wherever int8 rounds (tests/quant_noise.py), scored on the same batches, shows the mean and the
    # spread of such draws on this CPU (8 seeds; 24 blocks of a model short of its minimum make them wide,
    # +-0.3-0.5%). int8 lies within 4.3 spreads of their mean: a 99.5% prediction interval for one more
    # draw (Student's t with 7 degrees of freedom, 4.03, times sqrt(1 + 1/8)). Measured: 0.4-1.0 spreads
    # on VNNI and AVX2 kernels; 7-bit activations (the AVX2 path before) sat 2.8-9.3 spreads out.
    layers = json.loads(art.read_bytes("quantization.json"))["layers"]
    base = _perplexity(float_model, blocks)
    noise = np.array([_perplexity(rounding_noise(float_model, quant_model, layers, seed), blocks) / base - 1
                      for seed in range(8)])
    delta = report["quality"]["delta"]
    assert abs(delta - noise.mean()) <= 4.3 * noise.std(ddof=1), (delta, noise)

    # what was written is what quantizing in this process gives
    expected, _ = quantize_model(float_model, QuantSpec(method="int8"))
    with torch.no_grad():
        assert torch.equal(quant_model(blocks[:4, :-1])[0], expected(blocks[:4, :-1])[0])


def test_lm_eval_scores_float_and_int8_side_by_side_and_the_gate_can_name_a_task_metric(storage, ray_cluster, capsys):
    """lm_eval.tasks_artifact: lm-evaluation-harness scores both models through Helio's loader; the
    report holds each task metric float vs int8 (the float column is what scoring the float model in
    this process gives), the manifest the int8 scores and their lineage; the named gate is checked."""
    from actors.evaluate import TASKS, prepare, score
    from tiny_data import write_sft_tasks

    store = Storage(storage)
    write_sft_tasks(store, "quant_tasks")
    manifest = quantize.run(_cfg(storage, "name=gpt_int8_lm", "method=int8", "lm_eval.tasks_artifact=quant_tasks",
                                 "lm_eval.limit=6", "lm_eval.gate=helio_code_perplexity/byte_perplexity",
                                 "lm_eval.max_delta=0.5"))
    report = json.loads(store.open("model", "gpt_int8_lm").read_bytes("report.json"))
    lm = report["lm_eval"]
    assert {k.split("/")[0] for k in lm["metrics"]} == set(TASKS) and lm["lm_eval"] == "0.4.13"
    ppl = lm["metrics"]["helio_code_perplexity/byte_perplexity"]
    assert ppl["float"] > 1 and ppl["quantized"] != ppl["float"] and abs(ppl["worse_by"]) < 0.05
    assert report["gate"]["lm_eval"] == {"metric": "helio_code_perplexity/byte_perplexity", "max_delta": 0.5,
                                         "worse_by": ppl["worse_by"], "passed": True}
    assert manifest["metrics"]["lm_eval/helio_code_perplexity/byte_perplexity"] == ppl["quantized"]
    assert manifest["lm_eval"]["tasks_artifact"] == "quant_tasks" and "quant_tasks" in {
        p["name"] for p in manifest["parents"]}
    assert "helio_docstring_choice/acc" in capsys.readouterr().out  # the side-by-side table

    prep = prepare(store.open("model", "tiny_gpt"), store.open("task", "quant_tasks"), TASKS, 6, 0)
    here = score._function("helio", store.open("model", "tiny_gpt").uri, prep.tokenizer, prep.tasks, list(TASKS), 0, 8)
    assert here["results"]["helio_code_perplexity"]["byte_perplexity,none"] == ppl["float"]

    with pytest.raises(ConfigError, match="lm_eval.gate.*not task/metric"):
        _cfg(storage, "lm_eval.tasks_artifact=quant_tasks", "lm_eval.gate=perplexity")


def test_awq_calibrates_on_the_lineage_dataset_and_beats_int4_on_its_objective(storage, ray_cluster):
    quantize.run(_cfg(storage, "name=gpt_awq", "method=awq", "max_quality_delta=1.0"))  # the gate: not this test's
    quantize.run(_cfg(storage, "name=gpt_int4", "method=int4", "max_quality_delta=1.0"))
    store = Storage(storage)
    art = store.open("model", "gpt_awq")
    q = json.loads(art.read_bytes("quantization.json"))
    awq, int4 = (json.loads(store.open("model", n).read_bytes("report.json")) for n in ("gpt_awq", "gpt_int4"))
    assert q["method"] == "awq" and q["bits"] == 4 and len(q["awq_alpha"]) == 8
    # calibrated on validation blocks 24-31: after the 24 the evaluation scores, never on them
    assert awq["calibration"] == "dataset 'tiny' (val blocks 24-31)" and awq["kernels"] == {"dequant": 8}
    assert awq["size"]["linear_ratio"] <= 0.16

    # What AWQ provably does: per layer it keeps the alpha whose int4 weights give the smallest output
    # error on the calibration inputs, alpha = 0 (one of the candidates) being plain int4, and it keeps
    # an alpha > 0 only when that error is lower. So on those inputs, recomputed here as the job's task
    # computed them (the float model fed blocks 24-31, one thread), no layer of gpt_awq does worse than
    # gpt_int4's, and those with alpha > 0 do better. (Held-out perplexity is no such proof on a model
    # short of its minimum: int4 scored below float on one CPU. test_quant checks AWQ on held-out outputs.)
    float_model = load_runnable(store.open("model", "tiny_gpt").uri)
    awq_model, int4_model = (load_runnable(store.open("model", n).uri) for n in ("gpt_awq", "gpt_int4"))
    calibration = list(quantize.val_blocks(store.open("dataset", "tiny"), 8, skip=24))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inputs = collect_inputs(float_model, list(q["awq_alpha"]), lambda m: feed(m, calibration))
    finally:
        torch.set_num_threads(threads)
    assert any(alpha > 0 for alpha in q["awq_alpha"].values())  # the planted outlier channels call for it
    with torch.no_grad():
        for name, alpha in q["awq_alpha"].items():
            x, ref = inputs[name], inputs[name] @ float_model.get_submodule(name).weight.t()  # (rows, out)
            err = {key: (x @ m.get_submodule(name).weight().t() - ref).pow(2).mean().item()
                   for key, m in (("awq", awq_model), ("int4", int4_model))}
            # equal weights at alpha = 0; 1e-5 covers fp32 rounding, should x differ in its last bits
            assert err["awq"] <= err["int4"] * (1 + 1e-5), (name, alpha, err)
            assert alpha == 0 or err["awq"] < err["int4"], (name, alpha, err)


def test_over_budget_is_written_rejected_and_refused_unless_forced(storage, ray_cluster, capsys):
    # Over the budget by construction: a budget of zero, and a delta that rounding can only make positive.
    # An embedding model scored on dataset blocks is gated on 1 - its mean cosine to the float embeddings,
    # >= 0 always and > 0 once int4 turns any embedding (here ~1e-4, over 10x what fp32 rounding of a
    # 128-dim dot product, <= 128 * 2^-24, could hide). A GPT's perplexity delta has no sign of its own on
    # a model short of its minimum (this file's docstring).
    store = Storage(storage)
    ds = store.open("dataset", "tiny")
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(vocab_size=400, max_position=64, n_layer=2, n_head=4, n_embd=128)).drop_mlm_head()
    _write_model(store, "quant_embed", lambda d: save_model(enc.eval(), d), ds.read_bytes("tokenizer.json").decode(),
                 [{"kind": "dataset", "name": "tiny", "uri": ds.uri, "created_at": ds.manifest["created_at"]}])
    code = quantize.main(["--set", f"storage={storage}", "--set", "model=quant_embed", "--set", "name=embed_int4_strict",
                          "--set", "method=int4", "--set", "max_quality_delta=0.0"] +
                         [a for s in FAST for a in ("--set", s)])
    err = capsys.readouterr().err
    assert code == 1 and "over the budget of 0.00%" in err and "marked rejected" in err
    art = store.open("model", "embed_int4_strict")
    assert art.manifest["rejected"] is True and art.manifest["quality_gate"]["quality_delta"] > 0
    assert json.loads(art.read_bytes("report.json"))["quality"]["metric"] == "cosine"
    with pytest.raises(ArtifactError, match="rejected by its quality gate"):
        open_runnable(store, "embed_int4_strict")
    model, _ = open_runnable(store, "embed_int4_strict", force=True)
    assert kernels_used(model) == {"dequant": 12}  # two layers of query, key, value, attention out, MLP in, out


def test_tampered_or_partial_quantized_artifacts_are_refused(storage, ray_cluster, tmp_path):
    quantize.run(_cfg(storage, "name=gpt_w8a8", "method=w8a8"))
    store = Storage(storage)
    art = store.open("model", "gpt_w8a8")
    assert json.loads(art.read_bytes("quantization.json"))["activations"] == "int8 per token, dynamic"
    assert json.loads(art.read_bytes("report.json"))["kernels"] == {"fbgemm": 8}
    copy = tmp_path / "models" / "copy"
    shutil.copytree(store.artifact_path("model", "gpt_w8a8"), copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="fails its sha256 check"):
        open_runnable(Storage(str(tmp_path)), "copy")
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert kernels_used(open_runnable(Storage(str(tmp_path)), "copy")[0]) == {"fbgemm": 8}  # whole again: it loads
    (copy / "quantization.json").unlink()
    with pytest.raises(ArtifactError, match="partial: file 'quantization.json' is missing"):
        open_runnable(Storage(str(tmp_path)), "copy")


def test_a_classifier_is_gated_on_accuracy(storage, ray_cluster, tmp_path):
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(vocab_size=400, max_position=64, n_layer=1, n_head=4, n_embd=128))
    clf = SequenceClassifier(enc, 3).eval()
    store = Storage(storage)
    tok = store.open("dataset", "tiny").read_bytes("tokenizer.json").decode()
    _write_model(store, "quant_clf", lambda d: save_classifier(clf, d, ["a", "b", "c"], pad_id=1), tok, [])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 400, (30, 20), generator=g).numpy().astype(np.int32)
    rows = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), 20),
                     "length": pa.array(np.full(30, 20, dtype=np.int32)),
                     "label": pa.array(labels := torch.randint(0, 3, (30,), generator=g).numpy().astype(np.int32))})
    write_parquet_file(str(tmp_path / "val.parquet"), rows)
    quantize.run(_cfg(storage, "model=quant_clf", "name=clf_int8", f"eval.rows={tmp_path / 'val.parquet'}"))
    report = json.loads(store.open("model", "clf_int8").read_bytes("report.json"))
    assert report["kind"] == "classify" and report["quality"]["metric"] == "accuracy"
    assert report["layers_quantized"] == 6 + 2  # the encoder layer's six Linears, the pooler and the classifier
    n = 24  # eval.max_examples: the tasks score the first 24 rows; their accuracy is this process's
    for key, name in (("float", "quant_clf"), ("quantized", "clf_int8")):
        model = open_runnable(store, name)[0]
        with torch.no_grad():
            pred = model(torch.from_numpy(ids[:n]).long(), torch.full((n,), 20)).argmax(-1)
        assert report["quality"][key] == pytest.approx((pred == torch.from_numpy(labels[:n]).long()).float().mean().item())
    assert report["gate"]["passed"] == (report["quality"]["delta"] <= 0.02)


def test_mistakes_are_one_sentence(storage, ray_cluster, capsys):
    base = ["--set", f"storage={storage}", "--set", "model=tiny_gpt"]
    assert quantize.main(base + ["--set", "method=int3"]) == 2
    assert "config key 'method'" in capsys.readouterr().err
    assert quantize.main(base + ["--set", "name=tiny_gpt"]) == 2
    assert "config key 'name'" in capsys.readouterr().err
    assert quantize.main(base + ["--set", "name=x", "--set", "model=missing"]) == 2
    assert "no model artifact named 'missing'" in capsys.readouterr().err
    assert quantize.main(base + ["--set", "name=x", "--set", "model=gpt_int8"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert quantize.main(base + ["--set", "name=x", "--set", "eval.threads=64"]) == 2
    assert "config key 'eval.threads'" in capsys.readouterr().err
