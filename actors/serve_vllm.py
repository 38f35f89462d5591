"""Generation through vLLM (a model entry's `engine: vllm`), on Ray Serve's LLM support.

`VLLMGenerator` is Ray Serve LLM's `LLMServer` (which starts vLLM's engine in the replica, in the
placement group Ray Serve LLM sizes for it, and answers Serve's health checks from the engine) with the
two methods Helio's ingress calls on any generator: `generate` and `stream`, token ids in and out. So
everything in front of it is Helio's own and unchanged: API keys, the OpenAI routes and shapes, gRPC,
stop strings, log-probabilities, the monitor's probes and canary routing. Helio's ingress tokenizes,
so vLLM runs without a tokenizer (`skip_tokenizer_init`).

The replica verifies the artifact (every file's sha256, the quality gate) and copies its weights to a
local folder, as Helio's own engine does, then points vLLM at that folder. This module imports vLLM:
actors/serve_app.py imports it only for a model whose config says `engine: vllm`, after checking that
vLLM is installed.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from ray.serve.llm import LLMConfig
from ray.serve.llm.deployment import LLMServer
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind

from actors.model_loader import MODEL_FILES, check_servable
from actors.token_scores import Scored
from cluster.storage import Storage, fetch_folder

KV_FLOOR_BYTES = 64 << 20  # vLLM's CPU KV cache, at least


def head_dim(hf: dict) -> int:
    """Channels per attention head, from a GPT-2 or Llama-family config.json."""
    heads = hf.get("num_attention_heads") or hf["n_head"]
    return hf.get("head_dim") or (hf.get("hidden_size") or hf["n_embd"]) // heads


def cpu_refusal(hf: dict) -> str | None:
    """Why vLLM's CPU build cannot run this model, or None: its attention kernels exist for some head
    sizes only (an unsupported one kills the engine at the first request)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim(hf) not in sizes:
        return f"vLLM's CPU build has no attention kernel for head_dim {head_dim(hf)} (only {sizes})"
    return None


def kv_cache_bytes(hf: dict, max_batch_size: int, context: int, dtype_bytes: int = 4) -> int:
    """CPU KV-cache bytes: twice what `max_batch_size` sequences of `context` tokens need (vLLM
    allocates in blocks and rounds every sequence up), at least KV_FLOOR_BYTES. GPT-2's and the
    Llama family's config.json name the sizes differently."""
    layers = hf.get("num_hidden_layers") or hf["n_layer"]
    kv_heads = hf.get("num_key_value_heads") or hf.get("num_attention_heads") or hf["n_head"]
    per_token = 2 * layers * kv_heads * head_dim(hf)
    return max(2 * per_token * dtype_bytes * max_batch_size * context, KV_FLOOR_BYTES)


def llm_config(model_id: str, folder: str, *, num_cpus: float, num_gpus: float, threads: int, max_batch_size: int,
               context: int, kv_bytes: int = 0) -> LLMConfig:
    """Ray Serve LLM's config for one replica: vLLM on `num_gpus` GPUs (tensor parallel), or on CPU
    with `threads` threads and a KV cache of `kv_bytes` (CPU memory is not vLLM's to claim). On GPUs
    vLLM's `auto` dtype runs an fp32 checkpoint in bf16 where the GPU has it, else fp16 (Helio's own
    rule); on CPU the weights stay fp32 (bf16 matmuls are far slower on CPUs without AMX)."""
    engine = {"skip_tokenizer_init": True, "max_model_len": context, "max_num_seqs": max_batch_size,
              "generation_config": "vllm"}  # the checkpoint's own sampling defaults do not apply
    if num_gpus:
        return LLMConfig(model_loading_config={"model_id": model_id, "model_source": folder},
                         accelerator_config={"kind": "gpu"},
                         engine_kwargs={**engine, "dtype": "auto", "tensor_parallel_size": int(num_gpus)})
    return LLMConfig(model_loading_config={"model_id": model_id, "model_source": folder},
                     accelerator_config={"kind": "cpu"}, placement_group_config={"bundles": [{"CPU": num_cpus}]},
                     runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                               "OMP_NUM_THREADS": str(threads)}},
                     engine_kwargs={**engine, "dtype": "float32", "enforce_eager": True,
                                    "kv_cache_memory_bytes": kv_bytes})


