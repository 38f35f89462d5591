"""models/quant.py: round-trip bounds, packing, sizes, quantized models close to float, AWQ, save/load,
and fbgemm's int8 kernel computing what its numerics say, on the native and on the AVX2 kernel.

Closeness to float is bounded by a rounding-noise model, not by a number seen on one machine: the float
model with uniform noise of one step wherever the quantized one rounds (`quant_noise.noise_bound`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.encoder import Encoder, EncoderConfig
from models.gpt import GPT, GPTConfig
from models.hf import empty_model, save_model
from models.llama import Llama, LlamaConfig
from models.quant import (SATURATION_FREE_CODE, Int8Linear, QuantSpec, collect_inputs,
                          dequantize_int4, dequantize_int8, fbgemm_available, int8_pairs_saturate, layer_bytes,
                          load_quantized, pack_int4, plan_layers, probe_error, quantize_int4, quantize_int8,
                          quantize_model, save_quantized, unpack_int4)
from quant_noise import noise_bound, rel_err

ROOT = Path(__file__).resolve().parent.parent
GPT_CFG = GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=128)


def _gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPT_CFG).eval()


def _ids(n: int = 4, t: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, GPT_CFG.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def _planted_outliers() -> GPT:
    """A GPT whose first LayerNorms emit a few channels 30x louder: what trained LLMs show
    (Dettmers et al. 2022) and what plain per-group rounding ignores."""
    model = _gpt(seed=3)
    with torch.no_grad():
        for block in model.transformer.h:
            block.ln_1.weight[:6] *= 30
            block.ln_2.weight[:6] *= 30
    return model


def test_int8_round_trip_is_within_half_a_step_of_every_weight():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different ranges
    w[5] = 0.0
    q, d = quantize_int8(w)
    assert q.dtype == torch.int8 and d.shape == (64,) and q.abs().max() <= 127
    assert ((dequantize_int8(q, d) - w).abs() <= d[:, None] / 2 + 1e-7).all()
    assert (dequantize_int8(q, d)[5] == 0).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_codes_pack_exactly_and_groups_have_their_own_scale_and_zero(group):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(group)) * torch.logspace(-4, 1, 48)[:, None]
    codes, scales, zeros = quantize_int4(w, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scales.shape == zeros.shape == (48, 256 // group) and scales.dtype == torch.float16
    packed = pack_int4(codes)
    assert packed.shape == (48, 128) and torch.equal(unpack_int4(packed), codes)
    err = (dequantize_int4(codes, scales, zeros) - w).abs().reshape(48, -1, group)
    assert (err <= scales.float()[..., None] * (0.5 + 1e-5)).all()  # round to nearest within each group
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.randn(4, 100), 64)


def test_int4_groups_too_flat_for_an_fp16_step_stay_finite():
    w = torch.zeros(2, 64)
    w[1, 32:] = 1e-7  # a range below fp16's smallest step
    codes, scales, zeros = quantize_int4(w, 32)
    assert torch.isfinite(scales.float()).all() and int(codes.max()) <= 15
    assert (dequantize_int4(codes, scales, zeros) - w).abs().max() < 1e-6


@pytest.mark.parametrize("method", ["int8", "w8a8", "int4", "awq"])
def test_quantized_gpt_logits_stay_close_to_float(method):
    model, ids = _gpt(), _ids()
    calib = (lambda m: m(_ids(8, 64, seed=7))) if method == "awq" else None
    qmodel, desc = quantize_model(model, QuantSpec(method=method, group_size=64), calib)
    bound = noise_bound(model, qmodel, desc["layers"], lambda m: m(ids)[0])
    with torch.no_grad():
        ref, out = model(ids)[0], qmodel(ids)[0]
    assert rel_err(out, ref) < bound, (method, rel_err(out, ref), bound)
    assert len(desc["layers"]) == 4 * GPT_CFG.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj; the tied head stays float


@pytest.mark.parametrize("method", ["int8", "w8a8", "int4", "awq"])
def test_a_llama_quantizes_its_swiglu_and_grouped_query_layers_and_loads_back(method, tmp_path):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=128,
                              intermediate_size=256)).eval()
    ids = _ids()
    calib = (lambda m: m(_ids(8, 64, seed=7))) if method == "awq" else None
    qmodel, desc = quantize_model(model, QuantSpec(method=method, group_size=64), calib)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert set(desc["layers"]) == {f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
                                   for i in range(2) for p in projections} | {"lm_head"}  # untied: a head of its own
    assert desc["layers"]["model.layers.0.self_attn.k_proj"]["shape"] == [2 * 32, 128]  # 2 KV heads of 32
    bound = noise_bound(model, qmodel, desc["layers"], lambda m: m(ids)[0])
    with torch.no_grad():
        ref, out = model(ids)[0], qmodel(ids)[0]
    assert rel_err(out, ref) < bound, (method, rel_err(out, ref), bound)
    save_model(model, tmp_path)
    save_quantized(qmodel, desc, tmp_path)
    loaded, _ = load_quantized(empty_model(tmp_path), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], out)


def test_int8_kernels_agree_and_w8a8_quantizes_activations():
    model, ids = _gpt(), _ids()
    with torch.no_grad():
        ref = model(ids)[0]
        fb, desc = quantize_model(model, QuantSpec(method="int8"), kernel="fbgemm")
        dq = quantize_model(model, QuantSpec(method="int8"), kernel="dequant")[0](ids)[0]
        w8a8 = quantize_model(model, QuantSpec(method="w8a8"), kernel="dequant")[0](ids)[0]
        w8a8_fb, desc8 = quantize_model(model, QuantSpec(method="w8a8"), kernel="fbgemm")
    # fbgemm's run-time activation rounding is what it adds to dequant's (which rounds weights alone):
    # both stay within the rounding-noise bound of the fbgemm model, which counts weights and activations
    run = lambda m: m(ids)[0]  # noqa: E731
    assert rel_err(fb(ids)[0], dq) < noise_bound(model, fb, desc["layers"], run)
    assert rel_err(w8a8_fb(ids)[0], w8a8) < noise_bound(model, w8a8_fb, desc8["layers"], run)  # both per token
    assert rel_err(dq, ref) < rel_err(w8a8, ref)  # weight-only loses less than weights + activations


# ---- fbgemm's int8 kernel: what it computes, on this CPU's kernel and on AVX2's ----------------------

def _emulate_fbgemm(layer: Int8Linear, x: torch.Tensor, saturating: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What an fbgemm Int8Linear computes on input x, in float64 from its integer definition, and how far
    the kernel may be from it: (y (N, out), bound (N, out)).

    Weights: the stored codes, or on a saturating kernel each row's codes rescaled so its largest is 64.
    Activations (w8a8: each row first divided by max |x_row| / 127): per tensor, 8 bits, asymmetric:
    step s = (max(x, 0) - min(x, 0)) / 255 in fp32, zero point round(-min / s), codes in [0, 255].
    The kernel then sums integer products exactly in int32 and scales in fp32. Two things may differ:
    - float32 rounding of the few scalings of the result (at most 4 of half an ulp each): 2^-21 relative;
    - an activation within float rounding of halfway between two codes (the kernel multiplies by an fp32
      1/s, this divides in float64: they differ by ~3 fp32 roundings of a value <= 255, < 1e-4 of a
      step) may land on either code: one activation step times |w| for each such input.
    """
    q, d = layer.qweight.double(), layer.scale.double()
    if saturating:
        m = q.abs().amax(dim=1).clamp(min=SATURATION_FREE_CODE)  # (out,)
        q = torch.round(q * (SATURATION_FREE_CODE / m)[:, None])
        d = (layer.scale * (m / SATURATION_FREE_CODE).float()).double()  # the fp32 step the layer packs
    x2 = x.reshape(-1, layer.in_features).float()  # (N, in)
    row = torch.ones(len(x2), 1, dtype=torch.float64)
    if layer.act_per_token:  # the layer's own fp32 steps, replayed exactly
        r = (x2.abs().amax(dim=1, keepdim=True) / 127).clamp_(min=1e-12)
        x2, row = x2 / r, r.double()
    lo, hi = min(x2.min().item(), 0.0), max(x2.max().item(), 0.0)
    s64 = (hi - lo) / 255
    s = float(torch.tensor(s64, dtype=torch.float32))  # the kernel's step is fp32
    zp = min(max(round(-lo / s64), 0), 255)
    u = x2.double() / s  # (N, in), in steps
    codes = (torch.round(u) + zp).clamp(0, 255)
    acc = (codes - zp) @ q.t()  # (N, out): integers, exact in float64
    bias = torch.zeros(layer.out_features, dtype=torch.float64) if layer.bias is None else layer.bias.double()
    y = acc * s * d * row + bias
    tie = ((u - u.floor() - 0.5).abs() < 1e-4).double()  # (N, in)
    flips = tie @ q.abs().t()  # (N, out): the most the kernel's integer sum can move by
    bound = 2.0 ** -21 * ((acc.abs() + flips) * s * d * row + bias.abs()) + flips * s * d * row
    return y, bound


