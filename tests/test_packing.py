"""Packed finetuning rows: several examples per row, and not one of them sees another.

A packed row gives every token a segment id (models.decoding.packed): attention stays inside the
token's own example (causal within it), positions restart at 0 in each example, and the loss never
crosses from one example's last token to the next one's first."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.gpt import GPT, GPTConfig
from models.llama import Llama, LlamaConfig

MODELS = {
    "gpt": lambda: GPT(GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=2, n_embd=16)),
    # grouped-query attention and a sliding window shorter than the longest example
    "llama": lambda: Llama(LlamaConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                                       intermediate_size=32, sliding_window=6)),
}


def pack(examples: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples, in order, two to a row: ids (rows, width) and segments (0 after the examples)."""
    rows = [examples[i:i + 2] for i in range(0, len(examples), 2)]
    ids, seg = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row, start=1):
            ids[r, at:at + len(ex)], seg[r, at:at + len(ex)] = torch.tensor(ex), s
            at += len(ex)
    return ids, seg


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_packed_examples_get_the_logits_loss_and_gradients_they_get_alone(arch):
    torch.manual_seed(0)
    model = MODELS[arch]().eval()
    examples = [torch.randint(1, 61, (n,)).tolist() for n in (5, 9, 3, 7, 11, 4)]
    ids, seg = pack(examples, 24)

    def token_losses(logits: torch.Tensor, ex: list[int]) -> torch.Tensor:  # next-token losses inside ex
        return F.cross_entropy(logits[:-1], torch.tensor(ex[1:]), reduction="none")

    model.zero_grad()
    alone = [model(torch.tensor([ex]))[0][0] for ex in examples]
    torch.stack([token_losses(lg, ex).sum() for lg, ex in zip(alone, examples)]).sum().backward()
    grads_alone = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    logits, _ = model(ids, segments=seg)
    together, losses = [], []
    for r in range(ids.size(0)):
        at = 0
        for ex in examples[2 * r:2 * r + 2]:
            together.append(logits[r, at:at + len(ex)])
            losses.append(token_losses(together[-1], ex).sum())
            at += len(ex)
    torch.stack(losses).sum().backward()

    for a, b in zip(alone, together):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for name, p in model.named_parameters():  # fp32 sums in another order: 1e-5 of the largest gradient (or 1e-5)
        g = grads_alone[name]
        torch.testing.assert_close(p.grad, g, atol=1e-5 * max(1.0, g.abs().max().item()), rtol=0, msg=name)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_a_planted_example_before_another_does_not_reach_it(arch):
    """The planted tokens would change the second example's logits if attention crossed examples (the
    check can fail: with one segment for the whole row they do change it)."""
    torch.manual_seed(1)
    model = MODELS[arch]().eval()
    target = torch.randint(1, 61, (8,)).tolist()
    alone = model(torch.tensor([target]))[0][0]
    for planted in ([7] * 10, torch.randint(1, 61, (10,)).tolist()):
        ids, seg = pack([planted, target], 20)
        with torch.no_grad():
            packed = model(ids, segments=seg)[0][0, 10:18]
            leaked = model(ids, segments=(seg > 0).long())[0][0, 10:18]  # one segment: attention crosses
        torch.testing.assert_close(packed, alone.detach(), atol=1e-5, rtol=0)
        assert (leaked - alone).abs().max() > 1e-3