def deployment_options(opts: dict[str, Any], num_cpus: float, num_gpus: float) -> dict[str, Any]:
    """Helio's deployment options (name, replicas, queues, draining) with Ray Serve LLM's placement
    group for the engine. On CPU the group's one bundle holds the replica's CPUs, which vLLM's engine
    process uses; on GPUs a bundle per GPU, the first also holding the replica's CPUs."""
    cfg = llm_config("probe", "", num_cpus=num_cpus, num_gpus=num_gpus, threads=1, max_batch_size=1, context=2)
    cfg.deployment_config = {**opts, "ray_actor_options": {"num_cpus": num_cpus if num_gpus else 0, "num_gpus": 0}}
    return LLMServer.get_deployment_options(cfg)


def sampling(params: dict[str, Any]) -> SamplingParams:
    """Helio's sampling parameters (actors/serve_requests.py) as vLLM's. vLLM generates at least one
    token: a prompt scored alone (max_tokens 0) takes one and drops it."""
    logprobs, prompt = params.get("logprobs"), params.get("prompt_logprobs")
    return SamplingParams(max_tokens=max(1, int(params["max_tokens"])), temperature=float(params["temperature"]),
                          top_p=params.get("top_p") or 1.0, top_k=params.get("top_k") or 0, seed=params.get("seed"),
                          stop_token_ids=list(params.get("stop_ids", ())), logprobs=logprobs,
                          prompt_logprobs=logprobs if prompt else None, detokenize=False,
                          output_kind=RequestOutputKind.DELTA)


def _top(position: dict, k: int) -> tuple[tuple[int, float], ...]:
    """vLLM's log-probabilities at one position -> the `k` likeliest (id, log-probability), best first."""
    ranked = sorted((lp.rank, token, lp.logprob) for token, lp in position.items() if lp.rank is not None)
    return tuple((token, logprob) for rank, token, logprob in ranked if rank <= k)


def scored_prompt(ids: list[int], positions: list, k: int) -> list[Scored]:
    """The prompt's tokens with their log-probabilities (None for the first, which nothing predicts)."""
    return [Scored(t, None, ()) if p is None else Scored(t, p[t].logprob, _top(p, k)) for t, p in zip(ids, positions)]


class VLLMGenerator(LLMServer):
    async def __init__(self, storage: str, artifact: str, force: bool, model_id: str, num_cpus: float,
                       num_gpus: float, threads: int, max_batch_size: int, context: int,
                       stream_interval_s: float):
        art = Storage(storage).open("model", artifact, verify=True)
        check_servable(art, force)
        self.folder = fetch_folder(art.uri, MODEL_FILES)  # kept while the replica lives
        hf = json.loads((Path(self.folder.name) / "config.json").read_text())
        self.interval, self.context = stream_interval_s, context
        await super().__init__(llm_config(model_id, self.folder.name, num_cpus=num_cpus, num_gpus=num_gpus,
                                          threads=threads, max_batch_size=max_batch_size, context=context,
                                          kv_bytes=kv_cache_bytes(hf, max_batch_size, context)))

    async def _outputs(self, ids: list[int], params: dict[str, Any]) -> AsyncIterator[list]:
        """The request's new items (token ids, or Scored with log-probabilities) as vLLM emits them."""
        if not ids or len(ids) >= self.context:
            raise ValueError(f"a prompt needs 1 to {self.context - 1} tokens, got {len(ids)}")
        k, score_only = params.get("logprobs"), int(params["max_tokens"]) == 0
        client = self.engine._engine_client  # Ray Serve LLM's vLLM AsyncLLM (set by LLMServer.start)
        async for out in client.generate(TokensPrompt(prompt_token_ids=list(ids)), sampling(params), uuid.uuid4().hex):
            items: list = scored_prompt(ids, out.prompt_logprobs, k) if out.prompt_logprobs else []
            if not score_only:
                new = out.outputs[0]
                items += (list(new.token_ids) if k is None else
                          [Scored(t, p[t].logprob, _top(p, k)) for t, p in zip(new.token_ids, new.logprobs)])
            if items:
                yield items

    async def generate(self, ids: list[int], params: dict[str, Any]) -> list:
        return [item async for piece in self._outputs(ids, params) for item in piece]

    async def stream(self, ids: list[int], params: dict[str, Any]) -> AsyncIterator[list]:
        """Pieces as vLLM steps, at most one per `stream_interval_s` after the first (as Helio's engine
        streams): a piece costs a message on every hop to the client."""
        loop, sent, held = asyncio.get_running_loop(), float("-inf"), []
        async for piece in self._outputs(ids, params):
            held += piece
            if loop.time() - sent >= self.interval:
                yield held
                sent, held = loop.time(), []
        if held:
            yield held
