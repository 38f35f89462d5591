"""models/quant.py: round-trip bounds, packing, sizes, quantized models close to float, AWQ, save/load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.encoder import Encoder, EncoderConfig
from models.gpt import GPT, GPTConfig
from models.hf import empty_model, save_model
from models.quant import (QuantSpec, collect_inputs, dequantize_int4, dequantize_int8, layer_bytes, load_quantized,
                          pack_int4, plan_layers, quantize_int4, quantize_int8, quantize_model, save_quantized,
                          unpack_int4)

ROOT = Path(__file__).resolve().parent.parent
GPT_CFG = GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=128)


def _gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPT_CFG).eval()


def _ids(n: int = 4, t: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, GPT_CFG.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


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


@pytest.mark.parametrize("method,bound", [("int8", 0.02), ("w8a8", 0.03), ("int4", 0.15), ("awq", 0.15)])
def test_quantized_gpt_logits_stay_close_to_float(method, bound):
    model, ids = _gpt(), _ids()
    calib = (lambda m: m(_ids(8, 64, seed=7))) if method == "awq" else None
    qmodel, desc = quantize_model(model, QuantSpec(method=method, group_size=64), calib)
    with torch.no_grad():
        ref, out = model(ids)[0], qmodel(ids)[0]
    assert _rel_err(out, ref) < bound, (method, _rel_err(out, ref))
    assert len(desc["layers"]) == 4 * GPT_CFG.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj; the tied head stays float


def test_int8_kernels_agree_and_w8a8_quantizes_activations():
    model, ids = _gpt(), _ids()
    with torch.no_grad():
        ref = model(ids)[0]
        fb = quantize_model(model, QuantSpec(method="int8"), kernel="fbgemm")[0](ids)[0]
        dq = quantize_model(model, QuantSpec(method="int8"), kernel="dequant")[0](ids)[0]
        w8a8 = quantize_model(model, QuantSpec(method="w8a8"), kernel="dequant")[0](ids)[0]
        w8a8_fb = quantize_model(model, QuantSpec(method="w8a8"), kernel="fbgemm")[0](ids)[0]
    assert _rel_err(fb, dq) < 0.03  # fbgemm's run-time activation rounding is the only difference
    assert _rel_err(w8a8_fb, w8a8) < 0.03  # both kernels quantize activations per token
    assert _rel_err(dq, ref) < _rel_err(w8a8, ref)  # weight-only loses less than weights + activations


def test_sizes_int8_and_int4_against_fp32_linear_bytes():
    model = _gpt()
    for method, group, bound in (("int8", 128, 0.27), ("int4", 32, 0.16), ("int4", 128, 0.16), ("awq", 64, 0.16)):
        calib = (lambda m: m(_ids(2, 32))) if method == "awq" else None
        q, desc = quantize_model(model, QuantSpec(method=method, group_size=group), calib)
        names = list(desc["layers"])
        ratio = layer_bytes(q, names) / layer_bytes(model, names)
        assert ratio <= bound, (method, group, ratio)


def _planted_outliers() -> GPT:
    """A GPT whose first LayerNorms emit a few channels 30x louder: what trained LLMs show
    (Dettmers et al. 2022) and what plain per-group rounding ignores."""
    model = _gpt(seed=3)
    with torch.no_grad():
        for block in model.transformer.h:
            block.ln_1.weight[:6] *= 30
            block.ln_2.weight[:6] *= 30
    return model


def test_awq_beats_plain_int4_on_a_model_with_activation_outliers():
    model, ids = _planted_outliers(), _ids(8, 64, seed=11)
    calib = _ids(8, 64, seed=5)
    with torch.no_grad():
        ref = model(ids)[0]
        int4 = quantize_model(model, QuantSpec(method="int4", group_size=128))[0](ids)[0]
        awq_model, desc = quantize_model(model, QuantSpec(method="awq", group_size=128), lambda m: m(calib))
        awq = awq_model(ids)[0]
    assert any(a > 0 for a in desc["awq_alpha"].values())
    assert _rel_err(awq, ref) < 0.8 * _rel_err(int4, ref), (_rel_err(awq, ref), _rel_err(int4, ref))


def test_embeddings_can_be_int8_too_and_the_tied_head_is_stored_once(tmp_path):
    model, ids = _gpt(), _ids()
    qmodel, desc = quantize_model(model, QuantSpec(method="int8", embeddings=True))
    assert desc["layers"]["lm_head"]["tied_to"] == "transformer.wte"
    assert qmodel.lm_head.qweight is qmodel.transformer.wte.qweight
    with torch.no_grad():
        assert _rel_err(qmodel(ids)[0], model(ids)[0]) < 0.03
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
        assert _rel_err(q.mlm_logits(q(ids)), enc.mlm_logits(enc(ids))) < 0.03


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
