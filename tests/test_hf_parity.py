"""Parity with Hugging Face `transformers` (a test dependency only), both ways."""

from __future__ import annotations

import pytest
import torch

from models.gpt import GPT, GPTConfig
from models.hf import load_gpt, save_gpt

transformers = pytest.importorskip("transformers")
CFG = GPTConfig(vocab_size=101, block_size=24, n_layer=2, n_head=2, n_embd=16)


def test_transformers_loads_a_helio_export(tmp_path):
    torch.manual_seed(1)
    model = GPT(CFG).eval()
    with torch.no_grad():  # non-trivial biases and norms so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_gpt(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, CFG.vocab_size, (3, CFG.block_size))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_helio_loads_what_transformers_saved(tmp_path):
    torch.manual_seed(2)
    hf_cfg = transformers.GPT2Config(vocab_size=CFG.vocab_size, n_positions=CFG.block_size, n_embd=CFG.n_embd,
                                     n_layer=CFG.n_layer, n_head=CFG.n_head)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    model = load_gpt(tmp_path).eval()
    idx = torch.randint(0, CFG.vocab_size, (2, 10))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


def test_not_a_gpt2_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_gpt(tmp_path)
