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
