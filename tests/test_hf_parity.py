"""Parity with Hugging Face `transformers` (a test dependency only), both ways."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from models.encoder import Encoder, EncoderConfig
from models.gpt import GPT, GPTConfig
from models.llama import Llama, LlamaConfig
from models.hf import load_encoder, load_gpt, load_model, save_encoder, save_gpt, save_model

CFG = GPTConfig(vocab_size=101, block_size=24, n_layer=2, n_head=2, n_embd=16)
ENC = EncoderConfig(vocab_size=101, max_position=24, n_layer=2, n_head=2, n_embd=16, intermediate_size=40)


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


def _bert_batch(B: int = 3, T: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, a right-padding attention mask of random lengths, and random token types."""
    ids = torch.randint(5, ENC.vocab_size, (B, T))
    lengths = torch.randint(T // 2, T + 1, (B,))
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T)
    return ids.masked_fill(mask == 0, ENC.pad_id), mask, torch.randint(0, 2, (B, T))


def _bert_hf_config() -> "transformers.BertConfig":
    return transformers.BertConfig(vocab_size=ENC.vocab_size, hidden_size=ENC.n_embd, num_hidden_layers=ENC.n_layer,
                                   num_attention_heads=ENC.n_head, intermediate_size=ENC.intermediate_size,
                                   max_position_embeddings=ENC.max_position, pad_token_id=ENC.pad_id)


def test_transformers_loads_a_helio_bert_export(tmp_path):
    torch.manual_seed(3)
    model = Encoder(ENC).eval()
    with torch.no_grad():  # non-trivial biases and norms so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_encoder(model, tmp_path)
    hf, info = transformers.BertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    hf.eval()
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    ids, mask, types = _bert_batch()
    with torch.no_grad():
        ours = model.mlm_logits(model(ids, mask, types))
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    real = mask.bool()
    assert (ours - theirs)[real].abs().max().item() <= 1e-4


def test_helio_loads_bert_for_masked_lm_that_transformers_saved(tmp_path):
    torch.manual_seed(4)
    hf = transformers.BertForMaskedLM(_bert_hf_config()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path).eval()
    assert isinstance(model, Encoder) and model.cfg == dataclasses.replace(ENC, dropout=0.1)  # BertConfig default
    ids, mask, types = _bert_batch()
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = model(ids, mask, types)
        real = mask.bool()
        assert (hidden - out.hidden_states[-1])[real].abs().max().item() <= 1e-4
        assert (model.mlm_logits(hidden) - out.logits)[real].abs().max().item() <= 1e-4


def test_helio_loads_a_bert_model_without_mlm_head(tmp_path):
    torch.manual_seed(5)
    hf = transformers.BertModel(_bert_hf_config()).eval()  # has pooler.dense.*, no cls.* (like all-MiniLM-L6-v2)
    hf.save_pretrained(tmp_path)
    weights = str(tmp_path / "model.safetensors")  # older transformers also saved the position_ids buffer
    save_file({**load_file(weights), "embeddings.position_ids": torch.arange(ENC.max_position)[None]}, weights)
    model = load_encoder(tmp_path).eval()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    ids, mask, types = _bert_batch()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        assert (model(ids, mask, types) - theirs)[mask.bool()].abs().max().item() <= 1e-4


def test_foreign_or_mismatched_weights_are_refused(tmp_path):
    save_gpt(GPT(CFG), tmp_path / "gpt")
    with pytest.raises(ValueError, match="is not a BERT checkpoint"):
        load_encoder(tmp_path / "gpt")
    save_encoder(Encoder(ENC), tmp_path / "enc")
    (tmp_path / "enc" / "config.json").write_text((tmp_path / "enc" / "config.json").read_text()
                                                  .replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(ValueError, match="missing"):
        load_encoder(tmp_path / "enc")


def test_save_and_load_model_dispatch_on_the_kind(tmp_path):
    torch.manual_seed(6)
    llama = Llama(LlamaConfig(vocab_size=50, block_size=16, n_layer=1, n_head=4, n_kv_head=2, n_embd=16,
                              intermediate_size=24, tie_embeddings=True))
    for kind, model in (("gpt", GPT(CFG)), ("llama", llama), ("bert", Encoder(ENC))):
        assert save_model(model, tmp_path / kind) == ["config.json", "model.safetensors"]
        back = load_model(tmp_path / kind)
        assert type(back) is type(model) and back.cfg == model.cfg
        for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), name
    with pytest.raises(TypeError, match="cannot export a Linear"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x")
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="model_type 't5' is not one of gpt2, llama, qwen2, mistral, bert"):
        load_model(tmp_path / "gpt")
