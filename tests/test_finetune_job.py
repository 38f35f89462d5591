"""jobs.finetune on a real local Ray cluster: tiny bases, generated task data, real DeepSpeed ZeRO.

The bases are a 2-layer GPT, Llama and encoder with a BPE trained here on a
few stdlib modules, stored as model artifacts the way jobs.pretrain exports
them (and a tiny Llama checkpoint imported from a Hugging Face folder); each
run takes under a minute on 2 cores.
"""

from __future__ import annotations

import collections
import inspect
import json
import math
import posixpath
import random
import shutil
import tempfile
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from actors.chat import ChatFormat, tokenizer_files
from cluster.cli import UserError
from cluster.config import ConfigError, load_config
from cluster.storage import Storage
from jobs import finetune
from models.encoder import Encoder, EncoderConfig
from models.gpt import GPT, GPTConfig
from models.hf import load_model, save_model
from models.llama import Llama, LlamaConfig
from models.tokenizer import PAD, train_bpe

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # full tier: the pipeline test runs each component once in make test-fast

COMMON = ["train.log_every=2", "train.eval_batches=2", "optim.warmup_steps=2", "resources.num_workers=2",
          "resources.cpus_per_worker=0.5", "eval.max_examples=64", "dropout=0.0"]
WORDS = [f"w{i}" for i in range(200)]


def _records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(8)]
        label = rng.choice(["apple", "zebra", "mango"])
        text = list(words)
        text.insert(rng.randrange(len(text) + 1), label)  # the label's word, somewhere in the text
        rec = {"prompt": f"# echo {' '.join(words[:3])}\n", "response": f"print({words[0]!r})\n",
               "text": " ".join(text), "label": label,
               "query": " ".join(words[:4]), "positive": " ".join(words[:4] + words[4:][::-1])}
        if i % 3:  # two records in three carry a hard negative
            rec["negative"] = " ".join(words[4:] + words[:4][::-1])
        out.append(rec)
    return out


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finetune")
    docs = [inspect.getsource(m) for m in (collections, posixpath, textwrap, shutil)] + [" ".join(WORDS)] * 5
    tok = train_bpe(docs, vocab_size=500)
    store = Storage(str(root))
    torch.manual_seed(0)
    bases = {"gpt": GPT(GPTConfig(vocab_size=500, block_size=64, n_layer=2, n_head=2, n_embd=32)),
             "llama": Llama(LlamaConfig(vocab_size=500, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                        intermediate_size=64)),
             "enc": Encoder(EncoderConfig(vocab_size=500, max_position=64, n_layer=2, n_head=2, n_embd=32,
                                          intermediate_size=64, pad_id=tok.token_to_id(PAD)))}
    for name, model in bases.items():
        with tempfile.TemporaryDirectory() as d:
            save_model(model, d)
            with store.create("model", name, {"test": True}) as out:
                for f in ("config.json", "model.safetensors"):
                    out.write_bytes(f, Path(d, f).read_bytes())
                out.write_bytes("tokenizer.json", tok.to_str().encode())
    data = root / "data"
    data.mkdir()
    return {"root": str(root), "train": _write_jsonl(data / "train.jsonl", _records(384, 1)),
            "val": _write_jsonl(data / "val.jsonl", _records(64, 2)), "data": data}


def _run(storage: dict, *overrides: str) -> dict:
    sets = [f"storage={storage['root']}", f"data.train={storage['train']}", f"data.val={storage['val']}",
            "data.tasks=", "data.max_len=24", "data.max_query_len=12", *COMMON, *overrides]
    return finetune.run(load_config(finetune.FinetuneConfig, None, sets))