def _fbgemm_checks(expect_saturation: bool | None) -> None:
    """The int8 kernel this process runs (i) is the one the probe says, (ii) computes, layer by layer on a
    GPT's own activations, what `_emulate_fbgemm` says it does, and (iii) keeps int8 and w8a8 GPTs within
    the rounding-noise bound of 8-bit numerics (`quant_noise.noise_bound`), on a GPT with activation-outlier channels
    as trained LLMs have and on one without."""
    saturating = int8_pairs_saturate()
    if expect_saturation is not None:
        assert saturating is expect_saturation
    assert saturating is (probe_error(127) > 1e-3)
    assert probe_error(SATURATION_FREE_CODE) < 1e-6 and probe_error(-SATURATION_FREE_CODE) < 1e-6  # never saturate
    ids = _ids()
    for model in (_gpt(), _planted_outliers()):
        for method in ("int8", "w8a8"):
            qmodel, desc = quantize_model(model, QuantSpec(method=method), kernel="fbgemm")
            seen: dict[str, tuple] = {}
            hooks = [m.register_forward_hook(lambda mod, args, y, n=n: seen.__setitem__(n, (mod, args[0], y)))
                     for n, m in qmodel.named_modules() if isinstance(m, Int8Linear)]
            with torch.no_grad():
                out, ref = qmodel(ids)[0], model(ids)[0]
            for h in hooks:
                h.remove()
            assert len(seen) == 4 * GPT_CFG.n_layer
            for name, (layer, x, y) in seen.items():
                expected, bound = _emulate_fbgemm(layer, x, saturating)
                gap = (y.reshape(expected.shape).double() - expected).abs()
                assert (gap <= bound).all(), (method, name, (gap - bound).max().item())
            bound = noise_bound(model, qmodel, desc["layers"], lambda m: m(ids)[0])
            assert rel_err(out, ref) < bound, (method, rel_err(out, ref), bound)


