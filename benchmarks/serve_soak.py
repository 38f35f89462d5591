"""The bounded soak of benchmarks/serve.py --soak: a constant request rate for a fixed count against the
demo application, mixing SSE completion streams, chat completions and embeddings.

The load is open-loop: request i leaves at start + i / rate whether or not earlier ones have been
answered, so a slow server meets the same arrivals instead of slowing its own load down (the
coordinated omission a closed-loop tool such as Locust's users has; Locust also monkey-patches the
process with gevent, which Ray's driver in this process does not survive). Clients are aiohttp with
keep-alive connections.

Reported: the error rate (target 0), p50 / p99 latency per kind in each tenth of the run (by send
time), the achieved rate, and every replica's resident memory after the warm-up and at the end. The
bound on growth: end <= 1.10 x start + 32 MiB per replica (allocator and Python caches settle in
steps; a leak of a few KiB a request over a long run crosses it).
"""

from __future__ import annotations

import asyncio
import json
import time

KINDS = ("stream", "chat", "embed")
GROWTH = (1.10, 32.0)  # end <= 1.10 x start + 32 MiB


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def requests(count: int, snippets: list[str]) -> list[tuple[str, str, dict]]:
    """(kind, path, body) for each of `count` requests: the three kinds in turn."""
    out = []
    for i in range(count):
        kind = KINDS[i % 3]
        if kind == "stream":
            out.append((kind, "/v1/completions", {"model": "gpt", "prompt": snippets[i % len(snippets)][:200],
                                                  "max_tokens": 32, "temperature": 0.8, "seed": i, "stream": True}))
        elif kind == "chat":
            out.append((kind, "/v1/chat/completions", {"model": "gpt", "max_tokens": 16, "temperature": 0,
                                                       "messages": [{"role": "user", "content": snippets[i % 50]}]}))
        else:
            out.append((kind, "/v1/embeddings", {"model": "emb", "input": snippets[i % len(snippets)]}))
    return out


async def open_loop(url: str, plan: list[tuple[str, str, dict]], rate: float) -> list[dict]:
    """Sends plan[i] at start + i / rate; one record per request: kind, sent (s from start), latency, ok."""
    import aiohttp

    records: list[dict] = []

    async def one(session, i: int, kind: str, path: str, body: dict, start: float) -> None:
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        sent = time.perf_counter()
        ok, error = False, ""
        try:
            async with session.post(url + path, json=body) as r:
                data = await r.read()
                ok = r.status == 200 and (not body.get("stream") or data.rstrip().endswith(b"data: [DONE]")
                                          and b'"error"' not in data)
                error = "" if ok else f"{r.status} {data[:200]!r}"
        except Exception as e:  # noqa: BLE001 - a failed request is counted, the soak goes on
            error = f"{type(e).__name__}: {e}"
        records.append({"kind": kind, "sent": sent - start, "latency": time.perf_counter() - sent, "ok": ok,
                        "error": error})

    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        start = time.perf_counter() + 0.5
        await asyncio.gather(*(one(session, i, *p, start) for i, p in enumerate(plan)))
    return records


def replica_rss_mib(app: str) -> dict[str, float]:
    """Resident memory of each of the app's replicas (this machine's processes), by replica actor name."""
    import psutil
    from ray.util.state import list_actors

    out = {}
    for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        name = a.name or ""
        if name.startswith("SERVE_REPLICA::") and f"::{app}#" in name and a.pid:
            out[name.split("::", 1)[1]] = psutil.Process(a.pid).memory_info().rss / 2**20
    return out


def soak(url: str, app: str, snippets: list[str], rate: float, count: int) -> dict:
    warm = requests(30, snippets)
    asyncio.run(open_loop(url, warm, rate))
    before = replica_rss_mib(app)
    t = time.perf_counter()
    records = asyncio.run(open_loop(url, requests(count, snippets), rate))
    seconds = time.perf_counter() - t
    after = replica_rss_mib(app)
    span = max(r["sent"] for r in records) or 1.0
    windows = []
    for w in range(10):
        inside = [r for r in records if w / 10 <= r["sent"] / span < (w + 1) / 10 or (w == 9 and r["sent"] == span)]
        windows.append({"from_s": w * span / 10, "requests": len(inside),
                        "errors": sum(not r["ok"] for r in inside)} | {
            f"{k}_{q}_ms": 1e3 * pct([r["latency"] for r in inside if r["kind"] == k], v)
            for k in KINDS for q, v in (("p50", 0.5), ("p99", 0.99))})
    errors = [r for r in records if not r["ok"]]
    memory = {name: {"start_mib": before[name], "end_mib": after.get(name, float("nan")),
                     "within_bound": after.get(name, float("inf")) <= GROWTH[0] * before[name] + GROWTH[1]}
              for name in before}
    return {"rate_per_s": rate, "count": count, "seconds": seconds, "achieved_per_s": count / seconds,
            "errors": len(errors), "error_rate": len(errors) / count, "first_errors": [r["error"] for r in errors[:5]],
            "overall": {f"{k}_{q}_ms": 1e3 * pct([r["latency"] for r in records if r["kind"] == k], v)
                        for k in KINDS for q, v in (("p50", 0.5), ("p99", 0.99))},
            "windows": windows, "memory": memory, "memory_bound": f"end <= {GROWTH[0]} x start + {GROWTH[1]:.0f} MiB",
            "memory_ok": all(m["within_bound"] for m in memory.values())}


def print_soak(r: dict) -> None:
    print(f"\nsoak: {r['count']} requests at {r['rate_per_s']:g}/s (open loop; streams of 32 tokens, chats of 16, "
          f"one-text embeddings in turn): {r['seconds']:.0f} s, {r['achieved_per_s']:.2f}/s achieved")
    print(f"errors: {r['errors']} ({100 * r['error_rate']:.2f} %, target 0)" +
          (f"; first: {json.dumps(r['first_errors'])}" if r["errors"] else ""))
    head = "".join(f"{k + ' p50/p99 ms':>22}" for k in KINDS)
    print(f"{'from s':>7} {'requests':>8} {'errors':>6}{head}")
    for w in r["windows"]:
        cells = "".join(f"{w[f'{k}_p50_ms']:>12.0f} / {w[f'{k}_p99_ms']:<7.0f}" for k in KINDS)
        print(f"{w['from_s']:>7.0f} {w['requests']:>8} {w['errors']:>6}{cells}")
    print(f"replica resident memory (bound: {r['memory_bound']}):")
    for name, m in sorted(r["memory"].items()):
        print(f"  {name:<40} {m['start_mib']:>7.0f} MiB -> {m['end_mib']:>7.0f} MiB "
              f"{'ok' if m['within_bound'] else 'OVER'}")
