"""Hugging Face layout for Helio models: config.json + model.safetensors (+ tokenizer.json).

A GPT exports as GPT2LMHeadModel: the same parameter names, Conv1D weights
stored transposed (in_features, out_features), the tied lm_head omitted as
Hugging Face does. `transformers` loads the folder and computes the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.gpt import GPT, GPTConfig

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt_hf_config(cfg: GPTConfig) -> dict:
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "torch_dtype": "float32",
    }


def gpt_config_from_hf(hf: dict, source: str) -> GPTConfig:
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not a GPT-2 checkpoint")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{source}: activation {hf['activation_function']!r} is not GPT-2's tanh GELU")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"{source}: n_inner {hf['n_inner']} differs from 4 * n_embd")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=float(hf.get("resid_pdrop", 0.0)),
                     layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))


def gpt_to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        t = t.detach().float().cpu()
        out[name] = (t.t() if name.endswith(_CONV1D) else t).contiguous()
    return out


def save_gpt(model: GPT, folder: str | Path) -> list[str]:
    """Writes config.json and model.safetensors into `folder`; returns the file names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(gpt_hf_config(model.cfg), indent=2))
    save_file(gpt_to_hf_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return ["config.json", "model.safetensors"]


def load_gpt(folder: str | Path) -> GPT:
    """A GPT from a Hugging Face GPT-2 folder (Helio's export or one `transformers` saved)."""
    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"'{folder}' has no {name}: not a Hugging Face model folder")
    cfg = gpt_config_from_hf(json.loads((folder / "config.json").read_text()), str(folder))
    state = load_file(str(folder / "model.safetensors"))
    prefix = "transformer."
    if not any(k.startswith(prefix) for k in state):  # GPT2Model (no LM head) saves without the prefix
        state = {prefix + k: v for k, v in state.items()}
    state = {k: (v.t() if k.endswith(_CONV1D) else v) for k, v in state.items()
             if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match a GPT-2 of this config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model
