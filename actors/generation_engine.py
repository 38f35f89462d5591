"""Iteration-level (continuous) batching for a causal LM (GPT or Llama): requests join and leave the
running batch between decode steps (Yu et al., "Orca", OSDI 2022), so a new request never waits for
the others to finish.

One loop owns the model. Each iteration it
1. drops requests whose caller has gone (a closed stream, a cancelled call);
2. admits waiting requests into free slots of the SlotCache, one prefill each;
3. samples every live row's next token, in one pass, each with its request's own parameters;
4. frees the rows that finished (stop token, max_tokens, the context full);
5. runs one batched decode step for the rest.
The loop runs in a worker thread, step after step while any request is live or waiting, and hands
each step's tokens to the event loop, which keeps accepting requests and streaming meanwhile (the
thread does not wait for the event loop between steps: that round trip cost 0.3-0.5 ms a token).

Greedy rows decode speculatively by prompt lookup (Saxena, 2023; vLLM's "ngram" method): when the
row's last tokens occurred earlier in its prompt or reply, the tokens that followed them there are
drafts, checked in the same decode pass (T tokens per row instead of one). The drafts the model
would have chosen itself are kept, so the reply is the greedy reply; at batch 1 a decode step reads
every weight once whether it checks one token or five, so each kept draft is a step saved.

A request that asks for log-probabilities gets each token as a Scored: its log-probability under the
model (log_softmax of the logits it was chosen from, before temperature or truncation, as OpenAI and
vLLM report them) and the likeliest alternatives. With `prompt_logprobs` the prompt's own tokens come
first, scored from the prefill's logits, so `max_tokens` 0 scores a text without generating.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch

from actors.token_scores import Scored
from models.decoding import DecoderLM, SlotCache, column_major, sample_rows

log = logging.getLogger("helio.serve")
_DONE = object()


def scored(logits: torch.Tensor, tokens: list[int], k: int) -> list[Scored]:
    """logits (n, V), the model's before each of n `tokens` -> each token with its log-probability and
    the k likeliest at its position."""
    if not tokens:
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    tops: list[tuple] = [()] * len(tokens)
    if k:
        values, ids = logp.topk(min(k, logp.size(-1)), dim=-1)  # (n, k)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [Scored(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


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
    lookup: NgramLookup | None = None  # greedy rows: where to find drafts
    logprobs: int | None = None  # alternatives per token when the caller asked for log-probabilities
    prompt_logprobs: bool = False  # the prompt's tokens are scored and sent first


class NgramLookup:
    """Prompt-lookup drafts for one sequence: the tokens that followed an earlier occurrence of its last
    `max_n` (down to 1) tokens, the latest occurrence unless too few tokens follow it (in a loop the
    latest overlaps the tail), then the first. An index of every n-gram's first and latest end, grown
    with the sequence, so a lookup costs O(new tokens), not a scan of the context."""

    def __init__(self, max_n: int = 3):
        self.max_n, self.indexed = max_n, 0
        self.ends: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (first, latest) index of its last token

    def drafts(self, ids: list[int], k: int) -> list[int]:
        """Up to k tokens that followed an earlier occurrence of ids' tail (none if it has none)."""
        last = len(ids) - 1
        for end in range(self.indexed, last):  # every n-gram ending before the tail's last token
            for n in range(1, min(self.max_n, end + 1) + 1):
                gram = tuple(ids[end - n + 1:end + 1])
                self.ends[gram] = (self.ends.get(gram, (end, end))[0], end)
        self.indexed = max(self.indexed, last)
        for n in range(min(self.max_n, last), 0, -1):  # the longest tail that occurred before
            if (ends := self.ends.get(tuple(ids[last - n + 1:]))) is not None:
                first, latest = ends
                return ids[latest + 1:latest + 1 + k] if last - latest >= k else ids[first + 1:first + 1 + k]
        return []