def test_the_saturation_probe_really_overflows_int16():
    # the probe (activations all at code 255, weights at `code`) adds pairs of products 255 * code in int16
    assert 2 * 255 * 127 > 2 ** 15 - 1 >= 2 * 255 * SATURATION_FREE_CODE
    ones = torch.ones(4, 64)
    scale, zero_point = torch._choose_qparams_per_tensor(ones, False)  # what linear_dynamic picks for them
    codes = torch.quantize_per_tensor(ones, scale, zero_point, torch.quint8).int_repr()
    assert zero_point == 0 and (codes == 255).all()


@pytest.mark.skipif(not fbgemm_available(), reason="this PyTorch has no fbgemm")
def test_the_native_int8_kernel_computes_its_numerics_within_the_quality_bound():
    _fbgemm_checks(expect_saturation=None)  # whichever kernel this CPU runs: VNNI, AMX or AVX2


@pytest.mark.skipif(not fbgemm_available() or platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="fbgemm's AVX2 kernel runs on x86 only")
def test_the_avx2_int8_kernel_saturates_and_7_bit_weights_keep_int8_within_the_same_bound():
    # fbgemm picks its kernel per process: forced to AVX2 (no VNNI), as on an AVX2-only CPU
    env = os.environ | {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    code = "import sys; sys.path.insert(0, 'tests'); import test_quant; test_quant._fbgemm_checks(True)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_sizes_int8_and_int4_against_fp32_linear_bytes():
    model = _gpt()
    for method, group, bound in (("int8", 128, 0.27), ("int4", 32, 0.16), ("int4", 128, 0.16), ("awq", 64, 0.16)):
        calib = (lambda m: m(_ids(2, 32))) if method == "awq" else None
        q, desc = quantize_model(model, QuantSpec(method=method, group_size=group), calib)
        names = list(desc["layers"])
        ratio = layer_bytes(q, names) / layer_bytes(model, names)
        assert ratio <= bound, (method, group, ratio)


def test_awq_beats_plain_int4_on_a_model_with_activation_outliers():
    model, ids = _planted_outliers(), _ids(8, 64, seed=11)
    calib = _ids(8, 64, seed=5)
    with torch.no_grad():
        ref = model(ids)[0]
        int4 = quantize_model(model, QuantSpec(method="int4", group_size=128))[0](ids)[0]
        awq_model, desc = quantize_model(model, QuantSpec(method="awq", group_size=128), lambda m: m(calib))
        awq = awq_model(ids)[0]
    assert any(a > 0 for a in desc["awq_alpha"].values())
    assert rel_err(awq, ref) < 0.8 * rel_err(int4, ref), (rel_err(awq, ref), rel_err(int4, ref))


def test_embeddings_can_be_int8_too_and_the_tied_head_is_stored_once(tmp_path):
    model, ids = _gpt(), _ids()
    qmodel, desc = quantize_model(model, QuantSpec(method="int8", embeddings=True))
    assert desc["layers"]["lm_head"]["tied_to"] == "transformer.wte"
    assert qmodel.lm_head.qweight is qmodel.transformer.wte.qweight
    bound = noise_bound(model, qmodel, desc["layers"], lambda m: m(ids)[0])  # the tables' rounding included
    with torch.no_grad():
        assert rel_err(qmodel(ids)[0], model(ids)[0]) < bound
    save_model(model, tmp_path)
    save_quantized(qmodel, desc, tmp_path)
    ties = json.loads((tmp_path / "quantization.json").read_text())["ties"]
    assert ties == {"lm_head.qweight": "transformer.wte.qweight", "lm_head.scale": "transformer.wte.scale"}
    loaded, _ = load_quantized(empty_model(tmp_path), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], qmodel(ids)[0])


