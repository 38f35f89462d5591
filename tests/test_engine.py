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


def test_prompt_lookup_drafts_keep_the_greedy_reply_and_save_decode_steps(model):
    """Greedy rows check prompt-lookup drafts in their decode step: the reply is token for token what
    greedy decoding gives without drafts (also where a stop token, max_tokens or the context ends it
    inside a step's kept drafts), in fewer steps when the reply repeats its context."""
    torch.manual_seed(1)
    loop = [3, 4, 5, 6] * 4  # a prompt that repeats itself: a random model's reply soon loops too
    free_run = model.generate(torch.tensor([loop]), 20, temperature=0)[0, len(loop):].tolist()
    cases = [(loop, greedy(20)), (loop, greedy(7)), (loop, greedy(20, stop=(free_run[9],))),
             (loop + loop, greedy(30)),  # 32 + 8 fills the 40-token context
             (torch.randint(0, model.cfg.vocab_size, (9,)).tolist(), greedy(25)),
             ([1, 2, 3], {"max_tokens": 15, "temperature": 1.0, "seed": 5})]  # sampled: no drafts

    def run(drafts: int):
        async def main():
            engine = Engine(model, max_batch=4, draft_tokens=drafts)
            got = await asyncio.gather(*(collect(engine, p, params, delay=0.001 * i)
                                         for i, (p, params) in enumerate(cases)))
            return engine, got
        return asyncio.run(main())

    plain, without = run(0)
    speculative, got = run(4)
    assert got == without
    for (p, params), tokens in zip(cases[:-1], got):
        n = min(params["max_tokens"], model.cfg.block_size - len(p))
        expect = model.generate(torch.tensor([p]), n, temperature=0)[0, len(p):].tolist()
        stops = [i for i, t in enumerate(expect) if t in params["stop_ids"]]
        assert tokens == expect[:stops[0] + 1 if stops else n]
    assert plain.drafted == 0 and speculative.accepted > 0
    assert speculative.steps < plain.steps and speculative.tokens == plain.tokens
    assert speculative.cache.live == 0


