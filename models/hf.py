"""Hugging Face layout for Helio models: config.json + model.safetensors (+ tokenizer.json).

A GPT exports as GPT2LMHeadModel: the same parameter names, Conv1D weights
stored transposed (in_features, out_features), the tied lm_head omitted as
Hugging Face does. An Encoder exports as BertForMaskedLM: the same names, the
tied decoder weight and bias omitted as Hugging Face does. A Llama exports as
LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM (models/hf_llama.py).
`transformers` loads any of these folders and computes the same logits;
`load_model` / `save_model` pick the right pair from config.json's model_type /
the model's class.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.encoder import Encoder, EncoderConfig
from models.gpt import GPT, GPTConfig
from models.hf_llama import (FAMILIES, INDEX, is_headless, llama_config_from_hf, llama_hf_config, load_llama,
                             save_llama)
from models.llama import Llama
from models.task_heads import SequenceClassifier

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _read_config(folder: Path) -> dict:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"'{folder}' has no config.json: not a Hugging Face model folder")
    if not (folder / "model.safetensors").is_file() and not (folder / INDEX).is_file():
        raise FileNotFoundError(f"'{folder}' has neither model.safetensors nor {INDEX}: no weights")
    return json.loads((folder / "config.json").read_text())


def is_quantized(folder: str | Path) -> bool:
    return (Path(folder) / "quantization.json").is_file()


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
    cfg = gpt_config_from_hf(_read_config(folder), str(folder))
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


def bert_hf_config(cfg: EncoderConfig) -> dict:
    return {
        "model_type": "bert",
        "architectures": ["BertForMaskedLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",
        "max_position_embeddings": cfg.max_position,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "pad_token_id": cfg.pad_id,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def encoder_config_from_hf(hf: dict, source: str) -> EncoderConfig:
    if hf.get("model_type") != "bert":
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not a BERT checkpoint")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{source}: activation {hf['hidden_act']!r} is not BERT's exact GELU")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{source}: position_embedding_type {hf['position_embedding_type']!r} is not 'absolute'")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError(f"{source}: the MLM decoder is not tied to the word embeddings")
    pad = hf.get("pad_token_id")
    return EncoderConfig(vocab_size=hf["vocab_size"], max_position=hf["max_position_embeddings"],
                         type_vocab_size=hf.get("type_vocab_size", 2), n_layer=hf["num_hidden_layers"],
                         n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                         intermediate_size=hf.get("intermediate_size"),
                         dropout=float(hf.get("hidden_dropout_prob", 0.0)),
                         layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)), pad_id=0 if pad is None else pad)


_TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
         "cls.predictions.decoder.bias": "cls.predictions.bias"}
# heads and buffers Helio's Encoder does not have: the pooler, BertForPreTraining's next-sentence head
_IGNORED = ("bert.pooler.", "cls.seq_relationship.", "bert.embeddings.position_ids")


def encoder_to_hf_state_dict(model: Encoder) -> dict[str, torch.Tensor]:
    return {k: t.detach().float().cpu().contiguous() for k, t in model.state_dict().items() if k not in _TIED}


def save_encoder(model: Encoder, folder: str | Path) -> list[str]:
    """Writes config.json and model.safetensors into `folder`; returns the file names.

    With its MLM head (pretraining) as BertForMaskedLM; without it (an
    embedding model) as BertModel, the layout sentence-transformers reads.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config, state = bert_hf_config(model.cfg), encoder_to_hf_state_dict(model)
    if not hasattr(model, "cls"):
        config["architectures"] = ["BertModel"]
        state = {k.removeprefix("bert."): t for k, t in state.items()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return ["config.json", "model.safetensors"]


def load_encoder(folder: str | Path) -> Encoder:
    """An Encoder from a Hugging Face BERT folder: Helio's export, or BertForMaskedLM / BertModel as
    `transformers` saves them. Without an MLM head (BertModel, sentence-transformers) the head
    stays freshly initialised, its decoder tied to the loaded embeddings."""
    folder = Path(folder)
    cfg = encoder_config_from_hf(_read_config(folder), str(folder))
    state = load_file(str(folder / "model.safetensors"))
    if not any(k.startswith("bert.") for k in state):  # BertModel saves without the prefix
        state = {"bert." + k: v for k, v in state.items()}
    state = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
             for k, v in state.items() if not k.startswith(_IGNORED)}  # gamma/beta: original Google checkpoints
    has_head = any(k.startswith("cls.") for k in state)
    for tied, source in _TIED.items():
        if tied in state and source in state and not torch.equal(state[tied], state[source]):
            raise ValueError(f"{folder}: {tied} differs from {source}; Helio's Encoder ties them")
        if source in state:
            state.setdefault(tied, state[source])
    model = Encoder(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"{folder}: weights do not fit a BERT of this config: {str(e).splitlines()[-1].strip()}") from None
    if not has_head:
        missing = [k for k in missing if not k.startswith("cls.")]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match a BERT of this config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def _classifier_layout(backbone: GPT | Llama | Encoder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json without the labels, the backbone's tensors) as *ForSequenceClassification has them."""
    if isinstance(backbone, GPT):
        return gpt_hf_config(backbone.cfg) | {"architectures": ["GPT2ForSequenceClassification"]}, \
            gpt_to_hf_state_dict(backbone)
    if isinstance(backbone, Llama):  # no LM head: the score head reads the last real token
        config = llama_hf_config(backbone.cfg)
        config["architectures"] = [config["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
        return config, {k: t.detach().float().cpu().contiguous() for k, t in backbone.state_dict().items()
                        if k != "lm_head.weight"}
    return bert_hf_config(backbone.cfg) | {"architectures": ["BertForSequenceClassification"]}, \
        encoder_to_hf_state_dict(backbone)


def save_classifier(model: SequenceClassifier, folder: str | Path, labels: list[str], pad_id: int) -> list[str]:
    """As GPT2- / Llama- (Qwen2-, Mistral-) / BertForSequenceClassification, label names in config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config, state = _classifier_layout(model.backbone)
    config.update(num_labels=len(labels), id2label={str(i): n for i, n in enumerate(labels)},
                  label2id={n: i for i, n in enumerate(labels)}, pad_token_id=pad_id)
    head = {SequenceClassifier.hf_name(k): t.detach().float().cpu().contiguous()
            for k, t in model.state_dict().items() if not k.startswith("backbone.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state | head, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return ["config.json", "model.safetensors"]


def load_classifier(folder: str | Path) -> tuple[SequenceClassifier, list[str]]:
    """A SequenceClassifier and its label names from a *ForSequenceClassification folder."""
    folder = Path(folder)
    hf = _read_config(folder)
    labels = [hf["id2label"][str(i)] for i in range(len(hf["id2label"]))]
    state = load_file(str(folder / "model.safetensors"))
    if hf.get("model_type") == "gpt2":
        backbone: GPT | Llama | Encoder = GPT(gpt_config_from_hf(hf, str(folder)))
        head = {k: state.pop(k) for k in list(state) if k.startswith("score.")}
        state = {k: (v.t() if k.endswith(_CONV1D) else v) for k, v in state.items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        state["lm_head.weight"] = state["transformer.wte.weight"]
    elif hf.get("model_type") in FAMILIES:
        config = hf | {"architectures": [FAMILIES[hf["model_type"]]]}  # the backbone's own class
        backbone = Llama(llama_config_from_hf(config, str(folder / "config.json")))
        head = {k: state.pop(k) for k in list(state) if k.startswith("score.")}
    else:
        backbone = Encoder(encoder_config_from_hf(hf, str(folder)))
        head = {k.removeprefix("bert."): state.pop(k) for k in list(state)
                if k.startswith(("classifier.", "bert.pooler."))}
    model = SequenceClassifier(backbone, len(labels))
    missing, unexpected = model.load_state_dict({"backbone." + k: v for k, v in state.items()} | head, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.cls.") and k != "backbone.lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match a classifier of this config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model, labels


def save_model(model: GPT | Llama | Encoder, folder: str | Path) -> list[str]:
    """save_gpt, save_llama or save_encoder, by the model's class."""
    if isinstance(model, GPT):
        return save_gpt(model, folder)
    if isinstance(model, Llama):
        return save_llama(model, folder)
    if isinstance(model, Encoder):
        return save_encoder(model, folder)
    raise TypeError(f"cannot export a {type(model).__name__}: only GPT, Llama and Encoder have a Hugging Face layout")


def load_model(folder: str | Path) -> GPT | Encoder | SequenceClassifier:
    """load_gpt, load_encoder or (for a *ForSequenceClassification) load_classifier's model."""
    hf = _read_config(Path(folder))
    if is_quantized(folder):
        raise ValueError(f"{folder} holds a quantized model (integer weights): load it with "
                         f"models.quant.load_quantized, or use its float parent")
    if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
        return load_classifier(folder)[0]
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return load_gpt(folder)
    if model_type in FAMILIES:
        return load_llama(folder)
    if model_type == "bert":
        return load_encoder(folder)
    raise ValueError(f"{folder}: model_type {model_type!r} is not one of gpt2, {', '.join(FAMILIES)}, bert")


def empty_model(folder: str | Path) -> GPT | Encoder | SequenceClassifier:
    """The architecture config.json describes, freshly initialised, as `load_inference_model` would return
    it: the skeleton a quantized folder's integer weights are loaded into."""
    folder = Path(folder)
    hf, source = _read_config(folder), str(folder)
    archs = hf.get("architectures") or []
    if hf.get("model_type") == "gpt2":
        backbone: GPT | Llama | Encoder = GPT(gpt_config_from_hf(hf, source))
    elif hf.get("model_type") in FAMILIES:
        backbone = Llama(llama_config_from_hf(hf | {"architectures": [FAMILIES[hf["model_type"]]]}, source))
    elif hf.get("model_type") == "bert":
        backbone = Encoder(encoder_config_from_hf(hf, source))
    else:
        raise ValueError(f"{folder}: model_type {hf.get('model_type')!r} is not one of gpt2, {', '.join(FAMILIES)}, bert")
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return SequenceClassifier(backbone, len(hf["id2label"]))
    if archs == ["BertModel"]:
        return backbone.drop_mlm_head()
    return backbone.drop_lm_head() if is_headless(hf) else backbone


def load_inference_model(folder: str | Path) -> GPT | Encoder | SequenceClassifier:
    """load_model, minus what inference never runs: an embedding model (BertModel) has no MLM head."""
    model = load_model(folder)
    if (json.loads((Path(folder) / "config.json").read_text()).get("architectures") == ["BertModel"]
            and hasattr(model, "cls")):
        model.drop_mlm_head()
    return model.eval()