class Engine:
    def __init__(self, model: DecoderLM, max_batch: int, stream_interval_s: float = 0.0, context: int = 0,
                 draft_tokens: int = 4):
        """`context`: tokens per sequence, prompt and reply (0: the model's block_size; more is capped to
        it). The KV cache holds max_batch x context tokens, so a long-context checkpoint is served with
        a smaller context than its own to fit memory. `draft_tokens`: prompt-lookup drafts a greedy row
        checks per step (0: none). The model's Linear weights are laid out column-major for decoding
        (models.decoding.column_major): the engine owns the model it serves."""
        self.model, self.max_batch, self.interval = column_major(model), max_batch, stream_interval_s
        self.draft_tokens = draft_tokens
        self.context = min(context or model.cfg.block_size, model.cfg.block_size)
        norm = model.final_norm.weight  # never quantized: the activations' dtype and device
        self.device = norm.device
        self.cache = SlotCache(model.cfg, max_batch, norm.dtype, self.device, length=self.context)
        self.waiting: collections.deque[Sequence] = collections.deque()  # appended by the event loop
        self.live: list[Sequence] = []  # live[i] is in slot i; the worker thread's alone
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="helio-engine")
        self.lock = threading.Lock()  # guards `running` against a request that arrives as the loop ends
        self.running = False
        self.steps = self.tokens = 0  # decode steps run, tokens emitted
        self.drafted = self.accepted = 0  # draft tokens checked, and kept
        self.step_failures = 0  # steps the model raised in: their requests failed, the engine kept serving
        self.scoring: list[Sequence] = []  # this step's score-only requests (max_tokens 0): done at prefill

    async def generate(self, ids: list[int], params: dict[str, Any]) -> AsyncIterator[list[int]]:
        """The request's new token ids as they are sampled, in pieces: the first at once, then every token
        sampled since the last piece, at most one piece per `stream_interval_s` (each piece costs a message
        on every hop to the client; a token every millisecond would cost more than it computes)."""
        if not ids or len(ids) >= self.context:
            raise ValueError(f"a prompt needs 1 to {self.context - 1} tokens, got {len(ids)}")
        seed = params.get("seed")
        seq = Sequence(list(ids), int(params["max_tokens"]), float(params["temperature"]), params.get("top_k"),
                       params.get("top_p"), frozenset(params.get("stop_ids", ())),
                       torch.Generator().manual_seed(seed) if seed is not None else None,
                       logprobs=params.get("logprobs"), prompt_logprobs=bool(params.get("prompt_logprobs")))
        if seq.max_tokens < (0 if seq.prompt_logprobs and seq.logprobs is not None else 1):
            raise ValueError(f"max_tokens must be at least 1 (0 only to score a prompt), got {seq.max_tokens}")
        if seq.temperature == 0 and self.draft_tokens:
            seq.lookup = NgramLookup()
        self.waiting.append(seq)
        self._start()
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
        """Starts the worker thread's loop unless it runs (after the request joined `waiting`)."""
        with self.lock:
            if not self.running:
                self.running = True
                self.worker.submit(self._run, asyncio.get_running_loop())

    def _busy(self) -> bool:
        with self.lock:
            self.running = bool(self.live or self.waiting)
            return self.running

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        """The worker thread: steps while a request is live or waiting; tokens go to `loop`."""
        try:
            while self._busy():
                try:
                    emitted = self._step()
                except Exception as e:  # noqa: BLE001 - the model failed: fail every request it held, keep serving
                    failed = self.live + self.scoring + [self.waiting.popleft() for _ in range(len(self.waiting))]
                    self.live, self.cache.live = [], 0
                    self.step_failures += 1
                    log.warning("generation engine: a step failed (%d so far), failing its %d requests: %s: %s",
                                self.step_failures, len(failed), type(e).__name__, e)
                    loop.call_soon_threadsafe(self._fail, failed, e)
                    continue
                loop.call_soon_threadsafe(self._deliver, emitted)
        except RuntimeError:  # the event loop closed under live requests: nobody is left to answer
            with self.lock:
                self.live, self.cache.live, self.running = [], 0, False
                self.waiting.clear()

    @staticmethod
    def _deliver(emitted: list[tuple[Sequence, int | Scored, bool]]) -> None:
        for seq, token, done in emitted:
            seq.out.put_nowait(token)
            if done:
                seq.out.put_nowait(_DONE)

    @staticmethod
    def _fail(failed: list[Sequence], error: Exception) -> None:
        for seq in failed:
            seq.out.put_nowait(error)

    @torch.no_grad()
    def _step(self) -> list[tuple[Sequence, int | Scored, bool]]:
        self.scoring = []
        for i in reversed(range(len(self.live))):
            if self.live[i].gone:
                self._free(i)
        emitted: list[tuple[Sequence, int | Scored, bool]] = []
        while self.waiting and len(self.live) + len(self.scoring) < self.max_batch:
            seq = self.waiting.popleft()
            if seq.gone:
                continue
            self.live.append(seq)  # first: if the prefill fails, the failure reaches this request too
            logits, kv = self.model(torch.tensor([seq.ids], device=self.device))
            if seq.prompt_logprobs and seq.logprobs is not None:  # ids[0] has no logits before it
                prompt = [Scored(seq.ids[0], None, ())] + scored(logits[0, :-1], seq.ids[1:], seq.logprobs)
                emitted += [(seq, item, False) for item in prompt]
                if seq.max_tokens == 0:  # scored, not generated: it takes no cache slot, but a prefill of this step
                    emitted[-1] = (seq, prompt[-1], True)
                    self.scoring.append(self.live.pop())
                    continue
            self.cache.add(kv)
            seq.logits = logits[0, -1]
        live, scored_prompts = self.live, len(emitted)
        if not live:  # every admitted request only scored its prompt
            return emitted

        def column(values: list) -> torch.Tensor:  # the rows' sampling parameters, beside their logits
            return torch.tensor(values, device=self.device)

        tokens = sample_rows(torch.stack([s.logits for s in live]), column([s.temperature for s in live]),
                             column([s.top_k or 0 for s in live]), column([s.top_p or 1.0 for s in live]),
                             [s.generator for s in live]).tolist()
        finished = [self._emit(seq, [token], emitted, seq.logits[None]) for seq, token in zip(live, tokens)]
        for i in reversed(range(len(self.live))):
            if finished[i]:
                self._free(i)
        if self.live:
            self._decode(emitted)
            self.steps += 1
        self.tokens += len(emitted) - scored_prompts
        return emitted

    def _emit(self, seq: Sequence, tokens: list[int], emitted: list, logits: torch.Tensor) -> bool:
        """Appends the row's new tokens up to the first that ends it (stop token, max_tokens, the
        context full); True if one did. `logits` (len(tokens), V): those each token was chosen from."""
        items = scored(logits, tokens, seq.logprobs) if seq.logprobs is not None else tokens
        for token, item in zip(tokens, items):
            seq.made += 1
            seq.ids.append(token)
            done = token in seq.stop_ids or seq.made >= seq.max_tokens or len(seq.ids) >= self.context
            emitted.append((seq, item, done))
            if done:
                return True
        return False

    def _decode(self, emitted: list) -> None:
        """One batched decode step: each live row's last token, and a greedy row's drafts after it. A
        row keeps the drafts its own logits pick, in order (as greedy decoding would emit them); its
        cache is cut back to them, and its next logits are those after the last kept one."""
        live, start = self.live, self.cache.lengths[:len(self.live)].tolist()  # where each row's tokens go
        drafts = [s.lookup.drafts(s.ids, min(self.draft_tokens, s.max_tokens - s.made, self.context - len(s.ids)))
                  if s.lookup else [] for s in live]
        width = min(1 + max(map(len, drafts)), self.cache.length - max(start))  # every row's tokens fit
        rows = [([s.ids[-1]] + d + [s.ids[-1]] * width)[:width] for s, d in zip(live, drafts)]  # padded
        logits = self.model.decode(torch.tensor(rows, device=self.device), self.cache)  # (n, width, V)
        picks = logits[:, :-1].argmax(dim=-1).tolist() if width > 1 else [[]] * len(live)  # (n, width - 1)
        finished = []
        for i, (seq, d) in enumerate(zip(live, drafts)):
            kept = 0
            while kept < min(len(d), width - 1) and picks[i][kept] == d[kept]:
                kept += 1
            self.drafted, self.accepted = self.drafted + min(len(d), width - 1), self.accepted + kept
            self.cache.lengths[i] = start[i] + 1 + kept
            seq.logits = logits[i, kept]
            finished.append(self._emit(seq, d[:kept], emitted, logits[i, :kept]))
        for i in reversed(range(len(live))):
            if finished[i]:
                self._free(i)

    def _free(self, i: int) -> None:
        self.cache.free(i)
        last = self.live.pop()
        if i < len(self.live):
            self.live[i] = last
