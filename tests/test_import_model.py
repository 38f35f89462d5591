"""jobs.import_model: a sharded Hugging Face Qwen2 folder (built by `transformers`) becomes a model
artifact that computes what `transformers` computes, with the sha256 of every source file in its
lineage; every folder Helio cannot honour exits 2 with one sentence naming the file or field."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from cluster.storage import Storage
from jobs import import_model
from models.hf import load_model
from tiny_hf import save_family


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2-tiny")
    hf = save_family("qwen2", folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1], "bos_token_id": 0}))
    return hf, folder


def _import(root, folder, *sets: str) -> int:
    return import_model.main(["--set", f"storage={root}", "--set", f"source={folder}", *(
        a for s in sets for a in ("--set", s))])


def test_a_sharded_checkpoint_imports_byte_for_byte_and_computes_what_transformers_does(source, tmp_path, capsys):
    hf, folder = source
    assert _import(tmp_path, folder, "name=qwen") == 0
    assert "Qwen2ForCausalLM" in capsys.readouterr().out
    art = Storage(str(tmp_path)).open("model", "qwen")  # verified against its manifest's sha256
    sources = art.manifest["model"]["source_files"]
    shards = sorted(f.name for f in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(sources) == {"config.json", "tokenizer.json", "tokenizer_config.json",
                                                "generation_config.json", "model.safetensors.index.json", *shards}
    for rel, entry in sources.items():
        assert entry["sha256"] == hashlib.sha256((folder / rel).read_bytes()).hexdigest(), rel
    for rel in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert art.read_bytes(rel) == (folder / rel).read_bytes(), rel
    merged = {}
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            merged.update({k: f.get_tensor(k) for k in f.keys()})
    with safe_open(f"{art.uri}/model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(merged)
        for k in merged:
            assert torch.equal(f.get_tensor(k), merged[k]), k
    model = load_model(art.uri).eval()
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, atol=1e-4, rtol=0)
    assert _import(tmp_path, folder, "name=qwen") == 2  # not over an existing artifact unless replace=true
    assert "model artifact 'qwen' exists; set replace=true" in capsys.readouterr().err
    assert _import(tmp_path, folder, "name=qwen", "replace=true") == 0


def _broken(folder, tmp_path, case: str):
    out = tmp_path / "src"
    shutil.copytree(folder, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    config = json.loads((out / "config.json").read_text())
    if case == "missing shard":
        (out / shard).unlink()
        return out, f"model.safetensors.index.json names {shard}, which is missing"
    if case == "no tokenizer":
        (out / "tokenizer.json").unlink()
        return out, "has no tokenizer.json"
    if case == "rope":
        config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
        config.pop("rope_parameters", None)
        message = "config.json: rope_scaling type 'dynamic' is not supported"
    elif case == "architecture":
        config.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
        message = "model_type 'phi3' is not one of gpt2, llama, qwen2, mistral, bert"
    else:  # a tensor the index places in a shard that lacks it
        home = index["weight_map"]["model.norm.weight"]
        shard = next(f for f in sorted(set(index["weight_map"].values())) if f != home)
        index["weight_map"]["model.norm.weight"] = shard
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
        return out, "lacks model.norm.weight, which model.safetensors.index.json places in it"
    (out / "config.json").write_text(json.dumps(config))
    return out, message


@pytest.mark.parametrize("case", ["missing shard", "no tokenizer", "rope", "architecture", "lacking tensor"])
def test_a_folder_helio_cannot_honour_exits_2_naming_the_file_or_field(source, tmp_path, capsys, case):
    folder, message = _broken(source[1], tmp_path, case)
    assert _import(tmp_path / "store", folder, "name=broken") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jobs.import_model: error: config key 'source': ") and message in err, err
    assert len(err.splitlines()) == 1
    assert not Storage(str(tmp_path / "store")).exists("model", "broken")  # nothing half-written
