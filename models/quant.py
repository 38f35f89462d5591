"""Post-training weight quantization: int8, int4, w8a8 and activation-aware int4 (AWQ).

Every method rewrites the nn.Linear layers of a trained model (embeddings and
a tied LM head only when asked; norms always stay float: they are 1-D and a
rounding error of the whole model's bytes):

- int8: symmetric weights per output channel, round to nearest:
  Q(w) = round(w / d) * d with d = max|w_row| / 127 (weight-only numerics;
  fbgemm's kernel quantizes activations per tensor as it runs).
- int4: weight-only, asymmetric, per group of `group_size` inputs:
  q = clamp(round(w / s) + z, 0, 15), w ~ (q - z) * s; two values per byte.
- w8a8: int8 weights as above plus dynamic per-token int8 activations.
- awq: int4 whose groups see the weights scaled by per-input-channel factors
  s = mean|x|^alpha searched on calibration activations (Lin et al. 2023,
  https://arxiv.org/abs/2306.00978): W x = (W diag(s)) (x / s), so input
  channels that carry large activations get finer quantization steps.

Storage is always the compressed form (int8 / packed uint8 codes, fp16 or
fp32 scales). Execution picks a kernel per device: on CPU int8 and w8a8 run
through fbgemm's dynamic int8 GEMM, which quantizes activations per tensor at
run time to 8 bits (w8a8 scales the rows of x to a common range first, so that
this acts per token); `kernel: dequant` runs int8 as exact weight-only in float.
Where fbgemm's kernel saturates (x86 without VNNI, see `int8_pairs_saturate`)
the weights run at 7 bits instead of the activations. int4 has no CPU kernel
faster than fp32 (aten's int4 CPU GEMM measured 10-100x slower), so its weights
are dequantized once at load: `kernel` says which path ran.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

METHODS = ("int8", "int4", "w8a8", "awq")
KERNELS = ("auto", "fbgemm", "dequant")
QUANT_CONFIG = "quantization.json"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class QuantSpec:
    method: str = "int8"  # int8 | int4 | w8a8 | awq
    group_size: int = 128  # int4 / awq: inputs per scale and zero point
    embeddings: bool = False  # also int8 the embedding tables (and an LM head tied to them)
    skip: tuple[str, ...] = ()  # regexes of Linear names kept in float, e.g. ["score", "classifier"]
    awq_grid: int = 20  # awq: alphas tried in [0, 1)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size: must be 32, 64, 128 or 256, not {self.group_size}")
        if self.awq_grid < 2:
            raise ValueError("awq_grid: must be at least 2")
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"skip: {pattern!r} is not a regular expression ({e})") from None

    @property
    def bits(self) -> int:
        return 4 if self.method in ("int4", "awq") else 8


# ---- the maths: quantize, dequantize, pack ---------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float -> q (out, in) int8 in [-127, 127] and d (out,) fp32, w ~ q * d per row."""
    w = w.float()
    d = w.abs().amax(dim=1) / 127  # (out,)
    d = torch.where(d > 0, d, torch.ones_like(d))  # an all-zero row: any step reproduces it exactly
    q = torch.round(w / d[:, None]).clamp(-127, 127).to(torch.int8)
    return q, d


