"""The Ray Train worker loop: one per worker, a DeepSpeed engine each.

Data order is global and deterministic: every worker streams the same Ray Data
iterator (`get_dataset_shard`, unsplit), cuts it into global batches of
`micro_batch * grad_accum * world_size` blocks, and trains on its own rows of
each. Rank r's micro-batch a of a step holds rows [(a*W + r)*m, (a*W + r + 1)*m),
so one process with micro-batch W*m sees exactly the same global batches; and a
resumed worker skips the batches its checkpoint already consumed, so a run
interrupted by failures ends with the same weights as one that was not.

An elastic run (`max_workers`) keeps the global batch of its largest group,
`micro_batch * grad_accum * max_workers`, at every size W: each worker then
accumulates grad_accum * max_workers / W micro-batches per step. The step's
micro-batches, and what is averaged over them, are the same at every size, and a
checkpoint written by one size resumes at another (cluster.zero's universal path).
(Every worker reads every token: a few MB/s at 1M tokens/s, far below what the
model costs, bought for exact resume and exact data-parallel equivalence.)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cluster.config import from_dict, to_dict
from cluster.devices import peak_flops, peak_memory_mb
from cluster.profile import StepProfile
from cluster.storage import blocks, columns, fetch_folder, resolve
from cluster.zero import OptimConfig, ZeroConfig, ZeroStrategy, saved_client_state
from models.arch import ModelConfig, build_model, build_vision_model
from models.finetune import TaskSpec, build_task_model, export_task_model
from models.finetune import flops_per_token as task_flops_per_token
from models.hf import save_model
from models.hf_vision import save_vision
from models.image_finetune import build_image_task_model, export_image_task_model
from models.image_objective import AugmentConfig, ImageClassification
from models.pretrain_objectives import objective_for
from models.task_heads import SFT, Classify, Contrastive

EXPORT_DIR = "export"  # the final checkpoint's consolidated Hugging Face folder


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300  # optimizer steps
    micro_batch: int = 8  # blocks per worker per forward
    grad_accum: int = 1
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4  # global batches of validation data per evaluation
    checkpoint_every: int = 100
    shuffle_buffer: int = 1024  # blocks in Ray Data's seeded local shuffle; 0: read order
    mask_prob: float = 0.15  # masked LM only

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "grad_accum", "log_every", "eval_every", "eval_batches",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.shuffle_buffer < 0:
            raise ValueError("shuffle_buffer: must be >= 0")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError("mask_prob: must be in (0, 1)")


@dataclass(frozen=True)
class FaultConfig:
    """A deliberate failure, for testing recovery: one worker fails once, at one step."""

    at_step: int = 0  # 0: never
    rank: int = 0
    mode: str = "raise"  # raise | exit (os._exit, no cleanup) | exit_in_checkpoint (after writing, before reporting)

    def __post_init__(self) -> None:
        if self.mode not in ("raise", "exit", "exit_in_checkpoint"):
            raise ValueError(f"mode: must be raise, exit or exit_in_checkpoint, not {self.mode!r}")


@dataclass(frozen=True)
class ImageSpec:
    """An image dataset's shape (jobs.prepare_images' manifest) and the augmentation to train with."""

    size: int
    channels: int
    labels: tuple[str, ...]
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs, built by the job and sent as a plain dict."""

    model: ModelConfig
    train: TrainConfig
    zero: ZeroConfig
    optim: OptimConfig
    vocab_size: int
    block_len: int  # tokens per stored block (sequence length + 1)
    train_blocks: int
    val_files: tuple[str, ...] = ()  # URIs of the validation shards, in order
    mask_id: int = 2
    pad_id: int = 1
    special_ids: tuple[int, ...] = (0, 1, 2, 3, 4)
    fault: FaultConfig = field(default_factory=FaultConfig)
    # finetuning: the task on top of a base checkpoint (a folder URI); None: pretraining from scratch
    task: TaskSpec | None = None
    base_uri: str = ""
    base_name: str = ""  # recorded in the PEFT adapter_config.json
    images: ImageSpec | None = None  # an image dataset: a vision model (model.arch resnet / vit) classifies it
    max_workers: int = 0  # an elastic run's largest group, whose global batch every size trains; 0: a fixed group

    def identity(self) -> dict:
        """What a checkpoint must agree on to be resumed: everything that shapes the weights."""
        t = self.train
        return to_dict({"model": self.model.identity(), "zero": self.zero, "optim": self.optim, "steps": t.steps,
                        "micro_batch": t.micro_batch, "grad_accum": t.grad_accum, "seed": t.seed,
                        "shuffle_buffer": t.shuffle_buffer, "mask_prob": t.mask_prob,
                        "vocab_size": self.vocab_size, "block_len": self.block_len,
                        "task": self.task, "base_uri": self.base_uri}
                       | ({"images": self.images} if self.images is not None else {})
                       | ({"max_workers": self.max_workers} if self.max_workers else {}))


