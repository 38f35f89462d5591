"""jobs.quantize on a real local Ray cluster: quantize on a worker, score in parallel tasks, gate, load back.

The model is a small GPT trained here on real text (a few stdlib modules) with
the activation outliers trained LLMs show planted in it (a few LayerNorm
channels 30x louder, Dettmers et al. 2022). It is fitted to the very blocks the
job scores: at a minimum of that loss any rounding of the weights raises the
perplexity, so the quality deltas are real signals (int8 < awq < int4) rather
than noise around an undertrained model.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from actors.model_loader import load_runnable, open_runnable
from cluster.config import load_config
from cluster.storage import ArtifactError, Storage, write_parquet_file
from jobs import quantize
from models.encoder import Encoder, EncoderConfig
from models.gpt import GPT, GPTConfig
from models.hf import save_classifier, save_model
from models.quant import QuantSpec, kernels_used, quantize_model
from models.task_heads import SequenceClassifier
from tiny_data import write_tiny_dataset

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
def storage(tmp_path_factory):
    """A dataset artifact 'tiny' and a GPT 'tiny_gpt' fitted to its validation blocks."""
    import collections
    import posixpath

    root = str(tmp_path_factory.mktemp("quantize"))
    store = Storage(root)
    tok, _, val = write_tiny_dataset(store, [collections, posixpath, textwrap, shutil], BLOCK_LEN, shards=1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=BLOCK_LEN - 1, n_layer=2, n_head=4, n_embd=128))
    with torch.no_grad():
        for block in model.transformer.h:
            block.ln_1.weight[:6] *= 30
            block.ln_2.weight[:6] *= 30
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.from_numpy(val.astype(np.int64))
    for step in range(400):
        batch = data[torch.randint(0, len(data), (16,), generator=torch.Generator().manual_seed(step))]
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ds = store.open("dataset", "tiny")
    _write_model(store, "tiny_gpt", lambda d: save_model(model.eval(), d), tok.to_str(),
                 [{"kind": "dataset", "name": "tiny", "uri": ds.uri, "created_at": ds.manifest["created_at"]}])
    return root


def _cfg(storage, *sets):
    return load_config(quantize.QuantizeConfig, None, [f"storage={storage}", "model=tiny_gpt", *FAST, *sets])


def test_int8_job_scores_in_parallel_what_one_process_computes(storage, ray_cluster):
    manifest = quantize.run(_cfg(storage, "name=gpt_int8", "method=int8"))
    store = Storage(storage)
    art = store.open("model", "gpt_int8")
    report = json.loads(art.read_bytes("report.json"))
    assert manifest["rejected"] is False and manifest["parents"][0]["name"] == "tiny_gpt"
    assert report["kernels"] == {"fbgemm": 8} and report["quality"]["metric"] == "perplexity"
    assert report["size"]["linear_ratio"] <= 0.27
    assert report["gate"]["passed"] and 0 < report["quality"]["delta"] <= 0.01

    # the parallel scores (two tasks of 12 blocks) equal one process scoring the same two batches of
    # 12, float and quantized: int8 activations are quantized per batch, so the batches must match
    blocks = torch.from_numpy(quantize.val_blocks(store.open("dataset", "tiny"), 24).astype(np.int64))
    float_model = load_runnable(store.open("model", "tiny_gpt").uri)
    quant_model = load_runnable(art.uri)
    for model, key in ((float_model, "float"), (quant_model, "quantized")):
        nll = 0.0
        with torch.no_grad():
            for part in blocks.split(12):
                logits = model(part[:, :-1])[0]
                nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), part[:, 1:].reshape(-1),
                                       reduction="sum").item()
        ppl = math.exp(nll / blocks[:, 1:].numel())
        assert abs(ppl - report["quality"][key]) < 1e-3 * ppl, (key, ppl, report["quality"][key])

    # what was written is what quantizing in this process gives
    expected, _ = quantize_model(float_model, QuantSpec(method="int8"))
    with torch.no_grad():
        assert torch.equal(quant_model(blocks[:4, :-1])[0], expected(blocks[:4, :-1])[0])


def test_awq_calibrates_on_the_lineage_dataset_and_beats_int4(storage, ray_cluster):
    quantize.run(_cfg(storage, "name=gpt_awq", "method=awq"))
    quantize.run(_cfg(storage, "name=gpt_int4", "method=int4", "max_quality_delta=1.0"))
    store = Storage(storage)
    art = store.open("model", "gpt_awq")
    q = json.loads(art.read_bytes("quantization.json"))
    awq, int4 = (json.loads(store.open("model", n).read_bytes("report.json")) for n in ("gpt_awq", "gpt_int4"))
    assert q["method"] == "awq" and q["bits"] == 4 and len(q["awq_alpha"]) == 8
    # calibrated on validation blocks 24-31: after the 24 the evaluation scores, never on them
    assert awq["calibration"] == "dataset 'tiny' (val blocks 24-31)" and awq["kernels"] == {"dequant": 8}
    assert awq["size"]["linear_ratio"] <= 0.16
    assert 0 < awq["quality"]["delta"] < int4["quality"]["delta"], (awq["quality"], int4["quality"])


def test_over_budget_is_written_rejected_and_refused_unless_forced(storage, ray_cluster, capsys):
    code = quantize.main(["--set", f"storage={storage}", "--set", "model=tiny_gpt", "--set", "name=gpt_int4_strict",
                          "--set", "method=int4", "--set", "max_quality_delta=0.01"] +
                         [a for s in FAST for a in ("--set", s)])
    err = capsys.readouterr().err
    assert code == 1 and "over the budget of 1.00%" in err and "marked rejected" in err
    art = Storage(storage).open("model", "gpt_int4_strict")
    assert art.manifest["rejected"] is True and art.manifest["quality_gate"]["quality_delta"] > 0.01
    with pytest.raises(ArtifactError, match="rejected by its quality gate"):
        open_runnable(Storage(storage), "gpt_int4_strict")
    model, _ = open_runnable(Storage(storage), "gpt_int4_strict", force=True)
    assert kernels_used(model) == {"dequant": 8}


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
    _write_model(store, "tiny_clf", lambda d: save_classifier(clf, d, ["a", "b", "c"], pad_id=1), tok, [])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 400, (30, 20), generator=g).numpy().astype(np.int32)
    rows = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), 20),
                     "length": pa.array(np.full(30, 20, dtype=np.int32)),
                     "label": pa.array(labels := torch.randint(0, 3, (30,), generator=g).numpy().astype(np.int32))})
    write_parquet_file(str(tmp_path / "val.parquet"), rows)
    quantize.run(_cfg(storage, "model=tiny_clf", "name=clf_int8", f"eval.rows={tmp_path / 'val.parquet'}"))
    report = json.loads(store.open("model", "clf_int8").read_bytes("report.json"))
    assert report["kind"] == "classify" and report["quality"]["metric"] == "accuracy"
    assert report["layers_quantized"] == 6 + 2  # the encoder layer's six Linears, the pooler and the classifier
    n = 24  # eval.max_examples: the tasks score the first 24 rows; their accuracy is this process's
    for key, name in (("float", "tiny_clf"), ("quantized", "clf_int8")):
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