def test_packed_examples_in_an_encoder_get_the_hidden_states_and_gradients_they_get_alone():
    """Bidirectional: every token of an example sees all of it, and nothing of the others."""
    from models.encoder import Encoder, EncoderConfig

    torch.manual_seed(2)
    model = Encoder(EncoderConfig(vocab_size=61, max_position=24, n_layer=2, n_head=2, n_embd=16,
                                  intermediate_size=32)).eval()
    examples = [torch.randint(1, 61, (n,)).tolist() for n in (6, 10, 4, 9)]
    # a fixed random read-out per token: the final LayerNorm fixes the norm of what it outputs, so a sum
    # of squares would send back gradients that are rounding noise alone
    readout = [torch.randn(len(ex), 16) for ex in examples]
    ids, seg = pack(examples, 20)
    model.zero_grad()
    alone = [model(torch.tensor([ex]))[0] for ex in examples]
    torch.stack([(h * w).sum() for h, w in zip(alone, readout)]).sum().backward()
    # (a key bias adds the same amount to each of a query's scores, which softmax ignores: its gradient
    # is zero up to rounding, and left out)
    grads_alone = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
                   and not n.endswith("key.bias")}
    model.zero_grad()
    hidden = model(ids, segments=seg)
    together = [hidden[r, at:at + len(ex)] for r in range(2)
                for at, ex in zip((0, len(examples[2 * r])), examples[2 * r:2 * r + 2])]
    torch.stack([(h * w).sum() for h, w in zip(together, readout)]).sum().backward()
    for a, b in zip(alone, together):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for name, g in grads_alone.items():  # fp32 sums in another order: 1e-5 of the tensor's largest gradient
        got = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(got, g, atol=1e-5 * g.abs().max().item(), rtol=0, msg=name)
    assert min(g.abs().max().item() for g in grads_alone.values()) > 1e-4  # signal: a sum of squares gave 1e-10-1e-5


@pytest.mark.parametrize("arch", ["gpt", "llama", "encoder"])
def test_a_packed_classifier_gives_each_example_the_logits_and_loss_it_gets_alone(arch):
    from models.encoder import Encoder, EncoderConfig
    from models.task_heads import Classify, SequenceClassifier

    torch.manual_seed(3)
    backbone = (Encoder(EncoderConfig(vocab_size=61, max_position=24, n_layer=2, n_head=2, n_embd=16,
                                      intermediate_size=32)) if arch == "encoder" else MODELS[arch]())
    objective = Classify(SequenceClassifier(backbone, 3)).eval()
    examples = [torch.randint(1, 61, (n,)).tolist() for n in (6, 10, 4, 9, 7)]
    labels = [0, 2, 1, 1, 0]
    ids, seg = pack(examples, 20)
    packed_rows = {"input_ids": ids, "segment": seg, "length": (seg > 0).sum(1),
                   "label": torch.tensor([[0, 2], [1, 1], [0, -1]])}
    together = objective.model(*objective.batch(packed_rows)[:2], objective.batch(packed_rows)[3])
    alone = torch.cat([objective.model(torch.tensor([ex]), torch.tensor([len(ex)])) for ex in examples])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert objective.batch(packed_rows)[2].tolist() == labels
    loss_alone = F.cross_entropy(alone, torch.tensor(labels))
    torch.testing.assert_close(objective(*objective.batch(packed_rows)), loss_alone, atol=1e-5, rtol=0)


