from __future__ import annotations

import pytest
import torch

from models.gpt import GPT, GPTConfig, sample_next

CFG = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture()
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_causal_mask(model):
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % CFG.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10], b[:, 10])


def test_kv_cache_decode_equals_full_recompute(model):
    idx = torch.randint(0, CFG.vocab_size, (2, 20))
    full, _ = model(idx)
    logits, cache = model(idx[:, :8])  # prefill
    steps = [logits]
    chunk, cache = model(idx[:, 8:12], cache)  # several new tokens at once
    steps.append(chunk)
    for t in range(12, 20):  # then one at a time
        logits, cache = model(idx[:, t : t + 1], cache)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_generate_greedy_matches_argmax_loop_and_stops(model):
    prompt = torch.randint(0, CFG.vocab_size, (1, 5))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    ref = prompt
    for _ in range(6):
        logits, _ = model(ref)
        ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)
    stop = int(out[0, 7])
    stopped = model.generate(prompt, max_new_tokens=6, temperature=0, stop_tokens=[stop])
    assert stopped.shape[1] <= 8 and int(stopped[0, -1]) == stop


def test_sampling_filters():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 2, None, g)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, 1.0, None, 0.5, g)) for _ in range(200)}
    assert draws == {0}  # token 0 alone holds > 50% of the mass
    assert int(sample_next(logits, 0.0, None, None)) == 0


def test_tied_embeddings_and_flops(model):
    assert model.lm_head.weight is model.transformer.wte.weight
    n = model.num_params()
    assert model.flops_per_token(32) == 6 * n + 12 * CFG.n_layer * CFG.n_embd * 32
