"""The shipped demo, as `make demo` runs it: prepare the stdlib, pretrain the tiny GPT, and it learns."""

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