def test_a_fresh_process_loads_the_same_outputs(tmp_path):
    model, ids = _gpt(), _ids()
    qmodel, desc = quantize_model(model, QuantSpec(method="awq", group_size=64), lambda m: m(_ids(4, 64)))
    save_model(model, tmp_path)  # config.json (the float weights are overwritten next)
    save_quantized(qmodel, desc, tmp_path)
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch; from models.hf import empty_model; from models.quant import load_quantized; "
            "f = sys.argv[1]; m, _ = load_quantized(empty_model(f), f); "
            "torch.save(m(torch.load(f + '/ids.pt'))[0], f + '/logits.pt')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, check=True)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), qmodel(ids)[0])


def test_a_quantized_folder_that_does_not_fit_is_refused(tmp_path):
    model = _gpt()
    qmodel, desc = quantize_model(model, QuantSpec(method="int8"))
    save_model(model, tmp_path)
    save_quantized(qmodel, desc, tmp_path)
    bad = json.loads((tmp_path / "quantization.json").read_text())
    bad["layers"]["transformer.h.0.mlp.c_fc"]["shape"] = [512, 64]
    (tmp_path / "quantization.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="does not match quantization.json"):
        load_quantized(empty_model(tmp_path), tmp_path)
    (tmp_path / "quantization.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_quantized(empty_model(tmp_path), tmp_path)
    from models.hf import load_model

    with pytest.raises(ValueError, match="quantized model"):
        load_model(tmp_path)


def test_encoder_quantizes_and_keeps_its_embeddings_close():
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(vocab_size=200, max_position=64, n_layer=2, n_head=4, n_embd=128)).drop_mlm_head().eval()
    ids = torch.randint(5, 200, (6, 40))
    q, desc = quantize_model(enc, QuantSpec(method="int8"))
    assert len(desc["layers"]) == 6 * 2  # query, key, value, attention dense, intermediate, output dense
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(q.embed(ids), enc.embed(ids), dim=-1)
    assert cos.min() > 0.999


def test_spec_mistakes_name_the_field():
    with pytest.raises(ValueError, match="method"):
        QuantSpec(method="int3")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=48)
    with pytest.raises(ValueError, match="skip"):
        QuantSpec(skip=("(",))


