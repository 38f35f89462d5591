"""The standard model of rounding error (Widrow & Kollar 2008), for bounding a quantized model's distance
from its float original by what its own rounding steps predict rather than by a number seen on one
machine. Shared by tests/test_quant.py and tests/test_quantize_job.py."""

from __future__ import annotations

import copy

import torch

from models.quant import Int8Embedding, Int8Linear


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def weight_step(m: torch.nn.Module) -> torch.Tensor:
    """The rounding step of each stored weight of a quantized layer, in the float weight's units (out, in)."""
    if isinstance(m, (Int8Linear, Int8Embedding)):
        return m.scale[:, None].expand(m.qweight.shape)
    step = m.scales.float().repeat_interleave(m.group_size, dim=1)  # (out, in): each group's step
    return step / m.act_scale.float()[None, :] if m.act_scale is not None else step  # awq: W = W' / s


def rounding_noise(model: torch.nn.Module, qmodel: torch.nn.Module, layers: dict, seed: int) -> torch.nn.Module:
    """The float model with uniform noise of one rounding step (+-half a step) wherever `qmodel` rounds: on
    every stored weight (8-bit steps as stored), and on the inputs of int8 layers whose kernel rounds them at
    run time (fbgemm: per tensor to 8 bits; w8a8: per token). The standard model of rounding error
    (Widrow & Kollar 2008): what quantizing costs when errors are independent and uniform."""
    g = torch.Generator().manual_seed(seed)
    noisy = copy.deepcopy(model)
    for name, info in layers.items():
        if "tied_to" in info:  # a tied head's weight is its table's, noised once
            continue
        q, target = qmodel.get_submodule(name), noisy.get_submodule(name)
        with torch.no_grad():
            target.weight += weight_step(q) * (torch.rand(target.weight.shape, generator=g) - 0.5)
        per_token = isinstance(q, Int8Linear) and q.act_per_token
        if per_token or (isinstance(q, Int8Linear) and q.kernel == "fbgemm"):
            def noise_input(module, args, per_token=per_token):
                x = args[0]
                step = (x.abs().amax(-1, keepdim=True) / 127 if per_token  # w8a8: max |x_row| / 127
                        else (x.max().clamp(min=0) - x.min().clamp(max=0)) / 255)  # per tensor: range / 255
                return (x + step * (torch.rand(x.shape, generator=g) - 0.5),)
            target.register_forward_pre_hook(noise_input)
    return noisy.eval()


def noise_bound(model, qmodel, layers, run, seeds: int = 3) -> float:
    """2x the relative error of `rounding_noise` (mean of `seeds` draws) on the output `run(m)` gives.

    The relative error is a norm over thousands of outputs, so draws agree to a few percent; the stated
    2x margin is for what deterministic rounding does beyond the noise model: correlated errors, and on a
    saturating kernel (no VNNI) the weights' second rounding to 7 bits, which the bound deliberately does
    not include (the quality owed is the 8-bit kernel's). Measured: the models here land at 0.44-0.60 of
    the bound on a VNNI kernel, 0.63-0.81 on the AVX2 kernel; 7-bit activations (the AVX2 path before)
    and saturated 8-bit weights exceed it on a GPT with outlier channels."""
    with torch.no_grad():
        ref = run(model)
        noise = sum(rel_err(run(rounding_noise(model, qmodel, layers, s)), ref) for s in range(seeds)) / seeds
    return 2 * noise
