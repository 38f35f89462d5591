"""Hugging Face checkpoints of the Llama family in and out: LlamaForCausalLM, Qwen2ForCausalLM and
MistralForCausalLM folders (config.json + model.safetensors, or shards named by
model.safetensors.index.json) to a Helio Llama, and back; an embedding model (no LM head) as
LlamaModel, Qwen2Model or MistralModel.

The parameter names are Hugging Face's, so loading is a check that every tensor is there and fits;
what Helio cannot honour in a config (an unknown rope scaling, biases it has no place for, sliding
windows on some layers only) is refused with the field's name, never ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.llama import ROPE_SCALING_TYPES, Llama, LlamaConfig, RopeScaling

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
# the same families without the LM head (LlamaModel, ...): how an embedding model finetuned from one is saved
HEADLESS = {t: c.replace("ForCausalLM", "Model") for t, c in FAMILIES.items()}
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder Helio cannot load as it is: the message names the file or field."""


def _refuse(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: {what}")


def _rope(hf: dict, source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either layout: `rope_theta` + `rope_scaling` (transformers 4), or
    `rope_parameters` (transformers 5)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    spec = scaling or params
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_TYPES:
        field = "rope_scaling" if scaling else "rope_parameters"
        raise _refuse(source, f"{field} type {kind!r} is not supported (Helio honours default, "
                              f"{', '.join(ROPE_SCALING_TYPES)})")
    if float(spec.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise _refuse(source, "partial_rotary_factor other than 1 is not supported")
    if kind == "linear":
        return theta, RopeScaling("linear", float(spec["factor"]))
    return theta, RopeScaling("llama3", float(spec["factor"]), float(spec["low_freq_factor"]),
                              float(spec["high_freq_factor"]),
                              int(spec.get("original_max_position_embeddings", hf["max_position_embeddings"])))


def _sliding_window(hf: dict, model_type: str, source: str) -> int | None:
    window = hf.get("sliding_window")
    if model_type == "llama" or window is None:
        return None
    if model_type == "qwen2":
        if not hf.get("use_sliding_window", False):
            return None
        layer_types = hf.get("layer_types")
        if layer_types is None:
            first_sliding = hf.get("max_window_layers", hf["num_hidden_layers"])
            layer_types = ["sliding_attention" if i >= first_sliding else "full_attention"
                           for i in range(hf["num_hidden_layers"])]
        if len(set(layer_types)) > 1:
            raise _refuse(source, "sliding_window on some layers only (max_window_layers / layer_types) is not "
                                  "supported: Helio windows every layer or none")
        if layer_types[0] == "full_attention":
            return None
    return int(window)


def llama_config_from_hf(hf: dict, source: str) -> LlamaConfig:
    """A LlamaConfig from a Llama, Qwen2 or Mistral config.json; refuses what it cannot honour."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise _refuse(source, f"model_type {model_type!r} is not one of {', '.join(FAMILIES)}")
    archs = hf.get("architectures") or [FAMILIES[model_type]]
    if archs not in ([FAMILIES[model_type]], [HEADLESS[model_type]]):
        raise _refuse(source, f"architectures {archs} is not [{FAMILIES[model_type]!r}] or [{HEADLESS[model_type]!r}]")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(source, f"hidden_act {hf['hidden_act']!r} is not SwiGLU's 'silu'")
    if hf.get("mlp_bias", False):
        raise _refuse(source, "mlp_bias true is not supported (Llama's MLP has no biases)")
    if model_type == "llama" and hf.get("attention_bias", False):
        raise _refuse(source, "attention_bias true is not supported (an o_proj bias has no place in Helio's Llama)")
    theta, scaling = _rope(hf, source)
    try:
        return LlamaConfig(
            vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"], head_dim=hf.get("head_dim") or 0,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            qkv_bias=model_type == "qwen2", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=_sliding_window(hf, model_type, source),
            dropout=float(hf.get("attention_dropout", 0.0)))
    except KeyError as e:
        raise _refuse(source, f"config.json has no {e.args[0]!r}") from None
    except ValueError as e:
        raise _refuse(source, str(e)) from None


def llama_hf_config(cfg: LlamaConfig) -> dict:
    """config.json for `cfg`, as the family whose Hugging Face class computes what it does: Qwen2 for
    q/k/v biases, Mistral for a sliding window, else Llama."""
    model_type = "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama"
    out = {
        "model_type": model_type,
        "architectures": [FAMILIES[model_type]],
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.block_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.dropout,
        "torch_dtype": "float32",
    }
    s = cfg.rope_scaling
    if s is not None:
        out["rope_scaling"] = ({"rope_type": "linear", "factor": s.factor} if s.type == "linear" else
                               {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                "high_freq_factor": s.high_freq_factor,
                                "original_max_position_embeddings": s.original_max_position})
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif model_type == "qwen2":
        out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                   max_window_layers=0)
    else:
        out["sliding_window"] = cfg.sliding_window
    return out


def is_headless(hf: dict) -> bool:
    """A config.json of the family's base model class (LlamaModel, ...): hidden states, no LM head."""
    return (hf.get("architectures") or [None]) == [HEADLESS.get(hf.get("model_type"))]


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json names (each
    checked to hold the tensors the index says it does), as fp32."""
    index = folder / INDEX
    if not index.is_file():
        single = folder / "model.safetensors"
        if not single.is_file():
            raise _refuse(str(folder), f"has neither model.safetensors nor {INDEX}")
        wanted = {None: None}
        files = {None: single}
    else:
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise _refuse(str(index), "is not a safetensors index (no weight_map)") from None
        wanted = {}
        for name, shard in weight_map.items():
            wanted.setdefault(shard, set()).add(name)
        files = {shard: folder / shard for shard in wanted}
        for shard, path in files.items():
            if not path.is_file():
                raise _refuse(str(index), f"names shard {shard}, which is missing")
    out: dict[str, torch.Tensor] = {}
    for shard, path in files.items():
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if wanted[shard] is not None and (lost := sorted(wanted[shard] - names)):
                raise _refuse(str(path), f"lacks {lost[0]}, which {INDEX} places in it"
                                         + (f" ({len(lost) - 1} more)" if len(lost) > 1 else ""))
            for name in names if wanted[shard] is None else wanted[shard]:
                out[name] = f.get_tensor(name).float()
    return out


def load_llama(folder: str | Path) -> Llama:
    """A Llama from a Hugging Face Llama, Qwen2 or Mistral folder (single or sharded safetensors)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise _refuse(str(folder), "has no config.json: not a Hugging Face model folder")
    hf = json.loads((folder / "config.json").read_text())
    cfg = llama_config_from_hf(hf, str(folder / "config.json"))
    state = {k: v for k, v in read_weights(folder).items() if not k.endswith("rotary_emb.inv_freq")}
    if is_headless(hf):  # LlamaModel's names are those inside LlamaForCausalLM's `model.`
        state = {"model." + k: v for k, v in state.items()}
    if cfg.tie_embeddings:
        head = state.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, state.get("model.embed_tokens.weight", head)):
            raise _refuse(str(folder), "tie_word_embeddings is true but lm_head.weight differs from the embeddings")
    model = Llama(cfg).drop_lm_head() if is_headless(hf) else Llama(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise _refuse(str(folder), f"weights do not match this config: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise _refuse(str(folder), f"{name} has shape {tuple(state[name].shape)}, the config needs {tuple(shape)}")
    model.load_state_dict(state, strict=not cfg.tie_embeddings)
    return model


def save_llama(model: Llama, folder: str | Path, max_shard_bytes: int | None = None) -> list[str]:
    """Writes config.json and the weights (sharded with an index past `max_shard_bytes`); returns the
    file names. A tied head is stored once, as Hugging Face does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = llama_hf_config(model.cfg)
    state = {k: t.detach().float().cpu().contiguous() for k, t in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    if not model.has_lm_head:  # an embedding model: the family's base model class
        config["architectures"] = [HEADLESS[config["model_type"]]]
        state = {k.removeprefix("model."): t for k, t in state.items()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["config.json", "model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in state.values())
    weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return ["config.json", INDEX, *names]
