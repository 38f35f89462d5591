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
