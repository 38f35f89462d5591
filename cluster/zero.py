"""DeepSpeed behind one small object: the training loop never touches DeepSpeed.

`ZeroStrategy.setup(model)` builds the engine (ZeRO stage 0-3, optional CPU
offload of optimizer state and parameters, gradient accumulation and clipping,
AdamW, warmup + cosine LR); the loop then calls `backward`, `step`, `save`,
`load` and `full_state_dict`. Precision follows the device: bf16 on a GPU that
has it, fp16 with dynamic loss scaling on one that has not (V100, T4), fp32 on
CPU, where DeepSpeed runs on its CPU accelerator over the gloo process group
that Ray Train has already set up.

A checkpoint's files are pickles (`torch.load`), and a pickle can run code. Nothing in one is
unpickled before every file matches the size and sha256 its rank recorded at save time and no file
is there that no rank wrote; then DeepSpeed's loads go through `torch.load(weights_only=True)`,
which builds tensors and plain data only (and the three DeepSpeed data classes its checkpoints hold),
so even a checkpoint whose records were forged cannot run code here. A checkpoint written by a group
of another size (an elastic run) goes through DeepSpeed's universal checkpoint conversion, which
unpickles fully; its files' globals are read (not run) and checked first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CKPT_TAG = "state"  # one DeepSpeed tag per Ray checkpoint folder
COMPLETE = "helio-rank{rank}.json"  # written by each rank after its files are on disk
RAY_FILES = (".metadata.json",)  # what Ray Train itself may put in a checkpoint folder (JSON)
# The classes DeepSpeed's own checkpoints pickle beside tensors (torch.serialization.
# get_unsafe_globals_in_checkpoint on ZeRO-2 and ZeRO-3 checkpoints); data holders, nothing that runs.
SAFE_GLOBALS = ("deepspeed.utils.tensor_fragment.fragment_address", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("lr: must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("min_lr_ratio: must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps: must be >= 0")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError("beta1: betas must be in [0, 1)")
        if self.grad_clip < 0:
            raise ValueError("grad_clip: must be >= 0")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def precision_for(requested: str, device_type: str, capability: tuple[int, int] | None = None) -> str:
    """What `requested` means on a device: `auto` is fp32 on CPU, and on CUDA bf16 where the GPU has
    bf16 tensor cores (compute capability 8.0 on: A100, L4, H100) and fp16 with dynamic loss scaling
    where it has not (V100 7.0, T4 7.5). fp16 is refused on CPU (DeepSpeed trains fp16 on GPUs only)."""
    if requested == "fp16" and device_type != "cuda":
        raise ValueError("precision: fp16 trains on GPUs only; use fp32 (or bf16) on CPU")
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "fp32"
    return "bf16" if capability is not None and capability[0] >= 8 else "fp16"


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = 2
    offload_optimizer: bool = False  # optimizer state (and its step) on CPU memory
    offload_params: bool = False  # ZeRO-3 only: parameters live on CPU between uses
    precision: str = "auto"  # auto: bf16 on a GPU that has it, else fp16 (dynamic loss scaling); fp32 on CPU

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"stage: must be 0, 1, 2 or 3, not {self.stage}")
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params: parameter offload needs stage 3")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer: optimizer offload needs stage 1, 2 or 3")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings, not biases or norms (as nanoGPT and GPT-2)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # LoRA adapters are all matrices; ZeRO-3 drops empty groups


def import_deepspeed():
    """DeepSpeed, imported the way a training worker needs it; every Helio use goes through here.

    - Its autotuner imports MLflow when it can (about 1.2 s of a 1.4 s import on 2 cores), at every
      worker's start. Workers never use either (Helio's tracking runs in Ray Train's controller), so
      MLflow is kept out of that one import: Python refuses an import whose `sys.modules` entry is
      None, and DeepSpeed then records that MLflow is missing. A later `import mlflow` works.
    - Its CPU shared-memory allreduce op is marked unavailable, so it is never compiled. The op
      serves only DeepSpeed's tensor-parallel inference allreduce (`inference_all_reduce`);
      training's collectives are torch.distributed's (gloo on CPU) either way. Compiling it took
      about 70 s on 2 cores (in `make install`, or just in time in a fresh checkout's first run),
      with a ninja. `deepspeed.ops.__compatible_ops__` is the one table DeepSpeed consults for it.
    """
    import sys

    blocked = "deepspeed" not in sys.modules and "mlflow" not in sys.modules
    if blocked:
        sys.modules["mlflow"] = None  # type: ignore[assignment]
    try:
        import deepspeed
    finally:
        if blocked:
            del sys.modules["mlflow"]
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    return deepspeed


class ZeroStrategy:
    """One DeepSpeed engine per worker, configured from `ZeroConfig` + `OptimConfig`."""

    def __init__(self, zero: ZeroConfig, optim: OptimConfig, *, micro_batch: int, grad_accum: int,
                 world_size: int, total_steps: int, device: torch.device):
        self.zero, self.optim = zero, optim
        self.micro_batch, self.grad_accum, self.world_size = micro_batch, grad_accum, world_size
        self.total_steps, self.device = total_steps, device
        auto_on_gpu = zero.precision == "auto" and device.type == "cuda"
        self.precision = precision_for(zero.precision, device.type,
                                       torch.cuda.get_device_capability(device) if auto_on_gpu else None)
        self.engine: Any = None

    def ds_config(self) -> dict:
        zero: dict[str, Any] = {"stage": self.zero.stage}
        if self.zero.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        if self.zero.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        if self.zero.stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = False  # the fp32 export gathers itself
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
            "train_batch_size": self.micro_batch * self.grad_accum * self.world_size,
            "gradient_clipping": self.optim.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision == "bf16"},
            # fp16: dynamic loss scaling (loss_scale 0), from 2^16, halved on overflow, doubled after 1000 clean steps
            "fp16": {"enabled": self.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                     "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
            "zero_allow_untested_optimizer": True,  # torch's AdamW, so no op needs compiling
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wraps `model` in a DeepSpeed engine; returns the engine (call it like the model)."""
        deepspeed = import_deepspeed()

        o = self.optim
        fused = self.device.type == "cuda" and not self.zero.offload_optimizer
        optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                      eps=o.eps, fused=fused or None)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, o.warmup_steps, self.total_steps, o.min_lr_ratio))
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                    config=self.ds_config())
        self.engine.checkpoint_engine = WeightsOnly(self.engine.checkpoint_engine)
        return self.engine

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        """Called after every micro-batch; the optimizer runs at accumulation boundaries."""
        self.engine.step()

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, folder: str | Path, client_state: dict, rank: int) -> None:
        """Every rank writes its shard of the state into `folder`, then a completion record.

        The record lists the files this rank wrote with their sizes; `load`
        refuses a folder where any rank's record is missing or disagrees with
        what is on disk, so a save cut short never looks like a checkpoint.
        """
        folder = Path(folder)
        before = {p for p in folder.rglob("*") if p.is_file()}
        self.engine.save_checkpoint(str(folder), tag=CKPT_TAG, client_state=client_state)
        written = sorted(p for p in folder.rglob("*") if p.is_file() and p not in before)
        record = {"rank": rank, "world_size": self.world_size, "zero_stage": self.zero.stage,
                  "client_state": client_state,
                  "files": {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                            for p in written}}
        tmp = folder / (COMPLETE.format(rank=rank) + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, folder / COMPLETE.format(rank=rank))

    def load(self, folder: str | Path) -> dict:
        """Restores model, optimizer and LR schedule from `folder`; returns the client state.

        A checkpoint written by a group of another size (an elastic run that lost or gained workers)
        is loaded through DeepSpeed's universal checkpoint: converted here, after every file was
        verified, then read with the engine's `load_universal_checkpoint` set for that one load.
        Without ZeRO the state is not sharded and loads at any size as it is.
        """
        saved = check_complete(folder)
        if saved == self.world_size or self.zero.stage == 0:
            return self._load(folder)
        if self.zero.stage == 3:  # also refused before the run starts (cluster.train_run.check_elastic)
            raise RuntimeError(f"checkpoint {folder} was written by {saved} ZeRO-3 workers and this group has "
                               f"{self.world_size}: resuming ZeRO-3 at another size is not supported")
        with tempfile.TemporaryDirectory(prefix="helio-universal-") as universal:
            to_universal(folder, universal)
            self.engine._config.load_universal_checkpoint = True  # what engine.load_checkpoint reads
            try:
                return self._load(universal)
            finally:
                self.engine._config.load_universal_checkpoint = False

    def _load(self, folder: str | Path) -> dict:
        _, client_state = self.engine.load_checkpoint(str(folder), tag=CKPT_TAG, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
        return client_state

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The full fp32 weights on CPU (ZeRO shards and bf16 masters gathered). Call on every rank.

        Frozen parameters (a LoRA base) have no fp32 master; under ZeRO-3 they
        are gathered from their shards, never read as the empty local stub.
        `trainable_only`: just the parameters the optimizer updates (and no buffers).
        """
        deepspeed = import_deepspeed()
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        module = self.engine.module
        for name, p in module.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            full = safe_get_full_fp32_param(p) if p.requires_grad else None  # a collective under ZeRO-3
            if full is None and hasattr(p, "ds_id"):  # a frozen ZeRO-3 shard
                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach().clone()
            out[name] = (full if full is not None else p.detach()).float().cpu().clone()
        if not trainable_only:
            persistent = set(module.state_dict(keep_vars=True))  # not what a module recomputes (RoPE tables)
            for name, b in module.named_buffers():
                if name in persistent:
                    out[name] = b.detach().float().cpu().clone()
        return out


def to_universal(folder: str | Path, out: str | Path) -> None:
    """DeepSpeed's conversion of a ZeRO-1/2 checkpoint (its `CKPT_TAG` folder) into a universal one
    under `out`, which any number of workers loads: each parameter's fp32 weights and optimizer state
    whole, one folder each. DeepSpeed reads the shards with pickle (`weights_only=False`), so this
    runs only on a checkpoint `check_complete` has verified file by file, and first reads every file's
    pickled globals (without running them): anything beyond tensors, plain data and `SAFE_GLOBALS`
    is refused, as `WeightsOnly` refuses it on a load at the same size."""
    import contextlib
    import io
    import time
    from types import SimpleNamespace

    import_deepspeed()
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    for path in sorted(Path(folder, CKPT_TAG).glob("*.pt")):
        found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - set(SAFE_GLOBALS)
        if found:
            raise RuntimeError(f"checkpoint file {path} is not tensors and plain data (it would unpickle "
                               f"{', '.join(sorted(found))}): refused without running it")
    t0, chatter = time.perf_counter(), io.StringIO()
    # one process, no pool: a Ray worker's threads and fork() do not mix; inject_missing_state records the
    # universal format's version, which DeepSpeed expects a Megatron-style client to have set
    args = SimpleNamespace(input_folder=str(Path(folder) / CKPT_TAG), output_folder=str(Path(out) / CKPT_TAG),
                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                           inject_missing_state=True)
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):  # its prints and tqdm bars
        ds_to_universal(args)
    logging.getLogger(__name__).info("converted checkpoint %s to a universal checkpoint in %.1f s", folder,
                                     time.perf_counter() - t0)


def saved_client_state(folder: str | Path) -> dict:
    """The client state a complete checkpoint was saved with, read without building an engine."""
    check_complete(folder)
    return json.loads((Path(folder) / COMPLETE.format(rank=0)).read_text())["client_state"]


class WeightsOnly:
    """DeepSpeed's checkpoint engine with its loads made safe: `torch.load(weights_only=True)` where
    DeepSpeed's own passes weights_only=False. A file that needs anything else is refused, naming it
    and what it would have unpickled, without running it."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        import importlib
        import pickle

        allowed = []
        for dotted in SAFE_GLOBALS:
            module, _, name = dotted.rpartition(".")
            allowed.append(getattr(importlib.import_module(module), name))
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # read, not run
            raise RuntimeError(f"checkpoint file {path} is not tensors and plain data (it would unpickle "
                               f"{', '.join(sorted(set(found) - set(SAFE_GLOBALS))) or 'code'}): refused without "
                               f"running it") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_complete(folder: str | Path) -> int:
    """The number of workers that wrote a checkpoint folder. Raises, before anything in it is unpickled,
    if any rank's part is missing, the wrong size or not what the rank wrote (sha256), or if the folder
    holds a file no rank wrote."""
    folder = Path(folder)
    first = folder / COMPLETE.format(rank=0)
    if not first.is_file():
        raise RuntimeError(f"checkpoint {folder} is incomplete: rank 0 never finished writing it")
    world_size = json.loads(first.read_text())["world_size"]
    listed = set(RAY_FILES) | {COMPLETE.format(rank=r) for r in range(world_size)}
    for rank in range(world_size):
        marker = folder / COMPLETE.format(rank=rank)
        if not marker.is_file():
            raise RuntimeError(f"checkpoint {folder} is incomplete: rank {rank} never finished writing it")
        record = json.loads(marker.read_text())
        if record["world_size"] != world_size:
            raise RuntimeError(f"checkpoint {folder} is inconsistent: rank {rank} says {record['world_size']} "
                               f"workers wrote it, rank 0 says {world_size}")
        for rel, entry in record["files"].items():
            size, digest = (entry, None) if isinstance(entry, int) else (entry["bytes"], entry["sha256"])
            path = folder / rel
            if not path.is_file() or path.stat().st_size != size:
                raise RuntimeError(f"checkpoint {folder} is incomplete or altered: {rel} is missing or not the "
                                   f"size rank {rank} wrote")
            if digest is not None and _sha256(path) != digest:
                raise RuntimeError(f"checkpoint {folder}: {rel} is not the file rank {rank} wrote (sha256 differs); "
                                   f"refused before loading it")
            listed.add(rel)
    planted = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                     if p.is_file() and str(p.relative_to(folder)) not in listed)
    if planted:
        raise RuntimeError(f"checkpoint {folder} holds {', '.join(planted)}, which no rank wrote; refused before "
                           f"loading any of it")
    return world_size
