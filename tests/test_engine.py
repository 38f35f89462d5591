"""actors.generation_engine: iteration-level batching gives every caller what the model generates for it
alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from actors.generation_engine import Engine
from models.decoding import DecoderLM
from models.gpt import GPT, GPTConfig
from models.llama import Llama, LlamaConfig

MODELS = {
    "gpt": lambda: GPT(GPTConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_embd=32)),
    # grouped-query attention (a cache of 2 KV heads) and a sliding window shorter than most sequences
    "llama": lambda: Llama(LlamaConfig(vocab_size=97, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                       intermediate_size=64, sliding_window=12)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request) -> DecoderLM:
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


def greedy(n: int, stop: tuple[int, ...] = ()) -> dict:
    return {"max_tokens": n, "temperature": 0.0, "stop_ids": list(stop)}


async def collect(engine: Engine, ids: list[int], params: dict, delay: float = 0.0) -> list[int]:
    await asyncio.sleep(delay)
    return [t async for piece in engine.generate(ids, params) for t in piece]


def test_concurrent_requests_joining_mid_flight_get_their_own_greedy_continuation(model):
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,)).tolist() for n in (3, 11, 6, 20, 1, 8, 15)]
    lengths = [12, 5, 30, 9, 20, 1, 7]

    async def main():
        engine = Engine(model, max_batch=3)  # fewer slots than requests: some wait for a free one
        got = await asyncio.gather(*(collect(engine, p, greedy(n), delay=0.002 * i)
                                     for i, (p, n) in enumerate(zip(prompts, lengths))))
        return engine, got

    engine, got = asyncio.run(main())
    for p, n, tokens in zip(prompts, lengths, got):
        n = min(n, model.cfg.block_size - len(p))  # the context is full before max_tokens for the longest
        assert tokens == model.generate(torch.tensor([p]), n, temperature=0)[0, len(p):].tolist()
    assert engine.tokens == sum(len(t) for t in got) and engine.cache.live == 0
    assert engine.steps < engine.tokens  # decode steps were shared between requests


def test_a_stop_token_ends_a_request_and_a_caller_that_leaves_frees_its_slot(model):
    prompt = [5, 6, 7]
    free_run = model.generate(torch.tensor([prompt]), 10, temperature=0)[0, 3:].tolist()

    async def main():
        engine = Engine(model, max_batch=1)
        stopped = await collect(engine, prompt, greedy(10, stop=(free_run[3],)))
        stream = engine.generate(prompt, greedy(30))
        first = await stream.__anext__()
        while len(first) < 2:
            first += await stream.__anext__()
        await stream.aclose()  # the caller goes away mid-generation
        after = await asyncio.wait_for(collect(engine, prompt, greedy(4)), timeout=30)  # the one slot is free again
        return stopped, first, after, engine

    stopped, first, after, engine = asyncio.run(main())
    assert stopped == free_run[:free_run.index(free_run[3]) + 1]
    assert first == free_run[:len(first)] and after == free_run[:4] and engine.cache.live == 0


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(model):
    params = {"max_tokens": 12, "temperature": 1.0, "top_k": 20, "seed": 3}

    async def main():
        engine = Engine(model, max_batch=4)
        alone = await collect(engine, [1, 2, 3], params)
        crowded = await asyncio.gather(collect(engine, [1, 2, 3], params),
                                       *(collect(engine, [9, i], greedy(12)) for i in range(3)))
        return alone, crowded[0]

    alone, crowded = asyncio.run(main())
    assert alone == crowded


def test_a_prompt_that_fills_the_context_is_refused(model):
    async def main():
        engine = Engine(model, max_batch=2)
        with pytest.raises(ValueError, match="a prompt needs 1 to 39 tokens"):
            await collect(engine, list(range(40)), greedy(1))

    asyncio.run(main())


def test_a_context_cap_sizes_the_cache_and_ends_sequences_where_the_cap_says(model):
    """A long-context checkpoint served with a smaller context: a cache of max_batch x cap tokens, prompts
    refused at the cap, and a reply cut where prompt + reply fill it, the same tokens as uncapped."""
    cap = 16
    engine = Engine(model, max_batch=2, context=cap)
    assert engine.context == cap and engine.cache.k.shape[3] == cap
    assert Engine(model, max_batch=2, context=10 * model.cfg.block_size).context == model.cfg.block_size
    prompt = torch.randint(0, model.cfg.vocab_size, (6,)).tolist()

    async def main():
        got = await collect(engine, prompt, greedy(30))
        with pytest.raises(ValueError, match=f"a prompt needs 1 to {cap - 1} tokens, got {cap}"):
            await collect(engine, list(range(cap)), greedy(2))
        return got

    got = asyncio.run(main())
    assert got == model.generate(torch.tensor([prompt]), cap - len(prompt), temperature=0)[0, len(prompt):].tolist()
