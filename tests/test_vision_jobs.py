"""The vision path on a real local Ray cluster: jobs.prepare_images -> jobs.pretrain (ResNet, ViT) ->
jobs.finetune (full, LoRA) with real DeepSpeed, the classification report, and transfer measured against
training from scratch."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from cluster.config import load_config
from cluster.storage import Storage, blocks
from jobs import finetune, prepare_images, pretrain
from models.hf_vision import load_vision, normalize

pytestmark = pytest.mark.ray

TINY_VIT = ["model.arch=vit", "model.patch_size=8", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
            "model.intermediate_size=64", "model.widths=[]", "model.depths=[]", "model.stem_width=0"]


@pytest.fixture(scope="module")
def images(ray_cluster, tmp_path_factory) -> str:
    """A storage root with the demo's two image datasets: glyphs (pretraining) and digits (10 a class)."""
    root = str(tmp_path_factory.mktemp("vision"))
    for config in ("prepare_images_glyphs", "prepare_images_digits"):
        assert prepare_images.main([f"jobs/configs/{config}.yaml", "--set", f"storage={root}"]) == 0
    return root


def _pretrain(storage: str, config: str, name: str, *overrides: str) -> dict:
    cfg = load_config(pretrain.PretrainConfig, f"jobs/configs/{config}.yaml",
                      [f"storage={storage}", f"name={name}", *overrides])
    return pretrain.run(cfg)


def _finetune(storage: str, name: str, *overrides: str) -> dict:
    cfg = load_config(finetune.FinetuneConfig, "jobs/configs/finetune_resnet_digits.yaml",
                      [f"storage={storage}", f"name={name}", *overrides])
    return finetune.run(cfg)


def _test_images(storage: str, n: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    art = Storage(storage).open("dataset", "digits")
    table = pq.read_table(art.file_uri(art.manifest["images"]["splits"]["test"]["shards"][0]))
    return torch.from_numpy(blocks(table, "pixels")[:n]), blocks(table, "label")[:n]


@pytest.mark.slow
def test_glyph_pretraining_transfers_to_ten_digits_a_class_better_than_training_from_scratch(images):
    """The demo's recipe: a ResNet pretrained on rendered glyphs, finetuned on 100 labelled digits, beats the
    same ResNet trained from scratch on the same 100 images for the same steps, on 500 test digits."""
    from transformers import ResNetForImageClassification

    base = _pretrain(images, "pretrain_resnet_glyphs", "resnet_glyphs")
    assert base["metrics"]["val_accuracy"] > 0.5  # 62 classes: chance is 0.016
    m = _finetune(images, "resnet_digits")["metrics"]
    pretrained, scratch = m["transfer"]["pretrained"], m["transfer"]["scratch"]
    # Measured 0.87-0.88 against 0.81-0.82 over three seeds (2026-12-07, AMD EPYC): the gap, 5-7 points,
    # is 2-3 standard errors of a 510-image accuracy; the test asks only that it is positive.
    assert pretrained["accuracy"] > scratch["accuracy"] and pretrained["macro_f1"] > scratch["macro_f1"], m
    assert m["test"] == pretrained and m["test_images"] == 510 and m["train_images"] == 100

    art = Storage(images).open("model", "resnet_digits")
    report = json.loads(art.read_bytes("report.json"))
    assert [str(d) for d in range(10)] == [k for k in report if k.isdigit()]
    assert report["micro avg"]["f1-score"] == pytest.approx(report["accuracy"]) == pytest.approx(
        pretrained["accuracy"])
    assert sum(report[str(d)]["support"] for d in range(10)) == report["macro avg"]["support"] == 510
    text = art.read_bytes("report.txt").decode()
    for row in ("precision", "accuracy", "micro avg", "macro avg", "weighted avg"):
        assert row in text
    assert art.read_bytes("confusion.png")[:8] == b"\x89PNG\r\n\x1a\n"

    # the exported folder is a ResNetForImageClassification: transformers computes Helio's logits
    folder = Storage(images).root_path + "/models/resnet_digits"
    model, labels, size = load_vision(folder)
    hf = ResNetForImageClassification.from_pretrained(folder).eval()
    pixels, truth = _test_images(images)
    x = normalize(pixels.view(-1, size, size, 1))
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model.eval()(x), rtol=1e-4, atol=1e-4)
    assert labels == [str(d) for d in range(10)] and hf.config.id2label[3] == "3"


