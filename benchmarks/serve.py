"""Benchmark: Helio's serving on loopback against in-process ceilings and a plain Serve echo floor.

    .venv/bin/python benchmarks/serve.py [--storage ./runs] [--requests 256]
    .venv/bin/python benchmarks/serve.py --soak [--rate 4] [--count 1200]   (benchmarks/serve_soak.py)

One run, one local Ray cluster, one Serve application (jobs.serve) hosting the demo's Llama
(`pretrain_demo`, grouped-query attention) and the finetuned MiniLM (`finetune_embed_demo`), each
replica given one CPU and one torch thread; the in-process ceilings use one thread too. Clients are
asyncio + aiohttp with keep-alive connections, in this process.

(a) Embeddings: single-text POST /v1/embeddings at concurrency 1, 4 and 16: requests/s and p50/p99
    latency, against the in-process ceiling: the same texts through the same batched encode the
    replica runs (`Embedder.embed`'s length-sorted chunks of 16), texts/s.
(b) Generation: tokens/s of 1 SSE stream and the aggregate of 8 concurrent streams (seeded sampling,
    128 tokens), time to first token and inter-token latency (p50 / p99 over the streams), against
    in-process `generate` of 1 row and of 8 rows at once (KV cache). Against `transformers`' own
    `generate` on the same weights: benchmarks/llama_generate.py.
(c) Overhead: p50 latency at concurrency 1 of a plain Serve echo deployment (the framework's floor),
    of Helio's GET /health, and of a one-text embeddings request minus its in-process compute.

Targets (issue 6): (a) >= 0.7 x the ceiling at concurrency 16 with p99 <= 3 x p50; (b) 8 streams >= 3 x
one stream; (c) Helio's per-request overhead within 1.2 x the echo floor. A model missing from
--storage is made first with the shipped demo configs (a few minutes each on 2 CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import socket
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.quantize import MAKE, job  # noqa: E402  (the same recipes for missing demo models)

MODELS = {"gpt": "pretrain_demo", "emb": "finetune_embed_demo"}


def texts(n: int) -> list[str]:
    """n code snippets of 1-6 lines from the standard library (real, varied lengths)."""
    import collections
    import json as json_module
    import textwrap

    lines = [ln for m in (collections, textwrap, json_module) for ln in inspect.getsource(m).splitlines()
             if ln.strip()]
    return ["\n".join(lines[i * 7: i * 7 + 1 + i % 6]) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def load(url: str, bodies: list[dict], concurrency: int, stream: bool = False) -> dict:
    """Sends every body with `concurrency` in flight: requests/s, latency percentiles (ms), tokens."""
    import aiohttp

    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    latencies, tokens, errors = [], 0, 0
    ttfts, itls = [], []  # streams: time to the first token; each stream's mean gap between tokens

    async def worker(session) -> None:
        nonlocal tokens, errors
        while not queue.empty():
            body = queue.get_nowait()
            t = time.perf_counter()
            async with session.request("POST" if body else "GET", url, json=body or None) as r:
                if not stream or r.status != 200:
                    await r.read()
                else:  # server-sent events, timed as they arrive
                    first = last_at = None
                    async for line in r.content:
                        if line.startswith(b"data: {"):
                            last_at, last = time.perf_counter(), line
                            first = first or last_at
            latencies.append(time.perf_counter() - t)
            if r.status != 200:
                errors += 1
            elif stream:
                n = json.loads(last[6:])["usage"]["completion_tokens"]
                tokens += n
                ttfts.append(first - t)
                itls.append((last_at - first) / max(n - 1, 1))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(bodies), "errors": errors, "seconds": wall,
            "requests_per_s": len(bodies) / wall, "p50_ms": 1e3 * pct(latencies, 0.5),
            "p99_ms": 1e3 * pct(latencies, 0.99), "tokens_per_s": tokens / wall} | ({
                "ttft_p50_ms": 1e3 * pct(ttfts, 0.5), "ttft_p99_ms": 1e3 * pct(ttfts, 0.99),
                "itl_p50_ms": 1e3 * pct(itls, 0.5), "itl_p99_ms": 1e3 * pct(itls, 0.99)} if ttfts else {})


def embed_ceiling(storage: str, snippets: list[str]) -> dict:
    """The replica's batched encode, in this process, on one thread: texts/s and one text's time."""
    from actors.chat import special_id
    from actors.model_loader import open_runnable
    from actors.serve_deployments import encode
    from cluster.storage import Storage
    from tokenizers import Tokenizer

    torch.set_num_threads(1)
    model, art = open_runnable(Storage(storage), MODELS["emb"])
    tok = Tokenizer.from_str(art.read_bytes("tokenizer.json").decode())
    pad = special_id(tok, ("<|pad|>", "[PAD]", "<pad>")) or 0
    rows = [e.ids for e in tok.encode_batch(snippets)]
    encode(model, rows[:16], pad)  # warm up
    t = time.perf_counter()
    for i in range(0, len(rows), 16):
        encode(model, rows[i:i + 16], pad)
    batched = len(rows) / (time.perf_counter() - t)
    t = time.perf_counter()
    for r in rows[:64]:
        encode(model, [r], pad)
    return {"texts_per_s": batched, "one_text_ms": 1e3 * (time.perf_counter() - t) / 64}


def generate_ceiling(storage: str, prompt: list[int], n: int) -> dict:
    from actors.model_loader import open_runnable
    from cluster.storage import Storage

    torch.set_num_threads(1)
    model = open_runnable(Storage(storage), MODELS["gpt"])[0].eval()
    out = {}
    for rows in (1, 8):
        g = torch.Generator().manual_seed(0)
        model.generate(torch.tensor([prompt] * rows), 8, temperature=0.8, top_k=50, generator=g)  # warm up
        t = time.perf_counter()
        model.generate(torch.tensor([prompt] * rows), n, temperature=0.8, top_k=50, generator=g)
        out[f"rows_{rows}_tokens_per_s"] = rows * n / (time.perf_counter() - t)
    return out


def deploy(storage: str):
    """Helio's application plus the echo floor, on one local cluster; returns (Helio's URL, config)."""
    from ray import serve
    from starlette.requests import Request

    from cluster.config import load_config
    from jobs import serve as serve_job

    cfg = load_config(serve_job.ServeConfig, None, [
        f"storage={storage}", "name=bench", f"http.port={free_port()}", "grpc.port=0",
        f"models=[{{id: gpt, artifact: {MODELS['gpt']}, num_cpus: 1, max_batch_size: 8}},"
        f" {{id: emb, artifact: {MODELS['emb']}, task: embed, num_cpus: 1, max_batch_size: 16,"
        "   max_ongoing_requests: 32}]"])
    url = serve_job.deploy(cfg)

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Echo:
        async def __call__(self, request: Request) -> dict:
            return await request.json()

    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    return url, cfg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=str(ROOT / "runs"))
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--out", default=None, help="default benchmarks/results/serve.json (serve_soak.json)")
    parser.add_argument("--soak", action="store_true", help="a constant-rate soak instead (benchmarks/serve_soak.py)")
    parser.add_argument("--rate", type=float, default=4.0, help="soak: requests per second")
    parser.add_argument("--count", type=int, default=1200, help="soak: requests")
    args = parser.parse_args()
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("serve_soak.json" if args.soak else "serve.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    from cluster.storage import Storage

    store = Storage(args.storage)
    for name in MODELS.values():
        if not store.exists("model", name):
            print(f"making {name} with the demo configs ...", flush=True)
            for step in MAKE[name]:
                job(step, args.storage)
    started = time.perf_counter()
    snippets = texts(args.requests)
    if args.soak:
        return run_soak(args.storage, snippets, args.rate, args.count, out)
    ceiling = embed_ceiling(args.storage, snippets)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(store.open("model", MODELS["gpt"]).read_bytes("tokenizer.json").decode())
    prompt = "def read(path):\n    "
    gen_ceiling = generate_ceiling(args.storage, tok.encode(prompt, add_special_tokens=False).ids, 128)

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # 2 replicas of 1 CPU + ingress, proxy
    try:
        url, _ = deploy(args.storage)
        emb = [{"model": "emb", "input": s} for s in snippets]
        asyncio.run(load(url + "/v1/embeddings", emb[:32], 4))  # warm up
        embeddings = [asyncio.run(load(url + "/v1/embeddings", emb, c)) for c in (1, 4, 16)]
        gen = {"model": "gpt", "prompt": prompt, "max_tokens": 128, "temperature": 0.8, "top_k": 50,
               "stream": True}
        asyncio.run(load(url + "/v1/completions", [gen], 1, stream=True))  # warm up
        streams = {n: asyncio.run(load(url + "/v1/completions", [gen | {"seed": i} for i in range(n * 3)], n,
                                       stream=True)) for n in (1, 8)}
        echo = asyncio.run(load(url + "/echo", [{"input": s} for s in snippets], 1))
        health = asyncio.run(load(url + "/health", [{}] * len(snippets), 1))
        one = asyncio.run(load(url + "/v1/embeddings", emb, 1))
    finally:
        serve.shutdown()
        ray.shutdown()
    overhead_ms = one["p50_ms"] - ceiling["one_text_ms"]
    result = {
        "embeddings": {"ceiling_texts_per_s": ceiling["texts_per_s"], "levels": embeddings,
                       "ratio_at_16": embeddings[-1]["requests_per_s"] / ceiling["texts_per_s"],
                       "p99_over_p50_at_16": embeddings[-1]["p99_ms"] / embeddings[-1]["p50_ms"]},
        "generation": {"ceiling": gen_ceiling, "streams": {str(k): v for k, v in streams.items()},
                       "ratio_8_over_1": streams[8]["tokens_per_s"] / streams[1]["tokens_per_s"]},
        "overhead": {"echo_p50_ms": echo["p50_ms"], "health_p50_ms": health["p50_ms"],
                     "embed_one_p50_ms": one["p50_ms"], "embed_one_compute_ms": ceiling["one_text_ms"],
                     "helio_overhead_ms": overhead_ms, "ratio_to_echo": overhead_ms / echo["p50_ms"]},
        "seconds": time.perf_counter() - started,
    }
    print_tables(result)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def run_soak(storage: str, snippets: list[str], rate: float, count: int, out: Path) -> int:
    import ray
    from ray import serve

    from benchmarks.serve_soak import print_soak, soak

    ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False)  # the State API lists replicas
    try:
        url, cfg = deploy(storage)
        result = soak(url, cfg.name, snippets, rate, count)
    finally:
        serve.shutdown()
        ray.shutdown()
    print_soak(result)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if result["errors"] == 0 and result["memory_ok"] else 1


def print_tables(r: dict) -> None:
    e = r["embeddings"]
    print(f"\n(a) embeddings, one text per request; in-process batched encode: {e['ceiling_texts_per_s']:.0f} texts/s")
    print(f"{'concurrency':>11} {'req/s':>8} {'x ceiling':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for lv in e["levels"]:
        print(f"{lv['concurrency']:>11} {lv['requests_per_s']:>8.1f} "
              f"{lv['requests_per_s'] / e['ceiling_texts_per_s']:>9.2f} {lv['p50_ms']:>8.1f} {lv['p99_ms']:>8.1f} "
              f"{lv['errors']:>6}")
    g = r["generation"]
    print("\n(b) generation (the demo's Llama), 128 sampled tokens per stream; TTFT and inter-token latency")
    print("    (a stream's mean gap between tokens: pieces arrive every stream_interval_s) p50 / p99 over streams")
    print(f"{'':>24} {'tokens/s':>9} {'TTFT ms':>15} {'ITL ms':>13}")
    print(f"{'in-process, 1 row':>24} {g['ceiling']['rows_1_tokens_per_s']:>9.0f}")
    print(f"{'in-process, 8 rows':>24} {g['ceiling']['rows_8_tokens_per_s']:>9.0f}")
    for n, s in g["streams"].items():
        print(f"{f'Helio, {n} stream(s)':>24} {s['tokens_per_s']:>9.0f} "
              f"{s['ttft_p50_ms']:>7.0f} / {s['ttft_p99_ms']:<5.0f} {s['itl_p50_ms']:>5.1f} / {s['itl_p99_ms']:<5.1f} "
              f"(errors {s['errors']})")
    print(f"8 streams / 1 stream: {g['ratio_8_over_1']:.2f} (target >= 3)")
    o = r["overhead"]
    print(f"\n(c) per-request overhead at concurrency 1 (p50): echo deployment {o['echo_p50_ms']:.2f} ms, "
          f"Helio /health {o['health_p50_ms']:.2f} ms, one-text embedding {o['embed_one_p50_ms']:.2f} ms of which "
          f"compute {o['embed_one_compute_ms']:.2f} ms -> overhead {o['helio_overhead_ms']:.2f} ms = "
          f"{o['ratio_to_echo']:.2f} x echo (target <= 1.2)")


if __name__ == "__main__":
    sys.exit(main())
