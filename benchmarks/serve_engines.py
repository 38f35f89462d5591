"""Benchmark: Helio's generation engine against vLLM's, each behind Helio's same served front.

    make vllm-env
    .venv-vllm/bin/python benchmarks/serve_engines.py [--storage ./runs] [--model pretrain_demo] [--tokens 64]

One local Ray cluster and one Serve application (jobs.serve) serve the same artifact twice: with
`engine: helio` (actors/generation_engine.py) and with `engine: vllm` (vLLM's CPU build on Ray Serve's
LLM support, actors/serve_vllm.py). Each replica has one CPU and one thread, room for 32 sequences, and
the same ingress in front. Clients (benchmarks/serve.py's `load`: aiohttp, keep-alive, SSE timed as it
arrives) open 1, 8 and 32 concurrent streams of seeded sampled completions, `--tokens` tokens each,
three requests per stream. The engines take turns at each level, `--rounds` times, so that a drift of
the machine falls on both. Reported per engine and level: tokens/s, time to first token and
inter-token latency p50 / p99 (what `vllm bench serve` reports, from the median round), and every
round's tokens/s; the ratio compares the engines' median rounds. Target (issue 18): Helio's tokens/s
at least vLLM's at every concurrency, on CPU.

The default model is the demo's Llama (`pretrain_demo`, made with the demo configs if missing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.quantize import MAKE, job  # noqa: E402  (the demo recipes for a missing model)
from benchmarks.serve import free_port, load  # noqa: E402

ENGINES = ("helio", "vllm")
LEVELS = (1, 8, 32)


def deploy(storage: str, model: str):
    from cluster.config import load_config
    from jobs import serve as serve_job

    each = "num_cpus: 1, max_batch_size: 32, max_ongoing_requests: 32"
    cfg = load_config(serve_job.ServeConfig, None, [
        f"storage={storage}", "name=engines", f"http.port={free_port()}", "grpc.port=0",
        f"models=[{{id: helio, artifact: {model}, {each}}}, {{id: vllm, artifact: {model}, engine: vllm, {each}}}]"])
    return serve_job.deploy(cfg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=str(ROOT / "runs"))
    parser.add_argument("--model", default="pretrain_demo")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_engines.json"))
    args = parser.parse_args()
    from cluster.storage import Storage

    if not Storage(args.storage).exists("model", args.model):
        if args.model not in MAKE:
            print(f"no model artifact '{args.model}' under {args.storage}", file=sys.stderr)
            return 2
        print(f"making {args.model} with the demo configs ...", flush=True)
        for step in MAKE[args.model]:
            job(step, args.storage)
    import ray
    from ray import serve

    started = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # 2 replicas, ingress, proxy
    runs: dict[str, dict[int, list[dict]]] = {e: {n: [] for n in LEVELS} for e in ENGINES}
    try:
        url = deploy(args.storage, args.model) + "/v1/completions"
        body = {"prompt": "def read(path):\n    ", "max_tokens": args.tokens, "temperature": 0.8, "top_k": 50,
                "stream": True}
        for engine in ENGINES:  # warm up: first requests pay for allocation
            asyncio.run(load(url, [body | {"model": engine, "seed": i} for i in range(4)], 4, stream=True))
        for _ in range(args.rounds):
            for n in LEVELS:
                for engine in ENGINES:
                    bodies = [body | {"model": engine, "seed": i} for i in range(3 * n)]
                    runs[engine][n].append(asyncio.run(load(url, bodies, n, stream=True)))
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"model": args.model, "tokens": args.tokens, "rounds": args.rounds,
              "levels": {str(n): {e: {"median": median(runs[e][n]), "rounds": runs[e][n]} for e in ENGINES}
                         for n in LEVELS},
              "seconds": time.perf_counter() - started}
    for n in LEVELS:
        level = result["levels"][str(n)]
        level["helio_over_vllm"] = level["helio"]["median"]["tokens_per_s"] / level["vllm"]["median"]["tokens_per_s"]
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def median(rounds: list[dict]) -> dict:
    """The round with the median tokens/s (the lower middle one of an even count)."""
    return sorted(rounds, key=lambda x: x["tokens_per_s"])[(len(rounds) - 1) // 2]


def print_table(r: dict) -> None:
    print(f"\n{r['model']}, {r['tokens']} sampled tokens per request, {r['rounds']} alternating rounds")
    print("streams  engine  tok/s median (each round)     TTFT p50/p99 ms   ITL p50/p99 ms   errors")
    for n in LEVELS:
        level = r["levels"][str(n)]
        for e in ENGINES:
            rounds, mid = level[e]["rounds"], level[e]["median"]
            each = ", ".join(f"{x['tokens_per_s']:.0f}" for x in rounds)
            print(f"{n:7}  {e:6}  {mid['tokens_per_s']:7.0f} ({each:18})  "
                  f"{mid['ttft_p50_ms']:6.0f} / {mid['ttft_p99_ms']:6.0f}   "
                  f"{mid['itl_p50_ms']:5.1f} / {mid['itl_p99_ms']:5.1f}   {sum(x['errors'] for x in rounds)}")
        print(f"         helio / vllm (medians): {level['helio_over_vllm']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
