from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.encoder import Encoder, EncoderConfig
from models.gpt import GPT, GPTConfig
from models.masking import mask_tokens

CFG = EncoderConfig(vocab_size=97, max_position=32, n_layer=2, n_head=4, n_embd=32)
SPECIAL = (0, 1, 2, 3, 4)  # models/tokenizer.py: EOT, pad, [MASK], [CLS], [SEP]
PAD, MASK = 1, 2


@pytest.fixture()
def model() -> Encoder:
    torch.manual_seed(0)
    return Encoder(CFG).eval()


def test_config_validates_and_resolves_intermediate_size():
    assert CFG.intermediate_size == 4 * CFG.n_embd
    assert dataclasses.replace(CFG, intermediate_size=48).intermediate_size == 48
    with pytest.raises(ValueError, match="^n_head:"):
        EncoderConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="^pad_id:"):
        EncoderConfig(vocab_size=10, pad_id=10)


def test_padding_changes_nothing_for_real_tokens(model):
    ids = torch.randint(5, CFG.vocab_size, (2, 12))
    padded = torch.cat([ids, torch.full((2, 7), PAD)], dim=1)  # (2, 19)
    mask = torch.cat([torch.ones(2, 12, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, mask)[:, :12], model(ids), atol=1e-5, rtol=1e-5)
    emb = model.embed(ids, torch.ones_like(ids))
    assert emb.shape == (2, CFG.n_embd)
    torch.testing.assert_close(model.embed(padded, mask), emb, atol=1e-5, rtol=1e-5)
    # the mask does something: without it, the padding is attended to
    assert not torch.allclose(model(padded)[:, :12], model(ids), atol=1e-3)


def test_rows_of_different_lengths_match_their_unpadded_selves(model):
    a, b = torch.randint(5, CFG.vocab_size, (1, 9)), torch.randint(5, CFG.vocab_size, (1, 5))
    batch = torch.cat([a, torch.cat([b, torch.full((1, 4), PAD)], dim=1)])  # (2, 9)
    mask = (batch != PAD).long()
    emb = model.embed(batch, mask)
    torch.testing.assert_close(emb[0], model.embed(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb[1], model.embed(b)[0], atol=1e-5, rtol=1e-5)


def test_tied_decoder_and_token_types(model):
    head = model.cls.predictions
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert head.decoder.bias is head.bias
    ids = torch.randint(5, CFG.vocab_size, (2, 8))
    assert model.mlm_logits(model(ids)).shape == (2, 8, CFG.vocab_size)
    assert not torch.allclose(model(ids, token_type_ids=torch.ones_like(ids)), model(ids))
    with pytest.raises(ValueError, match="exceeds max_position"):
        model(torch.zeros(1, CFG.max_position + 1, dtype=torch.long))


def test_loss_skips_ignored_positions(model):
    ids = torch.randint(5, CFG.vocab_size, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 7] = 11, 42
    logits = model.mlm_logits(model(ids))
    ref = F.cross_entropy(logits[[0, 1], [3, 7]], torch.tensor([11, 42]))
    torch.testing.assert_close(model.loss(ids, labels), ref)
    other = labels.clone()
    other[other == -100] = 0  # what sits at ignored positions must not matter
    other[0, 3], other[1, 7] = 11, 42
    torch.testing.assert_close(model.loss(ids, other, ignore_index=0), ref)


def test_common_surface_with_gpt(model):
    gpt = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32))
    for m in (gpt, model):
        assert m.cfg.n_layer == 2 and m.cfg.vocab_size == 97
        ids = torch.randint(5, 97, (2, 8))
        assert m.loss(ids, ids).ndim == 0
    n = model.num_params()
    emb = model.bert.embeddings
    assert n == model.num_params(non_embedding=False) - emb.position_embeddings.weight.numel() \
        - emb.token_type_embeddings.weight.numel()
    assert model.flops_per_token(32) == 6 * n + 12 * CFG.n_layer * CFG.n_embd * 32


def test_mask_tokens_follows_bert_recipe():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (64, 512), generator=g)  # ~2.5% special tokens
    ids[:, 0] = 3  # [CLS] in every row
    inputs, labels = mask_tokens(ids, 200, MASK, SPECIAL, generator=torch.Generator().manual_seed(1))
    special = torch.isin(ids, torch.tensor(SPECIAL))
    selected = labels != -100
    assert not (selected & special).any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])  # nothing unselected is touched
    assert abs(selected.sum().item() / (~special).sum().item() - 0.15) < 0.01
    n = selected.sum().item()
    masked = selected & (inputs == MASK)
    replaced = selected & (inputs != MASK) & (inputs != ids)
    kept = selected & (inputs == ids)
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(replaced.sum().item() / n - 0.1) < 0.02  # a random draw equal to the original counts as kept
    assert abs(kept.sum().item() / n - 0.1) < 0.02
    assert not torch.isin(inputs[replaced], torch.tensor(SPECIAL)).any()
    again = mask_tokens(ids, 200, MASK, SPECIAL, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


def test_mask_tokens_rejects_bad_arguments():
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="^mask_prob:"):
        mask_tokens(ids, 10, MASK, SPECIAL, mask_prob=1.5)
    with pytest.raises(ValueError, match="^special_ids:"):
        mask_tokens(ids, 5, MASK, SPECIAL)
