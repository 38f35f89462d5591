"""Device mistakes, found without a GPU.

A tensor created without naming a device lands on PyTorch's default device. On a GPU replica that is
the CPU while the model sits on CUDA, and the first op that meets both fails (or, for a sampler, every
sampled request fails while greedy probes pass). Here the default device is `meta` around the code
under test while the model and its inputs stay on the CPU, and any op that produces a `meta` tensor
raises at once, naming the op: only a tensor made without a device can be on `meta`. Code that
derives devices from the tensors it meets (`device=x.device`, `zeros_like`) runs as before.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from models.gpt import GPT, GPTConfig
from models.llama import Llama, LlamaConfig


class StrayTensor(RuntimeError):
    pass


class RefuseMeta(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        def stray(tree) -> bool:
            return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tree_leaves(tree))

        if stray((args, kwargs)) or stray(out := func(*args, **(kwargs or {}))):
            raise StrayTensor(f"{func} met or made a tensor created without naming a device")
        return out


@contextlib.contextmanager
def stray_tensors_on_meta():
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        with RefuseMeta():
            yield
    finally:
        torch.set_default_device(before)


def test_the_check_itself_catches_a_tensor_made_without_a_device():
    x = torch.ones(3)
    with stray_tensors_on_meta(), pytest.raises(StrayTensor, match="created without naming a device"):
        x * torch.tensor([2.0, 2.0, 2.0])
    with stray_tensors_on_meta(), pytest.raises(StrayTensor):
        torch.nn.functional.embedding(torch.tensor([1]), torch.randn(4, 2, device="cpu"))  # meta would win here
    with stray_tensors_on_meta():
        assert (x * torch.tensor([2.0, 2.0, 2.0], device=x.device)).device.type == "cpu"


def tiny(arch: str):
    torch.manual_seed(0)
    if arch == "gpt":
        return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    return Llama(LlamaConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                             intermediate_size=32)).eval()


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_sampling_and_the_engine_step_make_their_tensors_where_the_logits_are(arch):
    from actors.generation_engine import Engine, Sequence
    from models.decoding import sample_next

    model = tiny(arch)
    logits = torch.randn(2, 64)
    with stray_tensors_on_meta():
        ids = sample_next(logits, 0.8, 5, 0.9, torch.Generator().manual_seed(0))
    assert ids.shape == (2, 1) and ids.device.type == "cpu"

    engine = Engine(model, max_batch=2)
    sampled = Sequence([1, 2, 3], 6, 0.9, 8, 0.95, frozenset(), torch.Generator().manual_seed(1))
    greedy = Sequence([4, 5, 4, 5, 4], 6, 0.0, None, None, frozenset(), None)
    engine.waiting.extend([sampled, greedy])
    with stray_tensors_on_meta():  # the worker thread's loop, step by step, in this thread
        while engine.live or engine.waiting:
            engine._step()
    assert sampled.made == greedy.made == 6


@pytest.mark.parametrize("kind", ["generate", "embed", "classify"])
def test_health_checks_probe_on_the_models_device(kind):
    from actors.serve_deployments import Classifier, Embedder, Generator, encode
    from models.task_heads import SequenceClassifier

    model = {"generate": lambda: tiny("llama"), "embed": lambda: tiny("llama").drop_lm_head(),
             "classify": lambda: SequenceClassifier(tiny("llama").drop_lm_head(), 3).eval()}[kind]()
    cls = {"generate": Generator, "embed": Embedder, "classify": Classifier}[kind].func_or_class
    replica = cls.__new__(cls)  # the deployment's state without loading an artifact
    replica.model, replica.pad_id, replica.labels = model, 0, ["a", "b", "c"]
    with stray_tensors_on_meta():
        replica.check_health()
        if kind == "embed":
            assert len(encode(model, [[1, 2, 3], [4]], 0)) == 2
        if kind == "classify":
            assert len(asyncio.run(cls.classify.__wrapped__(replica, [[1, 2, 3], [4]]))) == 2


def test_a_training_step_of_every_objective_makes_its_tensors_on_the_batchs_device():
    from models.encoder import Encoder, EncoderConfig
    from models.pretrain_objectives import CausalLM, MaskedLM
    from models.task_heads import SFT, Classify, Contrastive, SequenceClassifier

    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(vocab_size=64, max_position=32, n_layer=1, n_head=2, n_embd=16, intermediate_size=32))
    ids, length = torch.randint(5, 64, (4, 12)), torch.tensor([12, 9, 7, 3])
    cases = [
        (CausalLM(tiny("gpt")), {"input_ids": ids}),
        (MaskedLM(enc, 4, (0, 1, 2, 3, 4)), {"input_ids": ids}),
        (SFT(tiny("llama")), {"input_ids": ids, "length": length, "loss_mask": (ids > 30).long()}),
        (Classify(SequenceClassifier(tiny("llama"), 3)), {"input_ids": ids, "length": length,
                                                         "label": torch.tensor([0, 1, 2, 1])}),
        (Contrastive(tiny("llama").drop_lm_head(), 0.05), {"query_ids": ids, "query_len": length,
                                                           "pos_ids": ids.flip(1), "pos_len": length}),
    ]
    for objective, rows in cases:
        objective.train()
        with stray_tensors_on_meta():
            loss = objective(*objective.batch(rows, torch.Generator().manual_seed(0)))
            loss.backward()
        assert torch.isfinite(loss), type(objective).__name__


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8"])
def test_a_quantized_model_runs_without_stray_tensors(method):
    from models.quant import QuantSpec, quantize_model

    model = Llama(LlamaConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=64,
                              intermediate_size=128)).eval()
    quantized = quantize_model(model, QuantSpec(method, group_size=32))[0]
    with stray_tensors_on_meta(), torch.no_grad():
        logits, _ = quantized(torch.tensor([[1, 2, 3, 4]], device="cpu"))
    assert torch.isfinite(logits).all()


def test_a_worker_takes_cuda_only_when_ray_assigned_it_a_gpu(ray_cluster):
    """Serve replicas load their model on `assigned_device()`: CUDA for `num_gpus` > 0, the CPU otherwise,
    whatever `torch.cuda.is_available()` says on the node (the session cluster declares one GPU; no
    tensor is made on it)."""
    from cluster.devices import assigned_device

    def device_type() -> str:
        return assigned_device().type

    given = ray_cluster.remote(num_cpus=0, num_gpus=1)(device_type)
    not_given = ray_cluster.remote(num_cpus=0)(device_type)
    assert ray_cluster.get([given.remote(), not_given.remote()], timeout=60) == ["cuda", "cpu"]
    assert assigned_device().type == "cpu"  # the driver holds no GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_smoke_refuses_in_one_line_without_cuda():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "jobs.gpu_smoke"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gpu-smoke: no CUDA device here")


PEAK = """
import torch
torch.set_num_threads(1)
from cluster.devices import cpu_peak
peak, source = cpu_peak()
print("PEAK", repr(peak), "measured now" in source)
"""


def test_the_cpu_peak_is_measured_once_per_node_and_then_read_by_every_process(tmp_path, monkeypatch):
    """MFU divides by the node's cached peak: two workers starting at once, one measures while the other
    waits and reads the same number; later processes read it too; an unreadable cache is measured again."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from cluster.devices import CACHE_ENV, cpu_peak

    env = {**os.environ, CACHE_ENV: str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    workers = [subprocess.Popen([sys.executable, "-c", PEAK], env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    outs = [w.communicate(timeout=120)[0].split("PEAK ", 1)[1].split() for w in workers]
    assert sorted(measured for _, measured in outs) == ["False", "True"], outs  # one measured, one read
    assert outs[0][0] == outs[1][0] and float(outs[0][0]) > 0
    (key,) = json.loads((tmp_path / "cpu_peak.json").read_text())
    assert key.endswith("| 1 threads")

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this process, on the workers' thread count
    try:
        peak, source = cpu_peak()
        assert peak == float(outs[0][0]) and "read from" in source
        (tmp_path / "cpu_peak.json").write_text("{not json")
        peak, source = cpu_peak()
        assert "measured now" in source and peak > 0 and json.loads((tmp_path / "cpu_peak.json").read_text())
        monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cpu_peak.json" / "x"))  # a cache that cannot be made
        peak, source = cpu_peak()
        assert peak > 0 and "not cached" in source
    finally:
        torch.set_num_threads(threads)
