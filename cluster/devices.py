"""Which device a Ray worker runs on, and what the hardware could do: the peak FLOP/s that MFU divides by.

A worker (a Serve replica, a task) takes CUDA only when Ray assigned it a GPU: Ray makes the assigned
GPUs the only ones the process sees, while a worker without one on a GPU node still sees CUDA. On a GPU Helio looks the dense bf16 peak up in a table of known parts; on a CPU
there is no honest datasheet number for this process's share of the cores, so
it measures one: the best of fp32 matmuls repeated for a second, on the threads
this process was given. It is measured once per node (by the first process to
ask, while the others wait) and cached, so every run on the node divides by the
same number: one measured per run, while Ray Data and the other workers were
starting, once read 150% MFU.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import torch

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "V100": 125e12,  # fp16; V100 has no bf16
    "T4": 65e12,  # fp16
}


def gpu_peak_flops(name: str) -> float | None:
    """The table's peak for a CUDA device name, e.g. 'NVIDIA H100 80GB HBM3'; None if unknown."""
    for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):  # 'H100 SXM' before 'H100'
        if key in name or key.replace(" ", "") in name.replace(" ", ""):
            return GPU_PEAK_BF16[key]
    return None


def assigned_device() -> torch.device:
    """CUDA (the first of the GPUs Ray assigned this worker) when it was given one, else the CPU."""
    import ray

    return torch.device("cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu")


def cpu_matmul_peak(n: int = 1024, seconds: float = 0.3) -> float:
    """Measured fp32 matmul FLOP/s on this process's threads (best repetition)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool and caches
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


CACHE_ENV = "HELIO_CACHE_DIR"  # where a node keeps what Helio measured on it (default ~/.cache/helio)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def cpu_peak() -> tuple[float, str]:
    """(this node's fp32 matmul peak on this process's threads, where it came from): measured once per node
    and kept in `$HELIO_CACHE_DIR/cpu_peak.json`, keyed by the CPU, the kernels torch picks on it, torch's
    version and the thread count. A file lock makes the first process measure and the others wait and read."""
    threads = torch.get_num_threads()
    key = f"{cpu_name()} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__} | {threads} threads"
    folder = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "helio")
    path = folder / "cpu_peak.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / "cpu_peak.lock", "a")
    except OSError as e:  # no writable cache on this node: a measurement of this process's own, as before
        return cpu_matmul_peak(seconds=1.0), f"{key}: fp32 matmul peak measured now, not cached ({e})"
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: measured again and rewritten
            table = {}
        if not isinstance(table, dict):
            table = {}
        if isinstance(table.get(key), (int, float)) and table[key] > 0:
            return float(table[key]), f"{key}: fp32 matmul peak measured on this node, read from {path}"
        table[key] = cpu_matmul_peak(seconds=1.0)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return table[key], f"{key}: fp32 matmul peak measured now, kept in {path}"


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from) for the device a worker trains on."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        return peak, f"{name}: {'datasheet bf16 peak' if peak else 'unknown GPU, no MFU'}"
    return cpu_peak()


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far: CUDA allocations on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
