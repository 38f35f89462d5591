"""models/resnet.py and models/vit.py against their Hugging Face twins, both ways, and the loading of a
torchvision/timm-style ResNet state dict from a file."""

from __future__ import annotations

import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ResNetConfig as HFResNetConfig
from transformers import ResNetForImageClassification
from transformers import ViTConfig as HFViTConfig
from transformers import ViTForImageClassification

from models import resnet, vit


def _random_batchnorm_stats(model: torch.nn.Module, seed: int) -> None:
    """Running statistics away from 0 / 1, so that eval-mode parity tests the BatchNorm mapping too."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("bottleneck", [False, True], ids=["basic", "bottleneck"])
def test_resnet_matches_hugging_face_both_ways(bottleneck):
    torch.manual_seed(0)
    cfg = resnet.ResNetConfig(channels=1, stem_width=16, widths=(16, 32, 64) if not bottleneck else (32, 64, 128),
                              depths=(1, 2, 1), bottleneck=bottleneck, num_labels=5)
    hf = ResNetForImageClassification(HFResNetConfig(**{k: v for k, v in resnet.hf_config(cfg).items()
                                                       if k != "architectures"}, num_labels=5)).eval()
    _random_batchnorm_stats(hf, 1)
    ours = resnet.ResNet(cfg).eval()
    ours.load_state_dict(resnet.from_hf_state_dict(hf.state_dict()))  # strict: every name, both sides
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits)
        assert ours.features(x).shape == (3, cfg.embed_dim)
    # and back: Helio's own weights in Hugging Face's model
    other = resnet.ResNet(cfg).eval()
    _random_batchnorm_stats(other, 2)
    hf.load_state_dict(resnet.to_hf_state_dict(other))
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, other(x))
    assert resnet.config_from_hf(hf.config.to_dict(), 5, "hf") == cfg


def test_vit_matches_hugging_face_both_ways():
    torch.manual_seed(0)
    cfg = vit.ViTConfig(image_size=32, patch_size=8, channels=1, dim=48, depth=2, heads=4, mlp_dim=96, num_labels=7)
    hf_cfg = HFViTConfig(**{k: v for k, v in vit.hf_config(cfg).items() if k != "architectures"}, num_labels=7)
    hf = ViTForImageClassification(hf_cfg).eval()
    ours = vit.ViT(cfg).eval()
    # its in-memory names (q_proj ...) are not the ones it saves (attention.attention.query ...): the
    # saved layout is what Helio reads and writes, so go through a folder
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        saved = load_file(f"{d}/model.safetensors")
    ours.load_state_dict(vit.from_hf_state_dict(saved))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits)
        assert ours.features(x).shape == (2, 48)
    other = vit.ViT(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)  # config.json and the layout, then Helio's weights in its saved names
        save_file({k: v.contiguous() for k, v in vit.to_hf_state_dict(other).items()}, f"{d}/model.safetensors",
                  metadata={"format": "pt"})
        back = ViTForImageClassification.from_pretrained(d).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=x).logits, other(x))
    assert vit.config_from_hf(hf_cfg.to_dict(), 7, "hf") == cfg


def test_a_torchvision_style_resnet_state_dict_loads_from_a_file_with_names_and_shapes_checked(tmp_path):
    torch.manual_seed(0)
    r18 = resnet.ResNetConfig()  # ResNet-18's shape: torchvision's resnet18 state dict has exactly these names
    names = resnet.ResNet(r18).state_dict()
    assert len(names) == 122 and "layer2.0.downsample.0.weight" in names and "layer4.1.bn2.running_var" in names
    assert "layer1.0.downsample.0.weight" not in names  # the first stage keeps its shape: no projection

    cfg = resnet.ResNetConfig(channels=3, stem_width=16, widths=(16, 32), depths=(2, 1), num_labels=10)
    source = resnet.ResNet(cfg).eval()
    _random_batchnorm_stats(source, 3)
    path = tmp_path / "resnet.pth"
    torch.save(source.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert resnet.config_from_state_dict(state) == cfg  # the architecture read off the names and shapes
    loaded = resnet.ResNet(cfg).eval()
    resnet.load_torchvision_state_dict(loaded, state, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
    # a new task keeps the backbone and starts a new head
    three = resnet.ResNet(resnet.ResNetConfig(**{**cfg.__dict__, "num_labels": 3})).eval()
    resnet.load_torchvision_state_dict(three, state, str(path), head=False)
    with torch.no_grad():
        torch.testing.assert_close(three.features(x), source.features(x))

    with pytest.raises(ValueError, match=r"resnet.pth: layer2.0.conv1.weight has shape \(32, 16, 3, 3\), this "
                                         r"ResNet's is \(64, 16, 3, 3\)"):
        resnet.load_torchvision_state_dict(resnet.ResNet(resnet.ResNetConfig(
            channels=3, stem_width=16, widths=(16, 64), depths=(2, 1), num_labels=10)), state, str(path))
    with pytest.raises(ValueError, match="parameter.s. this ResNet does not have, e.g. 'module.bn1.bias'"):
        resnet.load_torchvision_state_dict(loaded, {f"module.{k}": v for k, v in state.items()}, str(path))
    with pytest.raises(ValueError, match="missing 1 parameter.s. of this ResNet, e.g. 'layer2.0.bn2.weight'"):
        resnet.load_torchvision_state_dict(loaded, {k: v for k, v in state.items() if k != "layer2.0.bn2.weight"},
                                           str(path))


def test_augmentation_is_a_function_of_the_generator_and_off_means_untouched():
    from models.image_objective import AugmentConfig, ImageClassification

    torch.manual_seed(0)
    model = vit.ViT(vit.ViTConfig(image_size=16, patch_size=4, channels=1, dim=16, depth=1, heads=2, mlp_dim=32,
                                  num_labels=3))
    rows = {"pixels": torch.randint(0, 256, (4, 16 * 16)), "label": torch.tensor([0, 1, 2, 0])}
    objective = ImageClassification(model, 16, 1, AugmentConfig(shift=2, rotate_deg=10, scale=0.1))
    a = objective.batch(rows, torch.Generator().manual_seed(7))[0]
    b = objective.batch(rows, torch.Generator().manual_seed(7))[0]
    c = objective.batch(rows, torch.Generator().manual_seed(8))[0]
    plain = (rows["pixels"].float().view(4, 1, 16, 16) / 255 - 0.5) / 0.5
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    assert a.min() >= plain.min() - 1e-6 and a.max() <= plain.max() + 1e-6  # bilinear: no new extremes
    objective.eval()  # evaluation never augments
    assert torch.equal(objective.batch(rows, torch.Generator().manual_seed(7))[0], plain)
    objective.train()
    off = ImageClassification(model, 16, 1, AugmentConfig(shift=0, rotate_deg=0, scale=0))
    assert torch.equal(off.batch(rows, torch.Generator().manual_seed(7))[0], plain)
    loss = objective(*objective.batch(rows, torch.Generator().manual_seed(7)))
    assert loss.ndim == 0 and 0 <= int(objective.correct) <= 4


def test_a_vision_folder_round_trips_and_lora_at_init_is_the_base_with_a_new_head(tmp_path):
    from models.hf_vision import load_vision, save_vision
    from models.image_finetune import build_image_task_model
    from models.lora import LoraSpec

    torch.manual_seed(0)
    cfg = vit.ViTConfig(image_size=16, patch_size=4, channels=1, dim=16, depth=2, heads=2, mlp_dim=32, num_labels=3)
    model = vit.ViT(cfg).eval()
    save_vision(model, tmp_path / "base", ["a", "b", "c"], 16)
    loaded, labels, size = load_vision(tmp_path / "base")
    hf = ViTForImageClassification.from_pretrained(tmp_path / "base").eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x))
    assert (labels, size) == (["a", "b", "c"], 16) and hf.config.id2label == {0: "a", 1: "b", 2: "c"}

    task, head, _ = build_image_task_model("lora", LoraSpec(rank=2), ("x", "y", "z", "w"), tmp_path / "base")
    assert head == ("head",) and task.head.out_features == 4
    with torch.no_grad():  # adapters start at B = 0: the backbone computes what the base does
        torch.testing.assert_close(task.eval().features(x), model.features(x))
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    resnet_base = resnet.ResNet(resnet.ResNetConfig(channels=1, stem_width=8, widths=(8,), depths=(1,), num_labels=3))
    save_vision(resnet_base, tmp_path / "r", ["a", "b", "c"], 16)
    with pytest.raises(ValueError, match="method lora: Helio adapts a ViT's attention and MLP.*is a resnet"):
        build_image_task_model("lora", LoraSpec(rank=2), ("x", "y"), tmp_path / "r")


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_int8_vision_models_are_saved_as_plain_tensors_and_come_back_exactly(tmp_path, family):
    from safetensors import safe_open

    from models.hf_vision import save_vision
    from models.quant_vision import load_int8_vision, quantize_vision, save_int8_vision

    torch.manual_seed(0)
    if family == "resnet":
        model = resnet.ResNet(resnet.ResNetConfig(channels=1, stem_width=8, widths=(8, 16), depths=(1, 1),
                                                  num_labels=4)).eval()
        _random_batchnorm_stats(model, 4)
    else:
        model = vit.ViT(vit.ViTConfig(image_size=16, patch_size=4, channels=1, dim=16, depth=1, heads=2, mlp_dim=32,
                                      num_labels=4)).eval()
    x = torch.randn(64, 1, 16, 16)
    q, desc = quantize_vision(model, [x[:32], x[32:]])
    assert desc["scheme"] == ("static" if family == "resnet" else "dynamic")
    save_vision(model, tmp_path, ["a", "b", "c", "d"], 16)  # the float config beside the int8 tensors
    save_int8_vision(q, desc, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        int8 = [k for k in f.keys() if k.endswith(".weight.int8")]
        assert int8 and all(f.get_tensor(k).dtype == torch.int8 for k in int8)
    back, labels, size = load_int8_vision(tmp_path)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))  # the same integer weights, scales and activation qparams
        logits, ref = q(x), model(x)
    # int8 weights (per channel) and, for the ResNet, int8 activations: the logits move by a few quantization
    # steps of their range; a fifth of the float logits' spread is far outside that and far under a wrong model
    assert (logits - ref).abs().max() < 0.2 * (ref.max() - ref.min()), (logits - ref).abs().max()
    assert labels == ["a", "b", "c", "d"] and size == 16