def test_a_bert_mlm_head_tied_to_int8_embeddings_round_trips(tmp_path):
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(vocab_size=200, max_position=64, n_layer=1, n_head=4, n_embd=128)).eval()
    ids = torch.randint(5, 200, (3, 20))
    q, desc = quantize_model(enc, QuantSpec(method="int8", embeddings=True))
    head = q.cls.predictions
    assert head.decoder.qweight is q.bert.embeddings.word_embeddings.qweight
    assert head.decoder.bias.data_ptr() == head.bias.data_ptr()  # the MLM bias stays one tensor
    save_model(enc, tmp_path)
    save_quantized(q, desc, tmp_path)
    loaded, _ = load_quantized(empty_model(tmp_path), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.mlm_logits(loaded(ids)), q.mlm_logits(q(ids)))
        err = rel_err(q.mlm_logits(q(ids)), enc.mlm_logits(enc(ids)))
    assert err < noise_bound(enc, q, desc["layers"], lambda m: m.mlm_logits(m(ids)))


def test_skip_keeps_layers_and_their_tied_heads_float():
    layers = plan_layers(_gpt(), QuantSpec(embeddings=True, skip=(r"\.mlp\.", "wte")))
    assert not any(".mlp." in n for n in layers) and "transformer.wte" not in layers and "lm_head" not in layers
    assert "transformer.wpe" in layers and "transformer.h.0.attn.c_attn" in layers


def test_calibration_rows_are_spread_over_all_the_data():
    layer = torch.nn.Linear(4, 4)
    batches = [torch.full((100, 4), float(i)) for i in range(50)]  # batch i is all i
    rows = collect_inputs(torch.nn.Sequential(layer), ["0"], lambda m: [m(b) for b in batches], max_rows=64)["0"]
    seen = set(rows[:, 0].tolist())
    assert len(rows) == 64 and 0.0 in seen and 49.0 in seen and len(seen) >= 30


def test_a_loaded_layer_forgets_its_old_runtime_weights():
    a, b = _gpt(seed=0), _gpt(seed=1)
    qa, _ = quantize_model(a, QuantSpec(method="int4", group_size=64))
    qb, _ = quantize_model(b, QuantSpec(method="int4", group_size=64))
    ids = _ids()
    with torch.no_grad():
        qa(ids)  # builds qa's dequantized weights
        qa.load_state_dict(qb.state_dict())
        assert torch.equal(qa(ids)[0], qb(ids)[0])
