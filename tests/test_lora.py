"""LoRA through peft on Helio's models, task heads and their Hugging Face / PEFT round trips."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

from models.encoder import Encoder, EncoderConfig
from models.finetune import TaskSpec, build_task_model, export_task_model
from models.gpt import GPT, GPTConfig
from models.llama import Llama, LlamaConfig
from models.hf import load_classifier, load_model, save_model
from models.lora import LoraSpec, add_lora, lora_parameters, merge_lora, read_adapter
from models.task_heads import SFT, Contrastive, SequenceClassifier, classification_metrics, retrieval_metrics

GPT_CFG = GPTConfig(vocab_size=101, block_size=24, n_layer=2, n_head=2, n_embd=16)
LLAMA_CFG = LlamaConfig(vocab_size=101, block_size=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                        intermediate_size=32, qkv_bias=True)  # a Qwen2: q/k/v biases
ENC_CFG = EncoderConfig(vocab_size=101, max_position=24, n_layer=2, n_head=2, n_embd=16, intermediate_size=40)
SPEC = LoraSpec(rank=4, alpha=8.0)


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _base_folder(tmp_path, arch: str):
    torch.manual_seed(0)
    model = _perturbed({"gpt": GPT, "llama": Llama, "encoder": Encoder}[arch](
        {"gpt": GPT_CFG, "llama": LLAMA_CFG, "encoder": ENC_CFG}[arch]))
    save_model(model, tmp_path / "base")
    return tmp_path / "base"


def test_lora_at_init_equals_the_base_and_freezes_it():
    torch.manual_seed(0)
    base = _perturbed(GPT(GPT_CFG))
    idx = torch.randint(0, 101, (2, 12))
    before = base(idx)[0]
    model = add_lora(base, SPEC, "gpt")
    assert torch.equal(model(idx)[0], before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(lora_parameters(model))


def test_only_adapter_parameters_change_in_training():
    torch.manual_seed(0)
    model = add_lora(_perturbed(GPT(GPT_CFG)), SPEC, "gpt").train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 101, (4, 13))
    for _ in range(3):
        opt.zero_grad()
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(lora_parameters(model))
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_merged_equals_unmerged():
    torch.manual_seed(0)
    model = _perturbed(add_lora(Encoder(ENC_CFG), SPEC, "encoder"), seed=3)  # B != 0: a real delta
    ids = torch.randint(5, 101, (3, 10))
    unmerged = model(ids)
    merged = merge_lora(model)
    assert not lora_parameters(merged)
    assert torch.allclose(merged(ids), unmerged, atol=1e-5)


def test_targets_that_match_nothing_are_refused():
    with pytest.raises(ValueError, match="match no nn.Linear"):
        add_lora(GPT(GPT_CFG), LoraSpec(targets=("nope",)), "gpt")


def test_sft_masks_prompts_and_padding_out_of_the_loss():
    ids = torch.arange(10, 18).repeat(2, 1)  # (2, 8)
    mask = torch.tensor([[0, 0, 0, 1, 1, 0, 1, 1],  # two replies: tokens 3-4 and 6-7
                         [0, 0, 0, 0, 0, 1, 1, 1]])  # one reply from token 5, padding from 6
    rows = {"input_ids": ids, "loss_mask": mask, "length": torch.tensor([8, 6])}
    _, targets = SFT(GPT(GPT_CFG)).batch(rows)
    # target j-1 predicts token j: kept where token j is a reply's and j < length
    assert targets[0].tolist() == [-100, -100, 13, 14, -100, 16, 17]
    assert targets[1].tolist() == [-100, -100, -100, -100, 15, -100, -100]


def test_contrastive_loss_of_perfect_pairs_is_low_and_ranked_first():
    torch.manual_seed(0)
    enc = Encoder(ENC_CFG).drop_mlm_head().eval()
    ids = torch.randint(5, 101, (6, 10))
    lens = torch.full((6,), 10)
    obj = Contrastive(enc, temperature=0.05)
    same = obj(ids, lens, ids, lens).item()
    shuffled = obj(ids, lens, ids.roll(1, 0), lens).item()
    assert same < shuffled
    q = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    m = retrieval_metrics(q, q)
    assert m["recall@1"] == 1.0 and m["mrr"] == 1.0
    assert retrieval_metrics(q, q.roll(1, 0))["recall@1"] == 0.0


def test_classification_metrics():
    m = classification_metrics(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2]), 3)
    assert m["accuracy"] == 0.75
    assert abs(m["macro_f1"] - (2 / 3 + 2 / 3 + 1) / 3) < 1e-9


@pytest.mark.parametrize("arch", ["gpt", "llama", "encoder"])
def test_classifier_export_round_trip_and_transformers_parity(tmp_path, arch):
    torch.manual_seed(0)
    spec = TaskSpec(kind="classify", labels=("a", "b", "c"))
    model, head = build_task_model(spec, _base_folder(tmp_path, arch))
    _perturbed(model, seed=5)
    export_task_model(spec, model, head, tmp_path / "out", model.state_dict(), pad_id=1)
    again, labels = load_classifier(tmp_path / "out" / "model")
    assert labels == ["a", "b", "c"]
    ids, lens = torch.randint(5, 101, (3, 12)), torch.tensor([12, 7, 3])
    ids = ids.masked_fill(torch.arange(12)[None] >= lens[:, None], 1)
    with torch.no_grad():
        ours = model.eval()(ids, lens)
        assert torch.allclose(again.eval()(ids, lens), ours, atol=1e-5)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model").eval()
        mask = (ids != 1).long()
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert hf.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind,arch", [("sft", "gpt"), ("sft", "llama"), ("embed", "encoder"), ("embed", "llama"),
                                       ("classify", "encoder"), ("classify", "llama")])
def test_peft_loads_the_adapter_onto_the_exported_base_with_the_same_outputs(tmp_path, kind, arch):
    torch.manual_seed(0)
    base_folder = _base_folder(tmp_path, arch)
    spec = TaskSpec(kind=kind, method="lora", lora=SPEC, labels=("x", "y"))
    model, head = build_task_model(spec, base_folder)
    _perturbed(model, seed=7)  # adapters (and head) away from init; the frozen base is perturbed too...
    fresh, _ = build_task_model(spec, base_folder)  # ...so export from a fresh base + the trainable tensors
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            if n in state:
                p.copy_(state[n])
    written = export_task_model(spec, fresh.eval(), head, tmp_path / "out", state, pad_id=1)
    assert "adapter/adapter_model.safetensors" in written
    lora_spec, trainable, tensors = read_adapter(tmp_path / "out" / "adapter")
    assert lora_spec.rank == 4 and all(t.numel() for t in tensors.values())
    ids = torch.randint(5, 101, (2, 10))
    ids[1, 7:] = ENC_CFG.pad_id
    lens, mask = torch.tensor([10, 7]), (torch.arange(10)[None] < torch.tensor([10, 7])[:, None]).long()
    auto = {"sft": transformers.AutoModelForCausalLM, "embed": transformers.AutoModel,
            "classify": transformers.AutoModelForSequenceClassification}[kind]
    if kind == "classify":  # the base for the adapter: the exported merged model minus the merge
        hf_base = auto.from_pretrained(base_folder, num_labels=2, pad_token_id=ENC_CFG.pad_id)  # a decoder's last real token
    else:
        hf_base = auto.from_pretrained(base_folder)
    hf = peft.PeftModel.from_pretrained(hf_base, tmp_path / "out" / "adapter").eval()
    merged = load_model(tmp_path / "out" / "model").eval()
    with torch.no_grad():
        if kind == "sft":
            ours, theirs, again = fresh(ids)[0], hf(input_ids=ids).logits, merged(ids)[0]
        elif kind == "embed":  # each model's pooling: an encoder's mean, a decoder's last real token
            ours, again = fresh.embed(ids, mask), merged.embed(ids, mask)
            h = hf(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, C)
            theirs = (h[torch.arange(2), lens - 1] if arch == "llama"
                      else (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        else:
            ours, again = fresh(ids, lens), merged(ids, lens)
            theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - again).abs().max().item() <= 1e-4  # merged == unmerged, through the files
    assert isinstance(merged, SequenceClassifier) == (kind == "classify")
