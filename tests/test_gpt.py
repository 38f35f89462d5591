from __future__ import annotations

import pytest
import torch

from models.decoding import sample_next
from models.gpt import GPT, GPTConfig

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


def test_slot_cache_decodes_rows_of_different_lengths_joined_at_different_steps(model):
    """Iteration-level batching: every row's logits equal its own full recompute, whatever its batchmates."""
    from models.decoding import SlotCache

    pending = [torch.randint(0, CFG.vocab_size, (n,)).tolist() for n in (3, 9, 5, 14)]
    cache = SlotCache(CFG, slots=3)
    rows: list[list[int]] = []  # the live rows' tokens, in slot order
    for step in range(10):
        if step in (0, 2, 5) and pending:  # admit a new sequence now and then
            ids = pending.pop(0)
            logits, kv = model(torch.tensor([ids]))
            assert cache.add(kv) == len(rows)
            rows.append(ids + [int(logits[0, -1].argmax())])
        if step == 6:  # the first row finishes; the last moves into its slot
            cache.free(0)
            rows[0] = rows.pop()
        logits = model.decode(torch.tensor([[r[-1]] for r in rows]), cache)[:, 0]  # (rows, V)
        for r, row_logits in zip(rows, logits):
            full, _ = model(torch.tensor([r]))
            torch.testing.assert_close(row_logits, full[0, -1], atol=1e-5, rtol=1e-5)
            r.append(int(row_logits.argmax()))
    assert cache.lengths[:cache.live].tolist() == [len(r) - 1 for r in rows]
    # three tokens per row in one pass (speculative decoding's verification): the same logits
    logits = model.decode(torch.tensor([[r[-1], 7, 8] for r in rows]), cache)  # (rows, 3, V)
    for r, row_logits in zip(rows, logits):
        full, _ = model(torch.tensor([r + [7, 8]]))
        torch.testing.assert_close(row_logits, full[0, -3:], atol=1e-5, rtol=1e-5)
    assert cache.lengths[:cache.live].tolist() == [len(r) + 2 for r in rows]
    with pytest.raises(ValueError, match="slots are live"):
        while True:
            cache.add(model(torch.tensor([[1, 2]]))[1])


def test_sample_rows_draws_for_each_row_what_it_draws_alone_and_follows_the_distribution():
    from models.decoding import sample_rows

    torch.manual_seed(0)
    logits = torch.randn(5, 97) * 3
    params = [(0.0, None, None), (1.0, 5, None), (0.7, None, 0.8), (1.3, 20, 0.9), (1.0, None, None)]
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed * 10 + i) for i in range(5)]
        alone = [int(sample_next(logits[i:i + 1], t, k, p, g))
                 for i, ((t, k, p), g) in enumerate(zip(params, gens))]
        gens = [torch.Generator().manual_seed(seed * 10 + i) for i in range(5)]
        got = sample_rows(logits, torch.tensor([t for t, _, _ in params]),
                          torch.tensor([k or 0 for _, k, _ in params]),
                          torch.tensor([p or 1.0 for _, _, p in params]), gens)
        assert got.tolist() == alone
    probs = (logits[1] / 1.0).softmax(-1)  # row 1 without filters: frequencies follow the softmax
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_rows(logits[1:2], torch.ones(1), torch.zeros(1, dtype=torch.long), torch.ones(1),
                                     [g]) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=97).float() / 4000
    assert (freq - probs).abs().max() < 0.03
