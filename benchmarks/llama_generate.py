"""Benchmark: Llama generation, Helio against Hugging Face `transformers` on the same weights.

    .venv/bin/python benchmarks/llama_generate.py [--layers 4] [--width 512] [--tokens 128] [--threads 1]

A Llama with grouped-query attention (8 query heads, 2 key/value heads, SwiGLU, untied head) is
built randomly initialised by `transformers` (nothing downloaded), saved, and imported by Helio
(models.hf.load_model). Both generate greedily from the same prompt on the same number of torch
threads, in this process:

- 1 stream: Helio's continuous-batching engine (actors/generation_engine.py, what a Serve replica
  runs) against `transformers`' `generate` (its KV cache): tokens/s, time to first token, inter-token
  latency p50 / p99;
- 8 streams: 8 requests at once in Helio's engine (one decode batch, the grouped-query slot cache):
  aggregate tokens/s against its one stream.

Targets (issue 17): Helio's single stream >= 1.2 x `transformers`; 8 streams >= 3 x one stream.
Both decode the same tokens (checked). Also Helio's int8 model (models/quant.py) on one stream: one
decoded token reads every weight once, so at batch 1 the float models are bound by memory
bandwidth and int8 reads a quarter of the bytes. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def hf_model(layers: int, width: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=width, intermediate_size=width * 8 // 3 // 32 * 32,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def timed_hf(hf, prompt: list[int], n: int) -> dict:
    """transformers' greedy generate: tokens/s, and the per-token times seen by a streamer."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor([prompt])
    hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm up
    clock = Clock()
    t0 = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=clock)
    wall = time.perf_counter() - t0
    times = clock.times[1:]  # the first put is the prompt
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"tokens": out[0, len(prompt):].tolist(), "tokens_per_s": n / wall, "ttft_ms": 1e3 * (times[0] - t0),
            "itl_p50_ms": 1e3 * pct(gaps, 0.5), "itl_p99_ms": 1e3 * pct(gaps, 0.99)}


async def stream(engine, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    tokens, times = [], []
    async for piece in engine.generate(prompt, {"max_tokens": n, "temperature": 0.0}):
        tokens += piece
        times += [time.perf_counter()] * len(piece)
    return tokens, times


def timed_helio(model, prompt: list[int], n: int, streams: int) -> dict:
    from actors.generation_engine import Engine

    async def run() -> tuple[float, list]:
        engine = Engine(model, max_batch=max(streams, 1))
        await stream(engine, prompt, 4)  # warm up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream(engine, prompt, n) for _ in range(streams)))
        return t0, results

    t0, results = asyncio.run(run())
    end = max(t[-1] for _, t in results)
    tokens, times = results[0]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"tokens": tokens, "same_in_every_stream": all(r[0] == tokens for r in results),
            "tokens_per_s": sum(len(r[0]) for r in results) / (end - t0), "ttft_ms": 1e3 * (times[0] - t0),
            "itl_p50_ms": 1e3 * pct(gaps, 0.5), "itl_p99_ms": 1e3 * pct(gaps, 0.99)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llama_generate.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from models.hf import load_model

    hf = hf_model(args.layers, args.width)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = load_model(d).eval()
    params = sum(p.numel() for p in hf.parameters())
    prompt = torch.randint(10, 8000, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    best = lambda runs: max(runs, key=lambda r: r["tokens_per_s"])  # noqa: E731
    theirs = best([timed_hf(hf, prompt, args.tokens) for _ in range(args.repeats)])
    one = best([timed_helio(model, prompt, args.tokens, 1) for _ in range(args.repeats)])
    eight = best([timed_helio(model, prompt, args.tokens, 8) for _ in range(args.repeats)])
    from models.quant import QuantSpec, quantize_model

    int8 = quantize_model(model, QuantSpec("int8"))[0]  # a quarter of the weight bytes each token reads
    one_int8 = best([timed_helio(int8, prompt, args.tokens, 1) for _ in range(args.repeats)])
    same = one["tokens"] == theirs["tokens"] == eight["tokens"] and eight["same_in_every_stream"]
    result = {
        "model": {"layers": args.layers, "width": args.width, "heads": 8, "kv_heads": 2, "parameters": params},
        "prompt_tokens": args.prompt, "new_tokens": args.tokens, "threads": args.threads,
        "cpu": platform.processor() or platform.machine(), "same_tokens": same,
        "transformers": {k: v for k, v in theirs.items() if k != "tokens"},
        "helio_1_stream": {k: v for k, v in one.items() if k not in ("tokens", "same_in_every_stream")},
        "helio_8_streams": {k: v for k, v in eight.items() if k not in ("tokens", "same_in_every_stream")},
        "helio_int8_1_stream": {k: v for k, v in one_int8.items() if k not in ("tokens", "same_in_every_stream")}
        | {"tokens_equal_to_float": sum(a == b for a, b in zip(one_int8["tokens"], one["tokens"]))},
    }
    result["ratios"] = {"helio_vs_transformers_1_stream": one["tokens_per_s"] / theirs["tokens_per_s"],
                        "helio_8_vs_1_streams": eight["tokens_per_s"] / one["tokens_per_s"],
                        "helio_int8_vs_transformers_1_stream": one_int8["tokens_per_s"] / theirs["tokens_per_s"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"Llama {args.layers} layers x {args.width}, 8 heads / 2 KV heads, {params / 1e6:.1f} M parameters; "
          f"{args.prompt}-token prompt, {args.tokens} greedy tokens, {args.threads} thread(s); same tokens: {same}")
    print(f"{'':24} {'tokens/s':>9} {'TTFT ms':>8} {'ITL p50':>8} {'ITL p99':>8}")
    for name, r in (("transformers generate", theirs), ("Helio, 1 stream", one), ("Helio, 8 streams", eight),
                    ("Helio int8, 1 stream", one_int8)):
        print(f"{name:24} {r['tokens_per_s']:9.1f} {r['ttft_ms']:8.1f} {r['itl_p50_ms']:8.2f} {r['itl_p99_ms']:8.2f}")
    r = result["ratios"]
    print(f"Helio / transformers, 1 stream: {r['helio_vs_transformers_1_stream']:.2f}x (target >= 1.2x); "
          f"8 streams / 1 stream: {r['helio_8_vs_1_streams']:.2f}x (target >= 3x)")
    print(f"Helio int8 / transformers (float), 1 stream: {r['helio_int8_vs_transformers_1_stream']:.2f}x; int8's "
          f"first {args.tokens} tokens equal float's at {result['helio_int8_1_stream']['tokens_equal_to_float']}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
