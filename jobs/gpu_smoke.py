"""Prove a GPU node end to end on one GPU, in minutes, and print what each stage did.

    make gpu-smoke                                   # on a machine with a GPU (an embedded local Ray)
    python -m jobs.gpu_smoke [--storage DIR] [--steps 20]
    ray job submit --working-dir . -- python -m jobs.gpu_smoke --storage /shared/smoke
    python -m jobs.gpu_smoke --cpu                   # the same stages, tiny, on CPU: checks the wiring only

Stages, each one a row of the table (a stage that fails is a row with its error; the rest still run
where they can):
1. prepare: the stdlib demo dataset (jobs/configs/prepare_demo.yaml);
2. pretrain, GPT-2 124M (12 x 768) and a Llama of the same width (12 x 768, 12 query / 4 key-value
   heads), each with ZeRO-2 and then ZeRO-3 with optimizer and parameter offload, `--steps` steps on
   one GPU, precision `auto` (bf16 where the GPU has it, fp16 with loss scaling where not): tokens/s
   and MFU against the datasheet peak (cluster/devices.py);
3. make_tasks, then a LoRA SFT finetune of the pretrained Llama;
4. int8 and int4 quantization of the finetuned Llama (a CPU job), and the serve config's refusal of
   a quantized artifact on a GPU replica (no CUDA integer kernels are wired in);
5. serve: the finetuned Llama on a replica with `num_gpus: 1`: a sampled completion, a chat request
   (answered through the SFT model's chat template; a model without one gets the documented 400,
   which counts as an answer) and the gRPC health check;
6. the same Serve checks through vLLM (`engine: vllm`, actors/serve_vllm.py) where vLLM is installed
   (the vllm extra); a row that says so where it is not;
7. DeepSpeed ops built at run time: none expected (Helio trains with torch's AdamW and torch.distributed's
   collectives; the GPU node installs DeepSpeed without building ops and has no compiler step at run
   time). Every stage runs with TORCH_EXTENSIONS_DIR in the smoke's folder, whose contents are the row.

Without CUDA it says so in one line and exits 2. `--cpu` runs the same stages with tiny models, fp32,
on CPU, to check the wiring on a machine without a GPU; its numbers mean nothing. Exit 0 when every
stage that should pass passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
import urllib.error
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "jobs" / "configs"
GPT_124M = ["model.arch=gpt", "model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.n_kv_head=0",
            "model.tie_embeddings=false"]
LLAMA = ["model.arch=llama", "model.n_layer=12", "model.n_head=12", "model.n_kv_head=4", "model.n_embd=768",
         "model.tie_embeddings=false"]
TINY = ["model.n_layer=2", "model.n_head=4", "model.n_embd=128"]  # head_dim 32: vLLM's CPU kernels start there


class Smoke:
    def __init__(self, storage: str, steps: int, cpu: bool):
        self.storage, self.steps, self.cpu = storage, steps, cpu
        self.rows: list[tuple[str, str, float, str]] = []  # stage, ok | FAILED, seconds, what it measured

    def stage(self, name: str, fn: Callable[[], str]) -> bool:
        print(f"--- gpu-smoke: {name}", flush=True)
        t0 = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as e:  # noqa: BLE001 - a failed stage is a row of the table, not the end of the run
            traceback.print_exc()
            detail, ok = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160], False
        self.rows.append((name, "ok" if ok else "FAILED", time.perf_counter() - t0, detail))
        return ok

    def common(self) -> list[str]:
        return [f"storage={self.storage}"]

    def resources(self) -> list[str]:
        if self.cpu:
            return ["resources.num_workers=2", "resources.cpus_per_worker=0.5", "resources.use_gpu=false"]
        return ["resources.num_workers=1", "resources.cpus_per_worker=4", "resources.use_gpu=true"]

    def prepare(self) -> str:
        from cluster.config import load_config
        from jobs.prepare import PrepareConfig, run

        manifest = run(load_config(PrepareConfig, str(CONFIGS / "prepare_demo.yaml"), self.common()))
        return f"dataset {manifest['name']}: {manifest['metrics'].get('train_tokens', '?')} training tokens"

    def pretrain(self, name: str, model: list[str], offload: bool) -> str:
        from cluster.config import load_config
        from jobs.pretrain import PretrainConfig, run

        zero = (["zero.stage=3", "zero.offload_optimizer=true", "zero.offload_params=true"] if offload
                else ["zero.stage=2"])
        overrides = (self.common() + [f"name={name}", f"train.steps={self.steps}", "train.log_every=5",
                                      f"train.eval_every={self.steps}", f"train.checkpoint_every={self.steps}",
                                      "zero.precision=auto"] + model + (TINY if self.cpu else []) + zero
                     + self.resources())
        m = run(load_config(PretrainConfig, str(CONFIGS / "pretrain_demo.yaml"), overrides))["metrics"]
        mfu = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
        return f"{m['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, val loss {m['val_loss']:.3f}"

    def make_tasks(self) -> str:
        from cluster.config import load_config
        from jobs.make_tasks import MakeTasksConfig, run

        manifest = run(load_config(MakeTasksConfig, str(CONFIGS / "make_tasks_demo.yaml"), self.common()))
        return f"tasks {manifest['name']}"

    def lora(self) -> str:
        from cluster.config import load_config
        from jobs.finetune import FinetuneConfig, run

        overrides = self.common() + ["name=smoke_lora", "base.artifact=smoke_llama_zero2", "method=lora",
                                     f"train.steps={self.steps}", f"train.eval_every={self.steps}",
                                     f"train.checkpoint_every={self.steps}", "eval.max_examples=4"] + self.resources()
        m = run(load_config(FinetuneConfig, str(CONFIGS / "finetune_sft_demo.yaml"), overrides))["metrics"]
        return ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float) and "loss" in k) or "done"

    def quantize(self, method: str) -> str:
        from cluster.config import load_config
        from jobs.quantize import QuantizeConfig, run

        overrides = self.common() + [f"name=smoke_{method}", "model=smoke_lora", f"method={method}",
                                     "group_size=64", "max_quality_delta=1000", "eval.max_examples=16"]
        m = run(load_config(QuantizeConfig, str(CONFIGS / "quantize_demo.yaml"), overrides))["metrics"]
        return ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))[:160]

    def refuse_quantized_on_gpu(self) -> str:
        from actors.serve_app import ServeConfig, entries
        from cluster.config import ConfigError, load_config

        cfg = load_config(ServeConfig, None, self.common() + ["models=[{id: q, artifact: smoke_int8, num_gpus: 1}]"])
        try:
            entries(cfg)
        except ConfigError as e:
            return f"refused as it should be: {str(e)[:120]}"
        raise AssertionError("a quantized artifact on a GPU replica was not refused")

    def serve(self, engine: str = "helio") -> str:
        from ray import serve

        from actors.serve_app import ServeConfig, api_keys
        from actors.serve_client import grpc_health, post
        from cluster.config import load_config
        from cluster.runtime import connect_job
        from jobs.serve import deploy

        gpus = 0 if self.cpu else 1
        cfg = load_config(ServeConfig, None, self.common() + [
            "name=gpu_smoke", "serve_seconds=0", "http.port=8011", "grpc.port=9011",
            f"models=[{{id: llama, artifact: smoke_lora, num_gpus: {gpus}, num_cpus: 1, engine: {engine}}}]"])
        connect_job(cfg)
        url = deploy(cfg)
        try:
            keys = api_keys(cfg)
            done = post(url + "/v1/completions", {"model": "llama", "prompt": "def read(path):\n    ",
                                                  "max_tokens": 24, "temperature": 0.8, "seed": 0}, keys)
            chat = _chat(url, keys)
            health = grpc_health(cfg)
            return (f"sampled completion {done['usage']['completion_tokens']} tokens; chat: {chat}; "
                    f"gRPC health {health}")
        finally:
            serve.delete(cfg.name)

    def table(self) -> str:
        width = max(len(r[0]) for r in self.rows)
        lines = [f"{'stage':{width}}  result  seconds  measured", "-" * (width + 40)]
        lines += [f"{name:{width}}  {ok:6}  {secs:7.1f}  {detail}" for name, ok, secs, detail in self.rows]
        return "\n".join(lines)


def _chat(url: str, keys: list[str]) -> str:
    """A chat request's outcome: the reply's length, or the 400 a model without a chat template gives."""
    from actors.serve_client import post

    body = {"model": "llama", "messages": [{"role": "user", "content": "Write a function."}], "max_tokens": 16}
    try:
        reply = post(url + "/v1/chat/completions", body, keys)
        return f"{reply['usage']['completion_tokens']} tokens"
    except urllib.error.HTTPError as e:
        if e.code != 400:
            raise
        return f"400 {json.loads(e.read())['error']['message'][:80]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="where artifacts go (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--cpu", action="store_true", help="tiny models on CPU: checks the wiring, not a GPU")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu-smoke: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU node, "
              "or with --cpu to check the wiring", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="helio-gpu-smoke-") as tmp:
        smoke = Smoke(args.storage or tmp, args.steps, args.cpu)
        # where DeepSpeed would build an op just in time; read by every worker of the embedded Ray started below
        extensions = Path(tmp) / "torch_extensions"
        extensions.mkdir()
        os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions)
        device = "CPU (--cpu: tiny models, numbers mean nothing)" if args.cpu else torch.cuda.get_device_name(0)
        if smoke.stage("prepare", smoke.prepare):
            for arch, model in (("gpt", GPT_124M), ("llama", LLAMA)):
                for offload in (False, True):
                    label = f"pretrain {arch} {'ZeRO-3 + offload' if offload else 'ZeRO-2'}"
                    name = f"smoke_{arch}_{'zero3_offload' if offload else 'zero2'}"
                    smoke.stage(label, lambda name=name, model=model, offload=offload:
                                smoke.pretrain(name, model, offload))
            if smoke.stage("make_tasks", smoke.make_tasks) and smoke.stage("finetune llama LoRA", smoke.lora):
                for method in ("int8", "int4"):
                    smoke.stage(f"quantize {method}", lambda method=method: smoke.quantize(method))
                smoke.stage("serve refuses int8 on a GPU replica", smoke.refuse_quantized_on_gpu)
                smoke.stage(f"serve llama, num_gpus {0 if args.cpu else 1}", smoke.serve)
                if importlib.util.find_spec("vllm") is not None:
                    smoke.stage(f"serve llama through vLLM, num_gpus {0 if args.cpu else 1}",
                                lambda: smoke.serve("vllm"))
                else:
                    smoke.rows.append(("serve llama through vLLM", "n/a", 0.0, "vLLM is not installed here (the "
                                       "vllm extra: pip install -e '.[vllm]'; make vllm-env on CPU)"))
        built = sorted(p.name for p in extensions.iterdir())
        if os.environ.get("RAY_ADDRESS"):  # workers of a running cluster never read this process's environment
            smoke.rows.append(("DeepSpeed ops built at run time", "n/a", 0.0, "not watched on a running cluster "
                               "(RAY_ADDRESS is set): make gpu-smoke on the node, an embedded Ray, checks it"))
        else:
            smoke.rows.append(("DeepSpeed ops built at run time", "FAILED" if built else "ok", 0.0,
                               ", ".join(built) if built else "none"))
        print(f"\ngpu-smoke on {device}, torch {torch.__version__}\n{smoke.table()}", flush=True)
        return 0 if all(ok != "FAILED" for _, ok, _, _ in smoke.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