def dequantize_int8(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return q.float() * d[:, None]  # (out, in)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (out, in) -> codes (out, in) uint8 in [0, 15], scales (out, in/g) fp16, zeros (out, in/g) uint8.

    Asymmetric per group: the group's [min, max] (widened to include 0) is cut
    into 15 steps; the step is rounded up to fp16 before the codes are computed,
    so every weight is within half a step of its code and dequantizing the
    stored values reproduces exactly what was optimised.
    """
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the layer's {in_f} inputs")
    g = w.float().reshape(out_f, in_f // group_size, group_size)  # (out, G, g)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # (out, G)
    step = (hi - lo) / 15
    s = step.half()
    s = torch.where(s.float() < step, torch.nextafter(s, torch.full_like(s, float("inf"))), s)  # never rounded down,
    s = torch.where(s > 0, s, torch.ones_like(s))  # so [lo, hi] fits 16 codes; an all-zero group: any step
    z = torch.round(-lo / s.float()).clamp(0, 15)
    q = torch.round(g / s.float()[..., None] + z[..., None]).clamp(0, 15)
    return q.reshape(out_f, in_f).to(torch.uint8), s, z.to(torch.uint8)


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    out_f, in_f = codes.shape
    g = codes.float().reshape(out_f, scales.size(1), -1)  # (out, G, g)
    return ((g - zeros.float()[..., None]) * scales.float()[..., None]).reshape(out_f, in_f)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) uint8 codes in [0, 15] -> (out, in/2) bytes: even inputs in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.size(0), -1)


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 quantize-dequantize of each row (token) of x: what w8a8 does to activations."""
    d = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(x / d).clamp(-127, 127) * d


# ---- runnable layers --------------------------------------------------------------------------------

# x86 int8 GEMMs without VNNI (fbgemm's AVX2 and AVX-512 kernels) multiply u8 activation codes by s8
# weight codes with vpmaddubsw, which adds each pair of adjacent products in int16 and saturates there:
# 2 * 255 * 127 = 64770 > 32767. With weight codes |q| <= 64 no pair can: 2 * 255 * 64 = 32640 <= 32767.
SATURATION_FREE_CODE = 64
_PROBE_K = 64  # inputs of the probe GEMM: 32 pairs, each at 2 * 255 * code when codes are at their max


def _pack_int8(q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed form of int8 codes q (out, in) with fp32 steps d (out,) per output channel."""
    with warnings.catch_warnings():  # the quantized-tensor constructors are marked deprecated
        warnings.simplefilter("ignore")
        w = torch._make_per_channel_quantized_tensor(q, d.double(), torch.zeros(len(d), dtype=torch.long, device=d.device), 0)
        return torch.ops.quantized.linear_prepack(w, bias)


def probe_error(code: int) -> float:
    """The relative error of one fbgemm int8 GEMM whose weight codes are all `code` and whose activations
    all sit at the top of their range (per-tensor step 1/255, zero point 0: every activation code 255),
    so that every pair of products is 2 * 255 * code. 0 up to float rounding unless the kernel saturates."""
    q = torch.full((8, _PROBE_K), code, dtype=torch.int8, device="cpu")  # fbgemm runs on the CPU only
    y = torch.ops.quantized.linear_dynamic(torch.ones(4, _PROBE_K, device="cpu"),
                                           _pack_int8(q, torch.ones(8, device="cpu"), None), False)
    exact = code * _PROBE_K  # sum over k of 1 * (code * 1)
    return ((y - exact).abs().max() / abs(exact)).item()


def int8_pairs_saturate() -> bool:
    """Whether this process's int8 GEMM (under the current quantized engine) saturates pair sums of
    8-bit activations and 8-bit weights. Probed by running the kernel, not read from /proc/cpuinfo:
    fbgemm picks its kernel per process (FBGEMM_ENABLE_INSTRUCTIONS=AVX2 runs the AVX2 kernel on a VNNI
    CPU), so the CPU's flags do not say which kernel runs."""
    return _saturates(torch.backends.quantized.engine)


@lru_cache(maxsize=None)
def _saturates(engine: str) -> bool:  # `engine` keys the cache: probed once per engine, under it
    return probe_error(127) > 1e-3  # float rounding leaves ~1e-7; saturated sums come out about half


def kernel_weights(q: torch.Tensor, d: torch.Tensor, saturating: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 codes (out, in) and steps (out,) the GEMM runs on: the stored ones, or on a saturating
    kernel the same rows at 7 bits, so that the activations keep all 8. Activation steps are per tensor,
    set by the loudest (outlier) channel; weight steps are per output channel: a bit off the weights
    costs far less than a bit off the activations.

    Each row's largest code m goes to 64: q' = round(q * 64 / m), |q'| <= 64, step d * m / 64. Rescaling
    rather than halving: no code lands halfway (128 q = m (2k + 1) has no solution for m <= 127, where
    halving puts every odd code on a tie), and the second rounding adds ~30% less variance."""
    if not saturating:
        return q, d
    m = q.abs().amax(dim=1).float().clamp(min=SATURATION_FREE_CODE)  # (out,): rows within 7 bits keep theirs
    codes = torch.round(q.float() * (SATURATION_FREE_CODE / m)[:, None]).to(torch.int8)  # (out, in)
    return codes, d * m / SATURATION_FREE_CODE


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


class _Cached(nn.Module):
    """A layer whose run-time form (packed or dequantized weight) is derived from its stored buffers:
    rebuilt on first use after a load or a device move."""

    def __init__(self) -> None:
        super().__init__()
        self._runtime = None
        self.register_load_state_dict_post_hook(_Cached._after_load)

    @staticmethod
    def _after_load(module: "_Cached", incompatible_keys) -> None:
        module._reset()

    def _reset(self) -> None:
        self._runtime = None

    def _apply(self, fn, recurse=True):
        self._reset()
        return super()._apply(fn, recurse)


class Int8Linear(_Cached):
    """y = x W^T + b with W stored as int8 (out, in) and an fp32 step per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, act_per_token: bool, kernel: str):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_per_token, self.kernel = act_per_token, kernel
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "fbgemm" and x.device.type == "cpu":
            return self._fbgemm(x)
        if self._runtime is None:
            self._runtime = dequantize_int8(self.qweight, self.scale).to(x.dtype)
        return F.linear(fake_quant_per_token(x) if self.act_per_token else x, self._runtime,
                        None if self.bias is None else self.bias.to(x.dtype))

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        """fbgemm's dynamic int8 GEMM, which quantizes its input per tensor to 8 bits at run time. Per
        token (w8a8): every row is first scaled to max |x| = 127, so that one range fits all rows, and
        the output rows are scaled back (the bias then added outside the kernel). The stored codes stay
        8-bit; a saturating kernel runs them at 7 bits (`kernel_weights`)."""
        if self._runtime is None:
            q, d = kernel_weights(self.qweight, self.scale, int8_pairs_saturate())
            self._runtime = _pack_int8(q, d, None if self.act_per_token else self.bias)
        packed = self._runtime  # activations at 8 bits everywhere: reduce_range=False below
        shape = x.shape
        x2 = x.reshape(-1, self.in_features) if x.dim() != 2 else x  # (N, in)
        x2 = x2 if x2.dtype == torch.float32 else x2.float()
        if not self.act_per_token:
            y = torch.ops.quantized.linear_dynamic(x2, packed, False)
        else:  # measured fastest of the fused variants: one new tensor in, the output scaled in place
            d = (x2.abs().amax(dim=1, keepdim=True) / 127).clamp_(min=1e-12)  # (N, 1)
            y = torch.ops.quantized.linear_dynamic(x2 / d, packed, False).mul_(d)
            if self.bias is not None:
                y.add_(self.bias)
        y = y if x.dim() == 2 else y.reshape(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)


class Int4Linear(_Cached):
    """y = x W^T + b with W stored as packed 4-bit codes, an fp16 scale and a uint8 zero point per group,
    and (awq) an fp16 input-channel factor s: W = dequant(codes) / s. Runs on the dequantized weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, act_scale: bool):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.kernel = "dequant"
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("act_scale", torch.ones(in_features, dtype=torch.float16) if act_scale else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def weight(self) -> torch.Tensor:
        w = dequantize_int4(unpack_int4(self.qweight), self.scales, self.zeros)  # (out, in)
        return w / self.act_scale.float()[None, :] if self.act_scale is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runtime is None:
            self._runtime = self.weight().to(x.dtype)
        return F.linear(x, self._runtime, None if self.bias is None else self.bias.to(x.dtype))


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with an fp32 step per row (weight-only int8)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(num_embeddings, dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).float() * self.scale[ids][..., None]  # (..., C)


# ---- whole models ----------------------------------------------------------------------------------

def _resolve_kernel(kernel: str) -> str:
    """What int8 layers run on: fbgemm where this PyTorch has it (auto), or dequant."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: must be one of {', '.join(KERNELS)}, not {kernel!r}")
    if kernel == "auto":
        return "fbgemm" if fbgemm_available() else "dequant"
    if kernel == "fbgemm" and not fbgemm_available():
        raise ValueError("kernel: this PyTorch build has no fbgemm engine; use auto or dequant")
    return kernel


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def plan_layers(model: nn.Module, spec: QuantSpec) -> dict[str, dict]:
    """{module name: what it becomes}: every Linear not skipped; embeddings (and Linears tied to them)
    when `spec.embeddings`. Under int4 / awq a layer whose inputs the group size does not divide
    becomes int8. A description small enough for quantization.json."""
    emb_weights = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    layers: dict[str, dict] = {}
    for name, m in model.named_modules():
        if any(re.search(p, name) for p in spec.skip):
            continue
        if isinstance(m, nn.Embedding) and spec.embeddings and m.num_embeddings > 2:
            layers[name] = {"type": "int8_embedding", "shape": list(m.weight.shape)}
        elif isinstance(m, nn.Linear):
            tied = emb_weights.get(id(m.weight))
            if tied is not None:
                if tied in layers:  # a head follows its table (planned before it: modules come in order)
                    layers[name] = {"type": "int8_linear", "shape": [m.out_features, m.in_features],
                                    "bias": m.bias is not None, "tied_to": tied}
                continue
            int4 = spec.method in ("int4", "awq") and m.in_features % spec.group_size == 0
            layers[name] = {"type": "int4_linear" if int4 else "int8_linear",
                            "shape": [m.out_features, m.in_features], "bias": m.bias is not None}
            if int4 and spec.method == "awq":
                layers[name]["act_scale"] = True
    return layers


def convert(model: nn.Module, spec: QuantSpec, layers: dict[str, dict], kernel: str = "auto") -> nn.Module:
    """Swaps the planned modules for empty quantized ones in place (the skeleton a load fills in)."""
    int8_kernel = _resolve_kernel(kernel)
    for name, info in layers.items():
        out_f, in_f = info["shape"]
        if info["type"] == "int8_embedding":
            new: nn.Module = Int8Embedding(out_f, in_f)
        elif info["type"] == "int4_linear":
            new = Int4Linear(in_f, out_f, info["bias"], spec.group_size, info.get("act_scale", False))
        else:
            new = Int8Linear(in_f, out_f, info["bias"], spec.method == "w8a8", int8_kernel)
        _set(model, name, new)
    tie(model, layers)
    return model


CalibrationRun = Callable[[nn.Module], None]  # runs the float model over the calibration batches


@torch.no_grad()
def collect_inputs(model: nn.Module, names: list[str], run: CalibrationRun,
                   max_rows: int = 4096) -> dict[str, torch.Tensor]:
    """The inputs each named Linear sees while `run` feeds calibration data: {name: (rows, in)}.

    Every row is kept until a layer holds 2 x max_rows; then every other one is
    dropped and later rows are taken at twice the stride, so the rows kept stay
    spread evenly over all the calibration data in bounded memory.
    """
    kept: dict[str, list] = {n: [[], 1, 0] for n in names}  # rows, stride, rows seen

    def hook(module, args, name):
        rows, stride, seen = kept[name]
        x = args[0].detach().reshape(-1, args[0].size(-1)).float()
        rows.append(x[(-seen) % stride::stride])  # continue the stride across calls
        kept[name][2] = seen + len(x)
        if sum(len(r) for r in rows) > 2 * max_rows:
            kept[name][0], kept[name][1] = [torch.cat(rows)[::2]], stride * 2

    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    try:
        run(model)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, (rows, _, _) in kept.items():
        if not rows:
            raise ValueError(f"calibration never reached layer '{name}'")
        x = torch.cat(rows)
        out[name] = x[torch.linspace(0, len(x) - 1, min(len(x), max_rows)).long()]  # evenly spread rows
    return out


@torch.no_grad()
def awq_scale(w: torch.Tensor, x: torch.Tensor, group_size: int, grid: int) -> tuple[torch.Tensor, float]:
    """The per-input-channel factor s = mean|x|^alpha (normalised) whose int4 quantization of W diag(s)
    gives the smallest output error on the calibration inputs x (rows, in); alpha = 0 is plain int4.
    Returns (s (in,) fp16, alpha)."""
    w, x = w.float(), x.float()
    ref = x @ w.t()  # (rows, out)
    mean_abs = x.abs().mean(dim=0).clamp(min=1e-5)  # (in,)
    best = (float("inf"), torch.ones_like(mean_abs).half(), 0.0)
    for i in range(grid):
        alpha = i / grid
        s = mean_abs.pow(alpha)
        s = (s / (s.max() * s.min()).sqrt()).half()  # fp16: exactly what is stored
        sf = s.float()
        wq = dequantize_int4(*quantize_int4(w * sf[None, :], group_size)) / sf[None, :]
        err = (x @ wq.t() - ref).pow(2).mean().item()
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec, calibrate: CalibrationRun | None = None,
                   kernel: str = "auto") -> tuple[nn.Module, dict]:
    """A quantized copy of a float model and its quantization.json description.

    `calibrate` (awq only) runs the float model over calibration data; the
    inputs every int4 layer sees are recorded and its scales searched on them.
    """
    model = copy.deepcopy(model).eval()
    layers = plan_layers(model, spec)
    weights = {name: model.get_submodule(name).weight.detach().float() for name in layers}
    biases = {name: getattr(model.get_submodule(name), "bias", None) for name in layers}
    alphas: dict[str, float] = {}
    inputs: dict[str, torch.Tensor] = {}
    if spec.method == "awq":
        if calibrate is None:
            raise ValueError("method: awq needs calibration data")
        inputs = collect_inputs(model, [n for n, i in layers.items() if i.get("act_scale")], calibrate)
    convert(model, spec, layers, kernel)
    for name, info in layers.items():
        m, w, b = model.get_submodule(name), weights[name], biases[name]
        if info["type"] == "int8_embedding" or (info["type"] == "int8_linear" and "tied_to" not in info):
            m.qweight, m.scale = quantize_int8(w)
        elif info["type"] == "int4_linear":
            if info.get("act_scale"):
                s, alphas[name] = awq_scale(w, inputs[name], spec.group_size, spec.awq_grid)
                m.act_scale, w = s, w * s.float()[None, :]
            codes, m.scales, m.zeros = quantize_int4(w, spec.group_size)
            m.qweight = pack_int4(codes)
        if b is not None and getattr(m, "bias", None) is not None:
            m.bias = b.detach().float()  # the copy's own tensor: a bias shared with another module stays shared
    tie(model, layers)
    description = {"method": spec.method, "bits": spec.bits, "group_size": spec.group_size if spec.bits == 4 else None,
                   "embeddings": spec.embeddings, "skip": list(spec.skip), "layers": layers,
                   "activations": "int8 per token, dynamic" if spec.method == "w8a8" else "float"}
    if alphas:
        description["awq_alpha"] = alphas
    return model, description