def global_batches(it, rows: int, start_step: int, steps_per_epoch: int, seed: int,
                   shuffle_buffer: int) -> Iterator[np.ndarray]:
    """Global batches (rows, L) forever, epoch after epoch, from step `start_step` on."""
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        batches = it.iter_batches(batch_size=rows, batch_format="pyarrow", drop_last=True,
                                  local_shuffle_buffer_size=shuffle_buffer or None,
                                  local_shuffle_seed=seed + epoch if shuffle_buffer else None)
        for i, batch in enumerate(batches):
            if i >= skip:  # already trained on before the checkpoint this run resumed from
                yield columns(batch)
        epoch, skip = epoch + 1, 0


def rank_rows(batch: dict[str, np.ndarray], micro: int, accum_index: int, rank: int,
              world: int) -> dict[str, torch.Tensor]:
    """This rank's `micro` rows of accumulation step `accum_index` of a global batch."""
    start = (accum_index * world + rank) * micro
    return {k: torch.from_numpy(v[start:start + micro].astype(np.int64)) for k, v in batch.items()}


def real_tokens(rows: dict[str, torch.Tensor]) -> int:
    """Model-input tokens in a micro-batch: the `*len` columns' sum (finetuning rows are padded; sft's
    prompt_len is a part of its length),
    else full blocks of L-1 inputs (pretraining); images count one each."""
    if "pixels" in rows:
        return rows["pixels"].size(0)
    lengths = [v for k, v in rows.items() if k == "length" or (k.endswith("_len") and k != "prompt_len")]
    if lengths:
        return int(sum(int(v.sum()) for v in lengths))
    ids = rows["input_ids"]
    return ids.size(0) * (ids.size(1) - 1)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(m_r, ...) on each rank r -> (sum of m_r, ...) in rank order; this rank's rows keep their autograd
    history. Ranks may hold different numbers of rows (packed contrastive rows hold a varying number of
    pairs): each is padded to the largest for the collective and cut back after."""
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.size(0)], dtype=torch.int64, device=x.device))
    counts = [int(c) for c in counts]
    most = max(counts)
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.size(0)] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:n] for p, n in zip(parts, counts)]
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def mean_across_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def max_across_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class Prefetch:
    """Runs an iterator in a background thread, a few items ahead: reading overlaps training."""

    def __init__(self, it: Iterator, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._fill, args=(it,), daemon=True)
        self._thread.start()

    def _fill(self, it: Iterator) -> None:
        try:
            for item in it:
                self._queue.put((item, None))
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put((None, e))

    def __next__(self):
        item, error = self._queue.get()
        if error is not None:
            raise error
        return item


class Worker:
    """One rank's training state; `run` drives it from its checkpoint (if any) to the end."""

    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        t = cfg.train
        self.max_world = cfg.max_workers or self.world
        if (t.grad_accum * self.max_world) % self.world:  # refused before the run (cluster.train_run.check_elastic)
            raise RuntimeError(f"{self.world} workers cannot share {t.grad_accum * self.max_world} micro-batches")
        self.grad_accum = t.grad_accum * self.max_world // self.world  # this group's share of a step
        self.global_rows = t.micro_batch * t.grad_accum * self.max_world
        self.tokens = 0  # model-input tokens trained on so far, all ranks (finetuning: padding not counted)
        self.steps_per_epoch = cfg.train_blocks // self.global_rows
        self.step = 0
        self.resumed = False

    def start_data(self) -> Prefetch:
        """Starts streaming training batches from the current step (Ray Data starts up while DeepSpeed does)."""
        t = self.cfg.train
        return Prefetch(global_batches(ray.train.get_dataset_shard("train"), self.global_rows, self.step,
                                       self.steps_per_epoch, t.seed, t.shuffle_buffer))

    def setup(self) -> None:
        """Builds the model (the same initial weights on every rank) and its DeepSpeed engine."""
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(t.seed)
        if cfg.images is not None:  # a vision model: pretrained here, or finetuned from a base checkpoint
            im = cfg.images
            if cfg.task is None:
                self.model = build_vision_model(cfg.model, im.size, im.channels, len(im.labels))
            else:
                self.base_folder = fetch_folder(cfg.base_uri, ("config.json", "model.safetensors"))
                self.model, self.head, _ = build_image_task_model(cfg.task.method, cfg.task.lora, cfg.task.labels,
                                                                  self.base_folder.name, cfg.task.scratch)
            self.objective = ImageClassification(self.model, im.size, im.channels, im.augment)
        elif cfg.task is None:
            self.model = build_model(cfg.model, cfg.vocab_size, cfg.block_len - 1, cfg.pad_id)
            self.objective = objective_for(self.model, cfg.model.arch, cfg.mask_id, cfg.special_ids, t.mask_prob)
        else:
            self.base_folder = fetch_folder(cfg.base_uri, ("config.json", "model.safetensors"))
            self.model, self.head = build_task_model(cfg.task, self.base_folder.name)
            self.objective = task_objective(cfg.task, self.model, self.world)
        self.strategy = ZeroStrategy(cfg.zero, cfg.optim, micro_batch=t.micro_batch, grad_accum=self.grad_accum,
                                     world_size=self.world, total_steps=t.steps, device=self.device)
        self.engine = self.strategy.setup(self.objective)
        self.trainable_params = sum(getattr(p, "ds_numel", p.numel())  # ZeRO-3 keeps a shard's full size here
                                    for p in self.objective.parameters() if p.requires_grad)
        seq = cfg.block_len - 1  # finetuning: the longest row
        self.flops_per_token = (0.0 if cfg.images is not None else  # MFU is reported for token models only
                                self.model.flops_per_token(seq) if cfg.task is None
                                else task_flops_per_token(cfg.task, self.model, seq))

    def _generator(self, *salt: int) -> torch.Generator:
        """Masking and augmentation randomness that depends only on (seed, step, which of the step's
        micro-batches): resumable, and the same at every group size."""
        return torch.Generator().manual_seed(hash((self.cfg.train.seed, *salt)) & 0x7FFFFFFF)

    def train_step(self, block: dict[str, np.ndarray]) -> tuple[torch.Tensor, int]:
        """One optimizer step; (mean loss, still on the device: no host sync per micro-batch or step,
        this rank's model-input tokens)."""
        t, loss_sum, tokens = self.cfg.train, torch.zeros((), device=self.device), 0
        for a in range(self.grad_accum):
            rows = rank_rows(block, t.micro_batch, a, self.rank, self.world)
            tokens += real_tokens(rows)
            args = self.objective.batch(rows, self._generator(self.step, a * self.world + self.rank))
            loss = self.engine(*(x.to(self.device) for x in args))
            self.strategy.backward(loss)
            self.strategy.step()
            loss_sum += loss.detach().float()
        self.step += 1
        return loss_sum / self.grad_accum, tokens

    def eval_rows(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the first `eval_batches` validation batches, read once and kept.

        A fixed sample of a few dozen blocks, read straight from the first shards: every evaluation
        scores the same rows, in the same micro-batches at every group size (an evaluation batch is
        sized for the largest group; rank r takes micro-batches r, r + W, ...).
        """
        t, m = self.cfg.train, self.cfg.train.micro_batch
        need, parts = m * self.max_world * t.eval_batches, []
        for uri in self.cfg.val_files:
            fs, path = resolve(uri)
            wanted = ["pixels", "label"] if self.cfg.images is not None else None  # not the images' ids
            parts.append(columns(pq.read_table(path, filesystem=fs, columns=wanted)))
            if sum(len(next(iter(p.values()))) for p in parts) >= need:
                break
        val = {k: np.concatenate([p[k] for p in parts])[:need] for k in parts[0]}
        n = len(next(iter(val.values())))
        return [{k: torch.from_numpy(v[i * m:(i + 1) * m].astype(np.int64)) for k, v in val.items()}
                for i in range(self.rank, n // m, self.world)]

    @torch.no_grad()
    def evaluate(self, rows: list[dict[str, torch.Tensor]]) -> tuple[float, float | None]:
        """(mean validation loss over the micro-batches, accuracy for an image classifier, else None),
        over every rank's rows."""
        self.engine.eval()
        total, correct, seen = 0.0, 0, 0
        for i, r in enumerate(rows):
            index = self.rank + i * self.world  # which micro-batch of the sample: the same masks every eval
            args = self.objective.batch(r, self._generator(-1, index))
            total += self.engine(*(x.to(self.device) for x in args)).item()
            if self.cfg.images is not None:
                correct, seen = correct + int(self.objective.correct), seen + len(args[-1])
        self.engine.train()
        total, count, correct, seen = sum_across_ranks([total, len(rows), correct, seen], self.device)
        return total / max(count, 1), (correct / max(seen, 1) if self.cfg.images else None)

    def checkpoint(self, folder: str, final: bool) -> None:
        fault = self.cfg.fault
        self.strategy.save(folder, {"step": self.step, "tokens": self.tokens, "run": self.cfg.identity()}, self.rank)
        if fault.mode == "exit_in_checkpoint" and self._fault_due():
            os._exit(1)  # files written, nothing reported: this checkpoint must never be used
        if final:
            lora = self.cfg.task is not None and self.cfg.task.method == "lora"
            state = self.strategy.full_state_dict(trainable_only=lora)  # every rank: a collective under ZeRO-3
            if self.rank == 0 and self.cfg.task is None and self.cfg.images is not None:
                export_vision_model(self.cfg, state, Path(folder) / EXPORT_DIR)
            elif self.rank == 0 and self.cfg.task is None:
                export_model(self.cfg, state, Path(folder) / EXPORT_DIR)
            elif self.rank == 0 and self.cfg.images is not None:
                torch.manual_seed(self.cfg.train.seed)
                t, im = self.cfg.task, self.cfg.images
                model, head, _ = build_image_task_model(t.method, t.lora, t.labels, self.base_folder.name, t.scratch)
                export_image_task_model(t.method, t.lora, t.labels, model, head, Path(folder) / EXPORT_DIR,
                                        {k.removeprefix("model."): v for k, v in state.items()}, im.size,
                                        self.cfg.base_name)
            elif self.rank == 0:  # a fresh CPU copy of the task model takes the finetuned weights
                torch.manual_seed(self.cfg.train.seed)
                model, head = build_task_model(self.cfg.task, self.base_folder.name)
                export_task_model(self.cfg.task, model, head, Path(folder) / EXPORT_DIR,
                                  {k.removeprefix("model."): v for k, v in state.items()}, self.cfg.pad_id,
                                  self.cfg.base_name)

    def _fault_due(self) -> bool:
        f = self.cfg.fault
        return f.at_step == self.step and f.rank == self.rank and not self.resumed

    def run(self) -> None:
        t = self.cfg.train
        dist.barrier()  # the peak is read (on a new node, measured by one rank) before data or DeepSpeed start
        peak, peak_source = peak_flops(self.device)
        if peak:  # one number for the group, whichever nodes its ranks read theirs on
            peak = max_across_ranks(peak, self.device)
        ckpt = ray.train.get_checkpoint()
        with ckpt.as_directory() if ckpt else contextlib.nullcontext() as folder:
            if folder:
                state = saved_client_state(folder)
                self.step, self.tokens, self.resumed = int(state["step"]), int(state.get("tokens", 0)), True
            batches = self.start_data()
            self.setup()
            if folder and self.strategy.load(folder)["step"] != self.step:
                raise RuntimeError(f"checkpoint {folder} disagrees with itself about its step")
        start_step = self.step
        val_rows = self.eval_rows()
        pool = concurrent.futures.ThreadPoolExecutor(1)  # a yardstick for the validation loss, while training
        text = self.cfg.task is None and self.cfg.images is None
        entropy = pool.submit(unigram_entropy, self.cfg.val_files, self.cfg.vocab_size) if text else None
        pool.shutdown(wait=False)
        loss_sum, loss_n, local_tokens, t_last = 0.0, 0, 0, time.perf_counter()
        t_attempt, profile = t_last, StepProfile(self.rank, start_step)  # HELIO_PROFILE_DIR: rank 0's op table
        while self.step < t.steps:
            profile.tick(self.step)
            loss, n_tokens = self.train_step(next(batches))
            loss_sum, loss_n, local_tokens = loss_sum + loss, loss_n + 1, local_tokens + n_tokens
            if self.cfg.fault.mode in ("raise", "exit") and self._fault_due():
                if self.cfg.fault.mode == "exit":
                    os._exit(1)
                raise RuntimeError(f"injected fault on rank {self.rank} at step {self.step}")
            final = self.step == t.steps
            do_eval = final or self.step % t.eval_every == 0
            do_ckpt = final or self.step % t.checkpoint_every == 0
            if not (final or do_eval or do_ckpt or self.step % t.log_every == 0):
                continue
            dt = time.perf_counter() - t_last
            new_tokens = int(round(mean_across_ranks(local_tokens, self.device) * self.world))
            self.tokens += new_tokens
            tokens_per_s = new_tokens / dt
            metrics = {
                "step": self.step, "total_steps": t.steps, "attempt_start_step": start_step,
                "loss": mean_across_ranks(float(loss_sum) / loss_n, self.device),  # the host sync, per log
                "lr": self.strategy.lr(), "grad_norm": self.strategy.grad_norm(),
                "tokens_per_s": tokens_per_s,
                "mfu": self.flops_per_token * tokens_per_s / (peak * self.world) if peak and self.flops_per_token
                else None,
                "peak_flops_per_worker": peak, "peak_source": peak_source,
                "tokens": self.tokens, "epoch": self.step / max(self.steps_per_epoch, 1),
                "attempt_seconds": time.perf_counter() - t_attempt,
                "peak_memory_mb": max_across_ranks(peak_memory_mb(self.device), self.device),
                "trainable_params": self.trainable_params, "workers": self.world,
            }
            if do_eval:
                metrics["val_loss"], accuracy = self.evaluate(val_rows)
                if accuracy is not None:
                    metrics["val_accuracy"] = accuracy
                elif self.cfg.task is None or self.cfg.task.kind == "sft":  # a perplexity only for token losses
                    metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
            if final and entropy:
                metrics["val_unigram_entropy"], metrics["val_unigram_tokens"] = entropy.result()
            if do_ckpt:
                with tempfile.TemporaryDirectory(prefix="helio-ckpt-") as folder:
                    self.checkpoint(folder, final)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)
            loss_sum, loss_n, local_tokens, t_last = 0.0, 0, 0, time.perf_counter()
        profile.close(self.step)


