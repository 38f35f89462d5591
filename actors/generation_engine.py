"""Iteration-level (continuous) batching for a causal LM (GPT or Llama): requests join and leave the
running batch between decode steps (Yu et al., "Orca", OSDI 2022), so a new request never waits for
the others to finish.

One loop owns the model. Each iteration it
1. drops requests whose caller has gone (a closed stream, a cancelled call);
2. admits waiting requests into free slots of the SlotCache, one prefill each;
3. samples every live row's next token, in one pass, each with its request's own parameters;
4. frees the rows that finished (stop token, max_tokens, the context full);
5. runs one batched decode step for the rest.
Steps 2-5 run in a worker thread, so the event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch

from models.decoding import DecoderLM, SlotCache, sample_rows

log = logging.getLogger("helio.serve")
_DONE = object()


@dataclass
class Sequence:
    """One request's state in the engine."""
    ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    made: int = 0
    logits: torch.Tensor | None = None  # (vocab,) for the next token
    gone: bool = False  # the caller stopped listening


class Engine:
    def __init__(self, model: DecoderLM, max_batch: int, stream_interval_s: float = 0.0, context: int = 0):
        """`context`: tokens per sequence, prompt and reply (0: the model's block_size; more is capped to
        it). The KV cache holds max_batch x context tokens, so a long-context checkpoint is served with
        a smaller context than its own to fit memory."""
        self.model, self.max_batch, self.interval = model, max_batch, stream_interval_s
        self.context = min(context or model.cfg.block_size, model.cfg.block_size)
        norm = model.final_norm.weight  # never quantized: the activations' dtype and device
        self.device = norm.device
        self.cache = SlotCache(model.cfg, max_batch, norm.dtype, self.device, length=self.context)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.live: list[Sequence] = []  # live[i] is in slot i
        self.wake: asyncio.Event | None = None
        self.loop_task: asyncio.Task | None = None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="helio-engine")
        self.steps = self.tokens = 0  # decode steps run, tokens emitted
        self.step_failures = 0  # steps the model raised in: their requests failed, the engine kept serving

    async def generate(self, ids: list[int], params: dict[str, Any]) -> AsyncIterator[list[int]]:
        """The request's new token ids as they are sampled, in pieces: the first at once, then every token
        sampled since the last piece, at most one piece per `stream_interval_s` (each piece costs a message
        on every hop to the client; a token every millisecond would cost more than it computes)."""
        if not ids or len(ids) >= self.context:
            raise ValueError(f"a prompt needs 1 to {self.context - 1} tokens, got {len(ids)}")
        seed = params.get("seed")
        seq = Sequence(list(ids), int(params["max_tokens"]), float(params["temperature"]), params.get("top_k"),
                       params.get("top_p"), frozenset(params.get("stop_ids", ())),
                       torch.Generator().manual_seed(seed) if seed is not None else None)
        self._start()
        self.waiting.append(seq)
        self.wake.set()
        loop, sent = asyncio.get_running_loop(), float("-inf")
        try:
            done = False
            while not done:
                piece = [await seq.out.get()]
                if (wait := sent + self.interval - loop.time()) > 0 and piece[0] is not _DONE:
                    await asyncio.sleep(wait)
                sent = loop.time()
                while not seq.out.empty():
                    piece.append(seq.out.get_nowait())
                if any(isinstance(t, BaseException) for t in piece):
                    raise next(t for t in piece if isinstance(t, BaseException))
                done = piece[-1] is _DONE
                if tokens := [t for t in piece if t is not _DONE]:
                    yield tokens
        finally:
            seq.gone = True  # if it is still live, the loop frees its slot next iteration

    def _start(self) -> None:
        if self.loop_task is None or self.loop_task.done():
            self.wake = asyncio.Event()
            self.loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.live and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                emitted = await loop.run_in_executor(self.worker, self._step)
            except Exception as e:  # noqa: BLE001 - the model failed: fail every request it held, keep serving
                self.step_failures += 1
                log.warning("generation engine: a step failed (%d so far), failing its %d requests: %s: %s",
                            self.step_failures, len(self.live) + len(self.waiting), type(e).__name__, e)
                for seq in self.live + list(self.waiting):
                    seq.out.put_nowait(e)
                self.live, self.cache.live = [], 0
                self.waiting.clear()
                continue
            for seq, token, done in emitted:
                seq.out.put_nowait(token)
                if done:
                    seq.out.put_nowait(_DONE)

    @torch.no_grad()
    def _step(self) -> list[tuple[Sequence, int, bool]]:
        for i in reversed(range(len(self.live))):
            if self.live[i].gone:
                self._free(i)
        while self.waiting and len(self.live) < self.max_batch:
            seq = self.waiting.popleft()
            if seq.gone:
                continue
            logits, kv = self.model(torch.tensor([seq.ids], device=self.device))
            self.cache.add(kv)
            seq.logits = logits[0, -1]
            self.live.append(seq)
        emitted, block = [], self.context
        live = self.live
        tokens = sample_rows(torch.stack([s.logits for s in live]), torch.tensor([s.temperature for s in live]),
                             torch.tensor([s.top_k or 0 for s in live]),
                             torch.tensor([s.top_p or 1.0 for s in live]), [s.generator for s in live]).tolist()
        for seq, token in zip(live, tokens):
            seq.made += 1
            seq.ids.append(token)
            emitted.append((seq, token, token in seq.stop_ids or seq.made >= seq.max_tokens or
                            len(seq.ids) >= block))
        for i in reversed(range(len(self.live))):
            if emitted[i][2]:
                self._free(i)
        if self.live:
            last = torch.tensor([[s.ids[-1]] for s in self.live], device=self.device)  # (n, 1)
            logits = self.model.decode(last, self.cache)
            for seq, row in zip(self.live, logits):
                seq.logits = row
            self.steps += 1
        self.tokens += len(emitted)
        return emitted

    def _free(self, i: int) -> None:
        self.cache.free(i)
        last = self.live.pop()
        if i < len(self.live):
            self.live[i] = last
