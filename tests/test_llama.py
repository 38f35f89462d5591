"""The Llama family against `transformers` itself: tiny random-initialised Llama, Qwen2 and Mistral
models (built by `transformers`, saved sharded), imported into Helio and exported back, compute
the same logits and the same greedy continuations; Helio's KV-cache and batched slot decoding
equal a full recomputation; what Helio cannot honour in a checkpoint is refused by name."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from models.decoding import SlotCache
from models.hf_llama import CheckpointError, load_llama, save_llama
from models.llama import Llama, LlamaConfig
from tiny_hf import FAMILIES, save_family

ATOL = 1e-4  # fp32 logits of a 2-layer model: the two implementations differ by float reassociation only
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """name -> (the transformers model, its folder saved in shards with an index)."""
    out = {}
    for name in FAMILIES:
        folder = tmp_path_factory.mktemp(name)
        hf = save_family(name, folder)
        assert (folder / "model.safetensors.index.json").is_file()
        out[name] = hf, folder
    return out


@pytest.fixture(params=sorted(FAMILIES))
def family(request, saved):
    """(name, the transformers model, its sharded folder), for each family."""
    return request.param, *saved[request.param]


def _ids(seed: int, shape=(2, 40)) -> torch.Tensor:
    return torch.randint(3, 256, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_imported_logits_equal_transformers(family):
    _, hf, folder = family
    model = load_llama(folder).eval()
    ids = _ids(1)
    torch.testing.assert_close(model(ids)[0], hf(ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_exported_folder_loads_in_transformers_with_the_same_logits(family, tmp_path):
    name, _, folder = family
    model = load_llama(folder).eval()
    files = save_llama(model, tmp_path / "out", max_shard_bytes=30_000)
    assert "model.safetensors.index.json" in files and len(files) > 3
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.model_type == name
    ids = _ids(2)
    torch.testing.assert_close(back(ids).logits, model(ids)[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_greedy_continuation_is_transformers_generate(family):
    _, hf, folder = family
    model = load_llama(folder).eval()
    prompt = _ids(3, (1, 12))
    ours = model.generate(prompt, 32, temperature=0.0)
    theirs = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    assert ours.shape == (1, 44)
    assert ours.tolist() == theirs.tolist()


@torch.no_grad()
def test_kv_cache_and_slot_decoding_equal_full_recomputation(family):
    _, _, folder = family
    model = load_llama(folder).eval()
    ids = _ids(4, (3, 30))
    full = model(ids)[0]  # (3, 30, V)
    logits, cache = model(ids[:, :10])  # prefill, then one token at a time through the cache
    steps = [logits]
    for t in range(10, 30):
        logits, cache = model(ids[:, t:t + 1], cache)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache[0][0].shape == (3, model.cfg.n_kv_head, 30, model.cfg.head_dim)  # sized by KV heads

    # rows of different lengths in one slot cache (Mistral's window of 8 is shorter than all of them)
    slots = SlotCache(model.cfg, 3)
    lengths = [9, 14, 20]
    for row, n in enumerate(lengths):
        slots.add(model(ids[row:row + 1, :n])[1])
    assert slots.k.shape[2] == model.cfg.n_kv_head
    for step in range(6):
        nxt = torch.tensor([[ids[row, n + step]] for row, n in enumerate(lengths)])
        out = model.decode(nxt, slots)  # (3, 1, V)
        for row, n in enumerate(lengths):
            torch.testing.assert_close(out[row, 0], full[row, n + step], atol=1e-5, rtol=0)
    # several tokens per row in one pass (how speculative decoding verifies drafts): the same logits
    lengths = [n + 6 for n in lengths]
    out = model.decode(torch.stack([ids[row, n:n + 4] for row, n in enumerate(lengths)]), slots)  # (3, 4, V)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(out[row], full[row, n:n + 4], atol=1e-5, rtol=0)
    assert slots.lengths.tolist() == [n + 4 for n in lengths]


def test_a_fresh_model_trains_and_counts_its_flops():
    cfg = LlamaConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=1, n_embd=32, intermediate_size=48)
    torch.manual_seed(0)
    model = Llama(cfg)
    ids = torch.randint(0, 64, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first - 1.0  # memorises 4 rows
    n = sum(p.numel() for p in model.parameters())
    assert model.num_params() == n - 64 * 32  # untied: the lookup table does no matmul
    assert model.flops_per_token(16) == 6 * model.num_params() + 12 * 2 * 4 * 8 * 16


def _copy(folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


REFUSALS = {  # case -> the family whose config has the field (tests/test_import_model.py: rope, shards, ...)
    "o_proj bias": "llama", "partial sliding": "qwen2", "tied head differs": "qwen2",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_helio_cannot_honour_is_refused_by_name(saved, tmp_path, case):
    folder = _copy(saved[REFUSALS[case]][1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    if case == "o_proj bias":
        config["attention_bias"] = True
        match = "config.json: attention_bias true is not supported"
    elif case == "partial sliding":
        config.update(use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None)
        match = "config.json: sliding_window on some layers only"
    else:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shard = index["weight_map"]["model.embed_tokens.weight"]
        with safe_open(str(folder / shard), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
        save_file(tensors, str(folder / shard))
        index["weight_map"]["lm_head.weight"] = shard
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        match = "tie_word_embeddings is true but lm_head.weight differs from the embeddings"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(match)):
        load_llama(folder)


@pytest.mark.parametrize("qwen2", [False, True])
def test_an_embedding_model_is_saved_as_the_familys_base_class_and_pools_the_last_token(tmp_path, qwen2):
    """No LM head: saved as LlamaModel / Qwen2Model, whose last real token's hidden state transformers
    computes as Helio's `embed` does (right padding, an attention mask), and loaded back headless."""
    from transformers import AutoModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                      intermediate_size=64, tie_embeddings=not qwen2, qkv_bias=qwen2)
    model = Llama(cfg).eval().drop_lm_head()
    save_llama(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2Model" if qwen2 else "LlamaModel"]
    hf = AutoModel.from_pretrained(tmp_path).eval()
    back = load_llama(tmp_path).eval()
    assert not back.has_lm_head
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(10)[None] < torch.tensor([10, 6, 3])[:, None]).long()
    with torch.no_grad():
        h = hf(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, C)
        theirs = h[torch.arange(3), mask.sum(1) - 1]
        ours = model.embed(ids, mask)
        assert (ours - theirs).abs().max().item() <= ATOL
        assert torch.equal(back.embed(ids, mask), ours)