def export_model(cfg: LoopConfig, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Writes the consolidated fp32 weights as a Hugging Face folder (config.json + model.safetensors)."""
    model = build_model(cfg.model, cfg.vocab_size, cfg.block_len - 1, cfg.pad_id)
    prefix = "model."  # the objective wraps the model
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    # load_state_dict raises on any shape mismatch (a ZeRO-3 shard that was not gathered)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"consolidated weights do not fit the model: missing {missing}, unexpected {unexpected}")
    save_model(model, folder)


def export_vision_model(cfg: LoopConfig, state: dict[str, torch.Tensor], folder: Path) -> None:
    """The consolidated fp32 vision model as a Hugging Face folder, label names in config.json."""
    im = cfg.images
    model = build_vision_model(cfg.model, im.size, im.channels, len(im.labels))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})  # strict: every weight
    save_vision(model, folder, list(im.labels), im.size)


def task_objective(spec: TaskSpec, model: torch.nn.Module, world: int) -> torch.nn.Module:
    if spec.kind == "sft":
        return SFT(model)
    if spec.kind == "classify":
        return Classify(model)
    return Contrastive(model, spec.temperature, gather=gather_rows if world > 1 else None, world=world)


def unigram_entropy(files: tuple[str, ...], vocab_size: int, max_tokens: int = 1 << 25) -> tuple[float, int]:
    """(entropy in nats, tokens counted) of the token distribution in `files`, shard by shard.

    The loss a model that ignores context would reach at best on this data;
    counting stops after about `max_tokens` tokens.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for uri in files:
        fs, path = resolve(uri)
        counts += np.bincount(blocks(pq.read_table(path, filesystem=fs, columns=["input_ids"])).reshape(-1),
                              minlength=vocab_size)
        if counts.sum() >= max_tokens:
            break
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()), int(counts.sum())


def train_loop(config: dict) -> None:
    """Ray Train's per-worker entry point; `config` is a LoopConfig as a plain dict."""
    # Helio compiles nothing, but DeepSpeed's optimizer check imports a module that calls torch.compile,
    # which sets TorchDynamo up: about 3 s of CPU per worker on a small machine. Read at that call; this
    # process is the worker's own.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    Worker(from_dict(LoopConfig, config)).run()
