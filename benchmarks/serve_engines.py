"""Benchmark: Helio's served generation against vLLM's, on the same weights.

    make vllm-env
    .venv-vllm/bin/python benchmarks/serve_engines.py [--storage ./runs] [--model pretrain_demo] [--tokens 64]

Three servers of one artifact:
- `helio`: Helio's application (jobs.serve on a local Ray cluster) with `engine: helio`
  (actors/generation_engine.py);
- `vllm`: the same application's second model, `engine: vllm` (vLLM's CPU build on Ray Serve's LLM
  support, actors/serve_vllm.py), behind the same ingress: the engines alone differ;
- `vllm-server`: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`, its HTTP
  front and tokenizer, no Ray), the peer a vLLM user would run.
Each engine has one thread (one CPU in Ray), room for 32 sequences, fp32 weights. Clients (benchmarks/serve.py's `load`: aiohttp, keep-alive, SSE timed as it
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.quantize import MAKE, job  # noqa: E402  (the demo recipes for a missing model)
from benchmarks.serve import free_port, load  # noqa: E402

ENGINES = ("helio", "vllm", "vllm-server")
LEVELS = (1, 8, 32)


def deploy(storage: str, model: str):
    from cluster.config import load_config
    from jobs import serve as serve_job

    each = "num_cpus: 1, max_batch_size: 32, max_ongoing_requests: 32"
    cfg = load_config(serve_job.ServeConfig, None, [
        f"storage={storage}", "name=engines", f"http.port={free_port()}", "grpc.port=0",
        f"models=[{{id: helio, artifact: {model}, {each}}}, {{id: vllm, artifact: {model}, engine: vllm, {each}}}]"])
    return serve_job.deploy(cfg)


def vllm_server(storage: str, model: str, folder: Path):
    """vLLM's OpenAI server on the artifact's weights and tokenizer, one thread, on a loopback port;
    returns (process, completions URL) once it answers /health. It reads a tokenizer_config.json, which
    Helio's artifacts do not carry: one naming the tokenizer's end-of-text is written beside a copy."""
    import os
    import subprocess
    import urllib.request

    from actors.serve_vllm import kv_cache_bytes
    from cluster.storage import Storage

    art = Storage(storage).open("model", model)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_bytes(art.read_bytes(name))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "eos_token": "<|endoftext|>"}))
    hf = json.loads((folder / "config.json").read_text())
    context = hf.get("max_position_embeddings") or hf["n_positions"]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name",
         "vllm-server", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
         "--max-model-len", str(context), "--max-num-seqs", "32", "--generation-config", "vllm",
         "--kv-cache-memory-bytes", str(kv_cache_bytes(hf, 32, context)), "--uvicorn-log-level", "warning"],
        env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM's server exited ({proc.returncode}); see {folder / 'server.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, f"http://127.0.0.1:{port}/v1/completions"
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("vLLM's server did not answer /health within 300 s")


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
    body = {"prompt": "def read(path):\n    ", "max_tokens": args.tokens, "temperature": 0.8, "top_k": 50,
            "stream": True}
    peer = {"stream_options": {"include_usage": True}}  # vLLM's server sends the usage chunk only when asked
    with tempfile.TemporaryDirectory(prefix="helio-vllm-server-") as folder:
        server = None
        try:
            helio = deploy(args.storage, args.model) + "/v1/completions"
            server, own = vllm_server(args.storage, args.model, Path(folder))
            urls = {"helio": helio, "vllm": helio, "vllm-server": own}
            extra = {"helio": {}, "vllm": {}, "vllm-server": peer}
            for engine in ENGINES:  # warm up: first requests pay for allocation
                asyncio.run(load(urls[engine], [body | extra[engine] | {"model": engine, "seed": i}
                                                for i in range(4)], 4, stream=True))
            for _ in range(args.rounds):
                for n in LEVELS:
                    for engine in ENGINES:
                        bodies = [body | extra[engine] | {"model": engine, "seed": i} for i in range(3 * n)]
                        runs[engine][n].append(asyncio.run(load(urls[engine], bodies, n, stream=True)))
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)
            serve.shutdown()
            ray.shutdown()
    result = {"model": args.model, "tokens": args.tokens, "rounds": args.rounds,
              "levels": {str(n): {e: {"median": median(runs[e][n]), "rounds": runs[e][n]} for e in ENGINES}
                         for n in LEVELS},
              "seconds": time.perf_counter() - started}
    for n in LEVELS:
        level, helio = result["levels"][str(n)], result["levels"][str(n)]["helio"]["median"]["tokens_per_s"]
        level["helio_over_vllm"] = helio / level["vllm"]["median"]["tokens_per_s"]
        level["helio_over_vllm_server"] = helio / level["vllm-server"]["median"]["tokens_per_s"]
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
    print("streams  engine       tok/s median (each round)     TTFT p50/p99 ms   ITL p50/p99 ms   errors")
    for n in LEVELS:
        level = r["levels"][str(n)]
        for e in ENGINES:
            rounds, mid = level[e]["rounds"], level[e]["median"]
            each = ", ".join(f"{x['tokens_per_s']:.0f}" for x in rounds)
            print(f"{n:7}  {e:11}  {mid['tokens_per_s']:7.0f} ({each:18})  "
                  f"{mid['ttft_p50_ms']:6.0f} / {mid['ttft_p99_ms']:6.0f}   "
                  f"{mid['itl_p50_ms']:5.1f} / {mid['itl_p99_ms']:5.1f}   {sum(x['errors'] for x in rounds)}")
        print(f"         helio / vllm (medians): {level['helio_over_vllm']:.2f}; "
              f"helio / vllm-server: {level['helio_over_vllm_server']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