def _pairs(n_pairs: int, seed: int, negatives: bool):
    """Random contrastive pairs as one-per-row columns: query_ids (n, 12), pos_ids and neg_ids (n, 24), the
    texts shorter than their rows (as short pairs are: the case packing is for)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cols = {}
    for part, width, low, high in (("query", 12, 2, 5), ("pos", 24, 3, 10)) + ((("neg", 24, 0, 10),) if negatives
                                                                               else ()):
        lens = rng.integers(low, high + 1, n_pairs)
        if part == "neg":
            lens[::3] = 0  # every third pair has no hard negative
        ids = np.zeros((n_pairs, width), dtype=np.int32)
        for i, n in enumerate(lens):
            ids[i, :n] = rng.integers(1, 61, n)
        cols[f"{part}_ids"], cols[f"{part}_len"] = ids, lens.astype(np.int32)
    return cols


def test_pack_pairs_keeps_every_pair_together_and_whole():
    from actors.finetune_data import pack_pairs

    cols = _pairs(40, 0, negatives=True)
    packed = pack_pairs(cols, pad_id=0)
    rows = len(packed["pos_ids"])
    assert rows < 40 / 2  # at least two pairs a row on average
    seen = set()
    for r in range(rows):
        for k in range(packed["pos_len"].shape[1]):
            if packed["pos_len"][r, k] == 0:
                assert packed["query_len"][r, k] == 0 and packed["neg_len"][r, k] == 0
                continue
            texts = []
            for part in ("query", "pos", "neg"):
                toks = packed[f"{part}_ids"][r][packed[f"{part}_segment"][r] == k + 1]
                assert len(toks) == packed[f"{part}_len"][r, k]
                texts.append(tuple(toks))
            matches = [i for i in range(40) if all(tuple(cols[f"{p}_ids"][i, :cols[f"{p}_len"][i]]) == t
                                                   for p, t in zip(("query", "pos", "neg"), texts))]
            assert len(matches) == 1, (r, k)  # the three texts of a slot are one original pair's
            seen.add(matches[0])
    assert seen == set(range(40))  # every pair once
    for part in ("query", "pos", "neg"):  # segments are contiguous from the row's start: no gaps
        seg = packed[f"{part}_segment"]
        assert ((seg > 0).sum(1) == packed[f"{part}_len"].sum(1)).all()


@pytest.mark.parametrize("arch", ["encoder", "llama"])
def test_packed_contrastive_pairs_get_the_embeddings_loss_and_gradients_they_get_alone(arch):
    """Packed pairs (several per row) against the same pairs one per row: every embedding, the InfoNCE loss
    (with hard negatives, a third of them missing) and every gradient, within 1e-5 (gradients: of each
    tensor's largest). A planted change to one pair's texts leaves every other pair's embeddings alone."""
    from actors.finetune_data import pack_pairs
    from models.encoder import Encoder, EncoderConfig
    from models.task_heads import Contrastive, embed_packed

    torch.manual_seed(4)
    model = (Encoder(EncoderConfig(vocab_size=61, max_position=24, n_layer=2, n_head=2, n_embd=16,
                                   intermediate_size=32)) if arch == "encoder" else MODELS[arch]()).eval()
    objective = Contrastive(model, temperature=0.1)
    cols = _pairs(12, 1, negatives=True)
    one_each = {k: torch.from_numpy(v.astype("int64")) for k, v in cols.items()}
    packed_cols = pack_pairs(cols, pad_id=0)
    packed = {k: torch.from_numpy(v.astype("int64")) for k, v in packed_cols.items()}
    assert packed["pos_len"].shape[0] < 12  # the test is about rows that hold several pairs
    # the packed order of the pairs: slot by slot, row by row
    order = [next(i for i in range(12) if (cols["pos_len"][i] == n and (cols["pos_ids"][i, :n] ==
             packed_cols["pos_ids"][r][packed_cols["pos_segment"][r] == k + 1]).all()))
             for r in range(len(packed_cols["pos_len"])) for k, n in enumerate(packed_cols["pos_len"][r]) if n]

    def grads(rows):
        model.zero_grad()
        loss = objective(*objective.batch(rows))
        loss.backward()
        # a key bias adds the same amount to each of a query's scores, which softmax ignores: left out
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None and not n.endswith("key.bias")}

    alone = {k: v[order] for k, v in one_each.items()}  # the same pairs, one per row, in the packed order
    loss_alone, grads_alone = grads(alone)
    loss_packed, grads_packed = grads(packed)
    torch.testing.assert_close(loss_packed, loss_alone, atol=1e-5, rtol=0)
    for name, g in grads_alone.items():
        torch.testing.assert_close(grads_packed[name], g, atol=1e-5 * g.abs().max().item(), rtol=0, msg=name)
    assert min(g.abs().max().item() for g in grads_alone.values()) > 1e-5  # signal, not rounding noise
    with torch.no_grad():  # the planted pair: another's texts changed, this one's embeddings stay
        before = embed_packed(model, packed["pos_ids"], packed["pos_segment"])
        planted = packed["pos_ids"].clone()
        first = packed["pos_segment"][0] == 1
        planted[0, first] = (planted[0, first] + 7) % 60 + 1
        after = embed_packed(model, planted, packed["pos_segment"])
    assert (after[0, 0] - before[0, 0]).abs().max() > 1e-3  # the planted pair's own embedding moved
    mates = int((packed["pos_len"][0] > 0).sum())
    assert mates >= 2
    torch.testing.assert_close(after[0, 1:mates], before[0, 1:mates], atol=1e-6, rtol=0)  # its row-mates did not