def tie(model: nn.Module, layers: dict[str, dict]) -> None:
    """A head tied to a quantized embedding table shares its int8 rows and steps."""
    for name, info in layers.items():
        if "tied_to" in info:
            head, table = model.get_submodule(name), model.get_submodule(info["tied_to"])
            head.qweight, head.scale = table.qweight, table.scale
            head._reset()


def kernels_used(model: nn.Module) -> dict[str, int]:
    """{kernel: number of layers that run on it} where the model is now (fbgemm runs on CPU only)."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            kernel = m.kernel if m.qweight.device.type == "cpu" else "dequant"
            out[kernel] = out.get(kernel, 0) + 1
    return out


# ---- bytes -----------------------------------------------------------------------------------------

def layer_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes of the named layers' tensors (weights, codes, scales, zeros, biases), each tensor once."""
    seen, total = set(), 0
    for name in names:
        for t in list(model.get_submodule(name).parameters(recurse=False)) + \
                list(model.get_submodule(name).buffers(recurse=False)):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


# ---- on disk ---------------------------------------------------------------------------------------

def save_quantized(model: nn.Module, description: dict, folder: str | Path) -> list[str]:
    """model.safetensors (Helio's parameter names; a tensor shared by two names stored once) and
    quantization.json (method, bits, group size, layers, which names are ties)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, ties, first = {}, {}, {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in first:
            ties[name] = first[key]
        else:
            first[key] = name
            state[name] = t.detach().cpu().contiguous()
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt", "helio_quantized": description["method"]})
    (folder / QUANT_CONFIG).write_text(json.dumps(description | {"ties": ties}, indent=2))
    return [WEIGHTS, QUANT_CONFIG]


def read_description(folder: str | Path) -> dict:
    path = Path(folder) / QUANT_CONFIG
    try:
        description = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"'{folder}' has no {QUANT_CONFIG}: not a quantized model") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if description.get("method") not in METHODS or not isinstance(description.get("layers"), dict):
        raise ValueError(f"{path} names no known method ({', '.join(METHODS)}) and layers")
    return description


def load_quantized(skeleton: nn.Module, folder: str | Path, kernel: str = "auto") -> tuple[nn.Module, dict]:
    """Fills `skeleton` (the float architecture from config.json, any weights) with a quantized folder's
    integer weights; every stored tensor must find its place and every place a tensor of its shape."""
    folder = Path(folder)
    description = read_description(folder)
    spec = QuantSpec(method=description["method"], group_size=description.get("group_size") or 128,
                     embeddings=description.get("embeddings", False), skip=tuple(description.get("skip", ())))
    try:
        convert(skeleton, spec, description["layers"], kernel)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder}/{QUANT_CONFIG} does not fit this architecture ({e})") from None
    state = load_file(str(folder / WEIGHTS))
    for name, source in description.get("ties", {}).items():
        if source in state:
            state[name] = state[source]
    try:
        skeleton.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ValueError(f"{folder}/{WEIGHTS} does not match {QUANT_CONFIG}: {detail}") from None
    return skeleton.eval(), description