def test_classification_finetune_learns_an_easy_task_through_a_failure(storage, ray_cluster):
    manifest = _run(storage, "name=cls", "task=classify", "method=full", "base.artifact=gpt", "zero.stage=2",
                    "train.steps=40", "train.micro_batch=8", "train.eval_every=20", "train.checkpoint_every=10",
                    "optim.lr=0.003", "fault.at_step=15", "fault.rank=1")
    after = manifest["metrics"]["after"]
    # Far above a guesser: chance (1/3) plus 5 standard errors of a guesser's accuracy on the 64 held-out rows.
    chance = 1 / 3
    bound = chance + 5 * math.sqrt(chance * (1 - chance) / 64)  # 0.63
    assert after["accuracy"] > bound and after["macro_f1"] > bound, after
    assert manifest["finetune"]["labels"] == ["apple", "mango", "zebra"]
    assert manifest["finetune"] | {"task": "classify", "method": "full", "base": "gpt"} == manifest["finetune"]
    config = json.loads((Path(storage["root"]) / "models" / "cls" / "config.json").read_text())
    assert config["id2label"] == {"0": "apple", "1": "mango", "2": "zebra"}  # serving names its answers
    records = [json.loads(l) for l in (Path(storage["root"]) / "runs" / "cls" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == sorted({r["step"] for r in records})  # resumed, no step counted twice


def _adapter(storage: dict, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(storage["root"]) / "adapters" / name / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def llama_embedders(storage, ray_cluster) -> dict[int, dict]:
    """A Llama learning contrastive embeddings with LoRA, once under ZeRO-3 and once under ZeRO-0."""
    return {stage: _run(storage, f"name=llama-emb{stage}", "task=embed", "method=lora", "base.artifact=llama",
                        f"zero.stage={stage}", "train.steps=6", "train.micro_batch=8", "train.eval_every=3",
                        "train.checkpoint_every=3", "optim.lr=0.02", "lora.rank=8")
            for stage in (3, 0)}


def test_zero3_lora_adapters_are_complete_and_equal_zero0s(storage, llama_embedders):
    z3, z0 = _adapter(storage, "llama-emb3"), _adapter(storage, "llama-emb0")
    assert z3.keys() == z0.keys() and len(z3) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    # The same training: ZeRO-3's reduce-scatter and ZeRO-0's all-reduce sum in other orders (~1e-7 per
    # element), which Adam magnifies where a gradient is near zero (one element in thousands moved 1.3e-5,
    # measured): each tensor must agree to 1e-4 of its norm (a missing or misplaced shard differs by ~all of it).
    for k in z3:
        assert z3[k].numel() > 0 and z3[k].shape == z0[k].shape, k
        assert (z3[k] - z0[k]).norm() <= 1e-4 * z0[k].norm(), k
    assert any("lora_B" in k and z3[k].abs().max() > 0 for k in z3)  # B left zero: nothing was trained
    m = llama_embedders[3]
    assert m["finetune"]["task"] == "embed" and m["finetune"]["method"] == "lora"
    assert m["parents"][0]["name"] == "llama"


def test_a_llama_trains_contrastive_embeddings_with_lora_that_peft_pools_like_the_merged_model(storage,
                                                                                              llama_embedders):
    """The contrastive task on the Llama family: last-token embeddings, exported as LlamaModel."""
    before, after = llama_embedders[3]["metrics"]["before"], llama_embedders[3]["metrics"]["after"]
    assert set(before) == set(after) == {"recall@1", "recall@10", "mrr"}
    # The contrastive loss falls (a random base embeds every text alike: at temperature 0.05 its first loss
    # is several times the ~ln(27) of spread-out embeddings). Retrieval quality is the demo's claim, on MiniLM.
    records = [json.loads(line) for line in (Path(storage["root"]) / "runs" / "llama-emb3" / "metrics.jsonl").open()]
    assert records[-1]["loss"] < records[0]["loss"] / 2, [r["loss"] for r in records]
    root = Path(storage["root"])
    assert json.loads((root / "models" / "llama-emb3" / "config.json").read_text())["architectures"] == ["LlamaModel"]
    base = transformers.AutoModel.from_pretrained(root / "models" / "llama")  # LlamaModel from the causal LM
    hf = peft.PeftModel.from_pretrained(base, root / "adapters" / "llama-emb3").eval()
    merged = load_model(root / "models" / "llama-emb3").eval()
    ids = torch.randint(5, 500, (2, 12))
    mask = (torch.arange(12)[None] < torch.tensor([12, 8])[:, None]).long()
    with torch.no_grad():
        h = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (h[torch.arange(2), mask.sum(1) - 1] - merged.embed(ids, mask)).abs().max().item() <= 1e-4


def test_lora_sft_on_an_imported_llama_learns_replies_in_its_chat_template(storage, ray_cluster, tmp_path):
    from tiny_hf import save_family

    folder = tmp_path / "llama"
    save_family("llama", folder, texts=[" ".join(WORDS)] * 5 + [r["prompt"] + r["response"] for r in _records(50, 3)])
    # one record in two is a two-turn conversation (`messages`), the others prompt + response
    records = _records(384, 1)
    train = [r if i % 2 else {"messages": [{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": r["response"]},
                                           {"role": "user", "content": records[i + 1]["prompt"]},
                                           {"role": "assistant", "content": records[i + 1]["response"]}]}
             for i, r in enumerate(records)]
    manifest = _run(storage, "name=llama-sft", "task=sft", "method=lora", f"base.hf_folder={folder}",
                    "base.import_as=tiny-llama", "zero.stage=3", "train.steps=6", "train.micro_batch=4",
                    "train.eval_every=3", "train.checkpoint_every=6", "optim.lr=0.01", "eval.max_new_tokens=8",
                    "data.max_len=64", "data.pack=false",  # one record per row: the rows are read back below
                    f"data.train={_write_jsonl(tmp_path / 'train.jsonl', train)}")
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    assert after["response_loss"] < before["response_loss"]
    assert manifest["finetune"]["dropped"]["train"] == {} and manifest["finetune"]["records_read"]["train"] == 384
    root = Path(storage["root"])
    # what it learned from: the template's turns, the loss on each reply and its end-of-turn token only
    rows = pq.read_table(root / "runs" / "llama-sft" / "data" / "train.parquet").to_pylist()[:8]
    chat = ChatFormat(tokenizer_files(Storage(str(root)).open("model", "tiny-llama")))
    for i, row in enumerate(rows):
        ids, mask, p, n = row["input_ids"], row["loss_mask"], row["prompt_len"], row["length"]
        learned = [j for j in range(n) if mask[j]]
        replies = chat.tokenizer.decode([ids[j] for j in learned], skip_special_tokens=False)
        turns = [records[i]] if i % 2 else [records[i], records[i + 1]]
        assert replies.startswith("".join(t["response"].strip() + "<|eot_id|>" for t in turns)[:len(replies)])
        assert learned[-1] == n - 1 and len(learned) < n, replies  # the row ends with a reply; no prompt is learned
        assert ids[n - 1] == 2 or n == 65  # with its <|eot_id|>, unless cut at max_len
        head = chat.tokenizer.decode(ids[:p], skip_special_tokens=False)  # exact match continues the last reply
        assert head.startswith("<|begin_of_text|><|start|>user<|end|>\n\n# echo ") and \
            head.endswith("<|eot_id|><|start|>assistant<|end|>\n\n"), head
    # ZeRO-3 gathered every adapter; peft puts it on transformers' Llama with the merged model's logits
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "models" / "tiny-llama").eval()
    hf = peft.PeftModel.from_pretrained(base, root / "adapters" / "llama-sft").eval()
    merged = load_model(root / "models" / "llama-sft").eval()
    ids = torch.randint(6, 320, (2, 20))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - merged(ids)[0]).abs().max().item() <= 1e-4
    for rel in ("tokenizer_config.json", "tokenizer.json"):  # serving finds the chat template
        assert (root / "models" / "llama-sft" / rel).read_text() == (folder / rel).read_text()


def _prepare(storage: dict, tmp_path: Path, task: str, train: list[dict], val: list[dict], pack: bool = False):
    cfg = load_config(finetune.FinetuneConfig, None, [
        f"storage={storage['root']}", "data.tasks=", f"data.train={_write_jsonl(tmp_path / 't.jsonl', train)}",
        f"data.val={_write_jsonl(tmp_path / 'v.jsonl', val)}", f"task={task}", "base.artifact=gpt",
        f"data.pack={str(pack).lower()}"])
    store = Storage(storage["root"])
    run = tmp_path / ("run_packed" if pack else "run")
    return finetune.prepare_data(cfg, store, str(run), tokenizer_files(store.open("model", "gpt")))


def test_sft_rows_are_packed_with_every_example_once_and_less_padding(storage, tmp_path, ray_cluster):
    """data.pack (the default for sft): the training rows hold several examples each, side by side, each
    example's tokens and loss mask exactly as its own unpacked row had them; validation stays unpacked."""
    records = _records(60, 5)
    plain = _prepare(storage, tmp_path, "sft", records, records[:8])
    packed = _prepare(storage, tmp_path, "sft", records, records[:8], pack=True)
    rows = {k: pq.read_table(packed["uris"]["train"]).column(k).to_pylist() for k in
            ("input_ids", "loss_mask", "segment", "length")}
    singles = pq.read_table(plain["uris"]["train"]).to_pylist()
    examples = sorted((tuple(r["input_ids"][:r["length"]]), tuple(r["loss_mask"][:r["length"]])) for r in singles)
    found = []
    for ids, mask, seg, n in zip(rows["input_ids"], rows["loss_mask"], rows["segment"], rows["length"]):
        assert all(s > 0 for s in seg[:n]) and not any(seg[n:]) and seg[:n] == sorted(seg[:n])
        for s in set(seg[:n]):
            at = [j for j in range(n) if seg[j] == s]
            found.append((tuple(ids[at[0]:at[-1] + 1]), tuple(mask[at[0]:at[-1] + 1])))
    assert sorted(found) == examples  # every example once, whole
    assert packed["rows"]["train"] < len(singles) / 3 and packed["rows"]["val"] == 8
    p = packed["packing"]
    assert p["examples"] == 60 and p["padding_packed"] < p["padding_unpacked"] / 3, p
    # classification rows: each packed row carries its examples' labels in order (-1 in unused slots)
    plain = _prepare(storage, tmp_path, "classify", records, records[:8])
    packed = _prepare(storage, tmp_path, "classify", records, records[:8], pack=True)
    by_text = {tuple(r["input_ids"][:r["length"]]): r["label"] for r in pq.read_table(plain["uris"]["train"]).to_pylist()}
    seen = 0
    for row in pq.read_table(packed["uris"]["train"]).to_pylist():
        ids, seg, labels = row["input_ids"], row["segment"], row["label"]
        for s in range(1, max(seg) + 1):
            at = [j for j, x in enumerate(seg) if x == s]
            assert labels[s - 1] == by_text[tuple(ids[at[0]:at[-1] + 1])]
            seen += 1
        assert all(x == -1 for x in labels[max(seg):])
    assert seen == 60 and packed["labels"] == plain["labels"]


def test_bad_records_are_counted_or_refused(storage, tmp_path, ray_cluster):
    good = _records(10, 3)
    bad = [{"prompt": "# x\n"}, {"prompt": 3, "response": "y"}, {"prompt": "# x\n", "response": "  "}]
    data = _prepare(storage, tmp_path, "sft", good + bad, good)
    assert data["read"]["train"] == 13 and data["rows"]["train"] == 10
    assert data["drops"]["train"] == {"bad_type:prompt": 1, "empty:response": 1, "missing_field:response": 1}
    with pytest.raises(UserError, match="labels the train data never shows: \\['kiwi'\\]"):
        _prepare(storage, tmp_path, "classify", good, good + [{"text": "a b", "label": "kiwi"}])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no records"):
        _prepare(storage, tmp_path, "sft", [], good)
    pq.write_table(pa.table({"text": ["only text"]}), tmp_path / "t.parquet")  # Parquet, a field missing
    with pytest.raises(UserError, match="missing_field:label"):
        cfg = load_config(finetune.FinetuneConfig, None, [
            f"storage={storage['root']}", "data.tasks=", f"data.train={tmp_path / 't.parquet'}",
            f"data.val={tmp_path / 't.parquet'}", "task=classify"])
        store = Storage(storage["root"])
        finetune.prepare_data(cfg, store, str(tmp_path / "run3"), tokenizer_files(store.open("model", "gpt")))


def test_config_and_base_mistakes_are_one_sentence(storage, ray_cluster):
    with pytest.raises(ConfigError, match="'task': must be"):
        load_config(finetune.FinetuneConfig, None, ["task=translate"])
    with pytest.raises(ConfigError, match="exactly one of base.artifact and base.hf_folder"):
        load_config(finetune.FinetuneConfig, None, ["base.artifact=a", "base.hf_folder=/x"])
    with pytest.raises(ConfigError, match=r"needs a causal LM \(GPT or Llama\) base; model artifact 'enc' is of arch"):
        _run(storage, "name=bad", "task=sft", "base.artifact=enc")
    with pytest.raises(ConfigError, match="has no config.json"):
        _run(storage, "name=bad", "task=embed", "base.artifact=", f"base.hf_folder={storage['data']}")