def test_a_vit_pretrains_under_zero3_and_lora_finetunes_its_attention_and_mlp(images):
    """One real run of each vision job in the fast tier: a tiny ViT, sharded by ZeRO-3, then LoRA on its
    attention and MLP with a new head; the PEFT adapter applied by peft to transformers' ViT gives the
    merged model's logits."""
    from peft import PeftModel
    from transformers import ViTForImageClassification

    base = _pretrain(images, "pretrain_resnet_glyphs", "vit_glyphs", *TINY_VIT, "zero.stage=3", "train.steps=40",
                     "train.eval_every=20", "train.checkpoint_every=20", "train.micro_batch=16")
    assert base["model"]["arch"] == "vit" and base["metrics"]["val_accuracy"] is not None
    assert load_file(f"{images}/models/vit_glyphs/model.safetensors")["vit.embeddings.position_embeddings"].shape == \
        (1, 17, 32)  # gathered from the ZeRO-3 shards: 16 patches and [CLS]
    lora = _finetune(images, "vit_digits", "base.artifact=vit_glyphs", "method=lora", "lora.rank=2", "compare_scratch=false",
                     "train.steps=10", "train.eval_every=10", "train.checkpoint_every=10", "optim.lr=0.005")
    m = lora["metrics"]
    assert m["transfer"] is None and 0 <= m["test"]["accuracy"] <= 1
    merged_params = sum(t.numel() for t in load_file(f"{images}/models/vit_digits/model.safetensors").values())
    assert m["trainable_params"] < merged_params / 4  # the adapters and the head only

    store = Storage(images)
    adapter = store.open("adapter", "vit_digits")
    config = json.loads(adapter.read_bytes("adapter_config.json"))
    assert set(config["target_modules"]) == {"attention.q_proj", "attention.k_proj", "attention.v_proj",
                                             "attention.o_proj", "mlp.fc1", "mlp.fc2"}  # transformers' names
    base_hf = ViTForImageClassification.from_pretrained(f"{images}/models/vit_glyphs", num_labels=10,
                                                        ignore_mismatched_sizes=True)
    peft_model = PeftModel.from_pretrained(base_hf, f"{images}/adapters/vit_digits").eval()
    merged, _, size = load_vision(f"{images}/models/vit_digits")
    pixels, _ = _test_images(images, 16)
    x = normalize(pixels.view(-1, size, size, 1))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(pixel_values=x).logits, merged.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_an_image_run_that_fails_resumes_to_the_same_weights(images):
    """Augmentation comes from the step's seeded generator and data order is global: a run whose worker
    fails at step 5 resumes from its step-4 checkpoint and ends with the uninterrupted run's weights."""
    tiny = ["model.widths=[8, 16]", "model.depths=[1, 1]", "model.stem_width=8", "train.steps=8",
            "train.micro_batch=8", "train.eval_every=4", "train.checkpoint_every=2", "train.log_every=1",
            "failure.num_to_keep=4"]
    _pretrain(images, "pretrain_resnet_glyphs", "resnet_whole", *tiny)
    _pretrain(images, "pretrain_resnet_glyphs", "resnet_fault", *tiny, "fault.at_step=5", "fault.rank=1")
    records = [json.loads(line) for line in open(f"{images}/runs/resnet_fault/metrics.jsonl")]
    assert any(r.get("attempt_start_step") == 4 for r in records), records  # resumed, not restarted
    whole, fault = (load_file(f"{images}/models/{n}/model.safetensors") for n in ("resnet_whole", "resnet_fault"))
    assert whole.keys() == fault.keys()
    for k in whole:
        torch.testing.assert_close(fault[k], whole[k], rtol=0, atol=0, msg=k)


def test_wrong_pairings_of_model_and_data_are_refused_in_one_sentence(images):
    from cluster.config import ConfigError

    with pytest.raises(ConfigError, match="dataset 'glyphs' holds images: train a resnet or vit on it, not a gpt"):
        _pretrain(images, "pretrain_resnet_glyphs", "bad1", "model.arch=gpt", "model.widths=[]", "model.depths=[]",
                  "model.stem_width=0")
    with pytest.raises(ConfigError, match="model.patch_size.*5 does not divide the dataset's 32-pixel images"):
        _pretrain(images, "pretrain_resnet_glyphs", "bad2", *TINY_VIT[:1], "model.patch_size=5", *TINY_VIT[2:])