def test_ngram_lookup_drafts_what_followed_the_tail_before():
    from actors.generation_engine import NgramLookup

    lookup = NgramLookup(max_n=3)
    ids = [1, 2, 3, 4, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup.drafts(ids, 2) == [7, 8]  # (1, 2, 3) last occurred before 7, 8
    ids += [6]
    assert lookup.drafts(ids, 3) == []  # 6 never occurred before
    ids += [2]
    assert lookup.drafts(ids, 2) == [3, 6]  # only the 1-gram (2,) matched before; its latest occurrence
    loop = [5, 5, 5, 5, 5, 5]
    assert NgramLookup().drafts(loop, 3) == [5, 5, 5]  # the latest overlaps the tail: the first occurrence
    assert NgramLookup().drafts([1, 2], 4) == []


def test_column_major_weights_keep_every_value_and_the_logits():
    import copy

    from models.decoding import column_major

    torch.manual_seed(2)
    model = MODELS["llama"]().eval()
    flipped = column_major(copy.deepcopy(model))
    ids = torch.randint(0, 97, (3, 20))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), flipped.state_dict().values()))
    assert not flipped.lm_head.weight.is_contiguous() and flipped.lm_head.weight.t().is_contiguous()
    torch.testing.assert_close(flipped(ids)[0], model(ids)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("broken", ["forward", "decode"])  # the prefill, or a decode step
def test_a_failing_step_fails_its_requests_and_the_engine_serves_the_next(model, broken):
    prompt = [1, 2, 3]
    expect = model.generate(torch.tensor([prompt]), 5, temperature=0)[0, 3:].tolist()

    def fail(*args):
        raise RuntimeError("the replica is out of memory")

    async def main():
        engine = Engine(model, max_batch=2)
        setattr(model, broken, fail)
        try:
            failed = await asyncio.wait_for(asyncio.gather(  # the third only scores its prompt, in the same step
                collect(engine, prompt, greedy(5)), collect(engine, [4, 5], greedy(5)),
                collect(engine, [6, 7], greedy(0) | {"logprobs": 1, "prompt_logprobs": True}),
                return_exceptions=True), 30)
        finally:
            delattr(model, broken)
        return engine, failed, await asyncio.wait_for(collect(engine, prompt, greedy(5)), 30)

    engine, failed, after = asyncio.run(main())
    assert [str(e) for e in failed] == ["the replica is out of memory"] * 3  # none left waiting
    assert engine.step_failures >= 1 and after == expect and engine.cache.live == 0


def _reference_logprobs(model: DecoderLM, ids: list[int]) -> torch.Tensor:
    """log_softmax of one full forward over `ids`, in float64: row i scores token i + 1."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].double(), dim=-1)


@pytest.mark.parametrize("drafts", [0, 4])
def test_logprobs_are_the_models_log_softmax_for_prompt_and_reply(model, drafts):
    """Each generated token's log-probability and top alternatives equal log_softmax of one full forward
    over prompt + reply (1e-4), whether the token came from a plain step or a kept draft; with
    prompt_logprobs the prompt comes first (its first token unscored); max_tokens 0 only scores."""
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]  # repetitive: greedy rows keep drafts

    async def main(engine):
        return await asyncio.gather(
            collect(engine, prompt, greedy(12) | {"logprobs": 3, "prompt_logprobs": True}),
            collect(engine, prompt[:5], greedy(0) | {"logprobs": 2, "prompt_logprobs": True}),
            collect(engine, prompt, {"max_tokens": 6, "temperature": 1.0, "seed": 1, "logprobs": 0, "stop_ids": []}),
            collect(engine, prompt, greedy(12)))

    engine = Engine(model, max_batch=4, draft_tokens=drafts)
    echoed, scored_only, sampled, plain = asyncio.run(main(engine))
    assert [t[0] for t in echoed[len(prompt):]] == plain  # the same reply, scored
    ids = [t[0] for t in echoed]
    assert ids[:len(prompt)] == prompt and echoed[0][1] is None and echoed[0][2] == ()
    ref = _reference_logprobs(model, ids)
    for i in range(1, len(ids)):
        token, logprob, top = echoed[i]
        assert abs(logprob - ref[i - 1, token].item()) < 1e-4
        values, best = ref[i - 1].topk(3)
        assert [t for t, _ in top] == best.tolist() and len(top) == 3
        assert max(abs(v - w) for (_, v), w in zip(top, values.tolist())) < 1e-4
        if i >= len(prompt):  # greedy: the chosen token is the likeliest
            assert top[0][0] == token and top[0][1] == logprob
    # max_tokens 0: the first 5 prompt tokens scored as above, with 2 alternatives; nothing generated
    assert len(scored_only) == 5 and scored_only[0] == (prompt[0], None, ())
    for (t, lp, top), (t2, lp2, top2) in zip(scored_only[1:], echoed[1:5]):  # shorter forward: float noise only
        assert t == t2 and abs(lp - lp2) < 1e-5 and [i for i, _ in top] == [i for i, _ in top2[:2]]
        assert all(abs(v - w) < 1e-5 for (_, v), (_, w) in zip(top, top2))
    ref = _reference_logprobs(model, prompt + [t[0] for t in sampled])  # sampled rows: the raw model's
    assert all(abs(lp - ref[len(prompt) - 1 + i, t].item()) < 1e-4 and top == ()
               for i, (t, lp, top) in enumerate(sampled))
    if drafts:
        assert engine.accepted > 0  # kept drafts were scored from the verify pass
    assert engine.tokens == len(plain) * 2 + len(sampled) and engine.cache.live == 0


def test_max_tokens_0_without_prompt_scores_is_refused(model):
    async def main():
        return await collect(Engine(model, max_batch=1), [1, 2], greedy(0))

    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        asyncio.run(main())
