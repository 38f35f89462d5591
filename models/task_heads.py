"""The finetuning tasks' heads, objectives and held-out metrics: what turns a pretrained model into
something useful, and how well it does it.

Each objective wraps a model as an nn.Module whose forward returns the loss
(as models/pretrain_objectives.py does for pretraining); `batch` turns a dict of
fixed-width columns (B, ...) into the forward's arguments. Rows are right-
padded; the `*len` columns say how many tokens are real.

- sft: instruction tuning of a causal LM (GPT or Llama); the loss covers response tokens only.
- classify: a sequence classification head on a GPT, a Llama or an Encoder, laid out
  as Hugging Face's *ForSequenceClassification.
- embed: contrastive sentence embeddings of an Encoder (mean pooling) or a Llama
  (the last token's final hidden state), a
  symmetric in-batch-negatives InfoNCE loss (van den Oord et al. 2018,
  https://arxiv.org/abs/1807.03748; as in CLIP and sentence-transformers'
  MultipleNegativesRankingLoss), negatives gathered from every worker.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.encoder import Encoder
from models.decoding import DecoderLM

TASK_KINDS = ("sft", "classify", "embed")  # the finetuning tasks (a TaskSpec's `kind`)
IGNORE = -100

Gather = Callable[[torch.Tensor], torch.Tensor]  # (m, D) per worker -> (W*m, D), own rows keeping their grad


def length_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """lengths (B,) -> (B, T) of 1 on the first `length` positions, 0 on padding."""
    return (torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]).long()


def trim(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """ids (B, L) -> (B, max length): padding no row needs is never computed (results do not change)."""
    return ids[:, :max(int(lengths.max()), 1)]


class SequenceClassifier(nn.Module):
    """A pretrained backbone and a fresh linear head over one pooled vector per sequence.

    GPT or Llama: the last real token's hidden state (it has seen the whole sequence),
    `score` without bias. Encoder: BERT's pooler, tanh(dense(first token)), then
    `classifier`. `hf_name` maps parameter names to Hugging Face's.
    """

    def __init__(self, backbone: DecoderLM | Encoder, num_labels: int, dropout: float = 0.0):
        super().__init__()
        self.backbone, self.num_labels = backbone, num_labels
        d = backbone.cfg.n_embd
        if isinstance(backbone, Encoder):
            backbone.drop_mlm_head()
            self.pooler = nn.ModuleDict(dict(dense=nn.Linear(d, d)))
            self.classifier = nn.Linear(d, num_labels)
        else:
            self.score = nn.Linear(d, num_labels, bias=False)
        self.dropout = nn.Dropout(dropout)
        for m in (self.pooler.dense, self.classifier) if isinstance(backbone, Encoder) else (self.score,):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def head(self) -> tuple[str, ...]:
        """The freshly initialised modules, trained even when LoRA freezes the backbone."""
        return ("pooler", "classifier") if isinstance(self.backbone, Encoder) else ("score",)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T), lengths (B,) -> logits (B, num_labels). With `segments` (B, T) (packed rows, each
        example attending to itself only): logits (N, num_labels), one per example, row by row and in
        order within a row."""
        encoder = isinstance(self.backbone, Encoder)
        if segments is not None:
            if encoder:  # each example's first token: its segment differs from the token before
                edge = segments != F.pad(segments, (1, 0), value=-1)[:, :-1]
            else:  # each example's last token: its segment differs from the token after
                edge = segments != F.pad(segments, (0, 1), value=-1)[:, 1:]
            rows, at = (edge & (segments > 0)).nonzero(as_tuple=True)  # (N,) each, row-major
            h = self.backbone(ids, segments=segments) if encoder else self.backbone.hidden(ids, segments=segments)[0]
            pooled = h[rows, at]  # (N, C)
        elif encoder:
            pooled = self.backbone(ids, length_mask(lengths, ids.size(1)))[:, 0]  # (B, C): the first token
        else:
            h, _ = self.backbone.hidden(ids)  # (B, T, C)
            pooled = h[torch.arange(ids.size(0), device=ids.device), lengths - 1]  # (B, C): the last real token
        if encoder:
            return self.classifier(self.dropout(torch.tanh(self.pooler.dense(pooled))))
        return self.score(self.dropout(pooled))

    @staticmethod
    def hf_name(name: str) -> str:
        name = name.removeprefix("backbone.")
        return "bert." + name if name.startswith("pooler.") else name


class SFT(nn.Module):
    """Next-token loss on the replies only: columns input_ids (B, L), loss_mask (B, L) (1 where a token
    is a reply's, to be learned), length (B,), and for packed rows segment (B, L) (which example each
    token is in: attention, positions and targets stay inside it; actors.finetune_data.pack_rows)."""

    def __init__(self, model: DecoderLM):
        super().__init__()
        self.model = model

    def batch(self, rows: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        ids = trim(rows["input_ids"], rows["length"])
        j = torch.arange(1, ids.size(1), device=ids.device)[None, :]  # (1, L-1): the position each target comes from
        keep = rows["loss_mask"][:, 1:ids.size(1)].bool() & (j < rows["length"][:, None])
        if "segment" not in rows:
            return ids[:, :-1], torch.where(keep, ids[:, 1:], IGNORE)  # (B, T), (B, T)
        seg = rows["segment"][:, :ids.size(1)]
        keep &= seg[:, 1:] == seg[:, :-1]  # never an example's first token as the previous one's next
        return ids[:, :-1], torch.where(keep, ids[:, 1:], IGNORE), seg[:, :-1]  # (B, T) x 3

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.loss(inputs, targets, ignore_index=IGNORE, segments=segments)


class Classify(nn.Module):
    """Cross-entropy of a SequenceClassifier: columns input_ids (B, T), length (B,), label (B,); for packed
    rows also segment (B, T), and label (B, K): the row's examples' labels in order, -1 after."""

    def __init__(self, model: SequenceClassifier):
        super().__init__()
        self.model = model

    def batch(self, rows: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        ids = trim(rows["input_ids"], rows["length"])
        if "segment" not in rows:
            return ids, rows["length"], rows["label"]
        labels = rows["label"]
        return ids, rows["length"], labels[labels >= 0], rows["segment"][:, :ids.size(1)]  # labels (N,), row-major

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(self.model(ids, lengths, segments).float(), labels)


def embed(model: Encoder | DecoderLM, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Unit-length sentence embeddings (B, C): the model's pooling (an Encoder's mean, a decoder's last
    token), then L2 normalisation (sentence-transformers)."""
    return F.normalize(model.embed(ids, length_mask(lengths, ids.size(1))).float(), dim=-1)


def embed_packed(model: Encoder | DecoderLM, ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Packed rows -> unit-length embeddings (B, K, C) of the examples in them, by segment: [r, k] is
    segment k + 1 of row r, pooled as `embed` pools one example alone (an Encoder's mean over the
    example's tokens, a decoder's last token); attention never leaves an example. A segment a row
    does not have gives a zero vector."""
    K = max(int(segments.max()), 1)
    one_hot = (segments[..., None] == torch.arange(1, K + 1, device=segments.device)).float()  # (B, T, K)
    if isinstance(model, Encoder):
        h = model(ids, segments=segments).float()  # (B, T, C)
        pooled = one_hot.transpose(1, 2) @ h / one_hot.sum(1)[..., None].clamp(min=1)  # (B, K, C): the means
    else:
        h = model.hidden(ids, segments=segments)[0].float()
        last = (one_hot * torch.arange(ids.size(1), device=ids.device)[None, :, None]).amax(1).long()  # (B, K)
        pooled = h.gather(1, last[..., None].expand(-1, -1, h.size(-1)))  # (B, K, C): each one's last token
        pooled = pooled * (one_hot.sum(1) > 0)[..., None]  # a segment the row does not have: zeros
    return F.normalize(pooled, dim=-1)


class Contrastive(nn.Module):
    """Symmetric InfoNCE over every worker's pairs: query->document and document->query.

    Columns query_ids/query_len, pos_ids/pos_len and optionally neg_ids/neg_len
    (a hard negative document per query). With W workers each rank computes the
    same global loss over the gathered (W*m) embeddings, its own rows carrying
    the gradient; data-parallel averaging divides by W, so the gradient is
    scaled by W to equal one process training on the whole global batch.

    Packed rows (actors.finetune_data.pack_pairs) hold several pairs each: query_ids
    and query_segment (B, Lq), pos_ids and pos_segment (B, L), neg_* likewise, and
    per-example lengths query_len, pos_len, neg_len (B, K), 0 after the row's pairs:
    pair k of a row is segment k + 1 of each of its three rows. The loss is the
    same InfoNCE over the same pairs; only the number a micro-batch holds varies.
    """

    def __init__(self, model: Encoder | DecoderLM, temperature: float, gather: Gather | None = None, world: int = 1):
        super().__init__()
        self.model, self.temperature = model, temperature
        self.gather, self.world = gather or (lambda x: x), world

    def batch(self, rows: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        parts = ["query", "pos"] + (["neg"] if "neg_ids" in rows else [])
        if "query_segment" in rows:  # packed: (ids, segments) per part, then the pairs' lengths
            width = {p: max(int((rows[f"{p}_segment"] > 0).sum(1).max()), 1) for p in parts}
            return (tuple(x for p in parts for x in (rows[f"{p}_ids"][:, :width[p]], rows[f"{p}_segment"][:, :width[p]]))
                    + tuple(rows[f"{p}_len"] for p in parts[1:]))  # pos_len marks the slots in use
        return tuple(x for p in parts for x in (trim(rows[f"{p}_ids"], rows[f"{p}_len"]), rows[f"{p}_len"]))

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if args[1].dim() == 2:  # query segments (B, Lq), not lengths (B,): packed rows
            return self._packed(*args)
        q_ids, q_len, p_ids, p_len, *neg = args
        q = self.gather(embed(self.model, q_ids, q_len))  # (N, C), N = W*m
        d = self.gather(embed(self.model, p_ids, p_len))  # (N, C)
        valid = None
        if neg:  # hard negatives: more candidates for the queries; a row without one has n_len 0
            n_ids, n_len = neg
            d = torch.cat([d, self.gather(embed(self.model, n_ids, n_len))])  # (N + N, C)
            valid = self.gather(n_len > 0)
        return self._scaled(info_nce(q, d, self.temperature, valid))

    def _packed(self, q_ids, q_seg, p_ids, p_seg, *rest) -> torch.Tensor:
        n_ids, n_seg, p_len, n_len = rest if len(rest) == 4 else (None, None, rest[0], None)
        pairs = p_len > 0  # (B, K): which slots hold a pair; [pairs] flattens them row by row, in order
        K = pairs.size(1)

        def pooled(ids, seg):  # (B, K', C) -> (B, K, C): a part whose rows hold fewer segments is padded
            e = embed_packed(self.model, ids, seg)
            return F.pad(e, (0, 0, 0, K - e.size(1)))

        q = self.gather(pooled(q_ids, q_seg)[pairs])  # (N, C), N pairs on all workers
        d = self.gather(pooled(p_ids, p_seg)[pairs])
        valid = None
        if n_ids is not None:
            d = torch.cat([d, self.gather(pooled(n_ids, n_seg)[pairs])])
            valid = self.gather(n_len[pairs] > 0)
        return self._scaled(info_nce(q, d, self.temperature, valid))

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss + (self.world - 1) * (loss - loss.detach())  # value: the loss; gradient: W times it


def info_nce(q: torch.Tensor, d: torch.Tensor, temperature: float,
             extra_valid: torch.Tensor | None = None) -> torch.Tensor:
    """q (N, C), d (N + extra, C) unit vectors, q[i] pairs with d[i]: the mean of both directions' CE.

    `extra_valid` (extra,): which of the extra candidates exist (the others are masked out).
    """
    n = q.size(0)
    target = torch.arange(n, device=q.device)
    logits = q @ d.t() / temperature  # (N, N + extra)
    if extra_valid is not None:
        keep = torch.cat([torch.ones(n, dtype=torch.bool, device=q.device), extra_valid.bool()])
        logits = logits.masked_fill(~keep[None, :], float("-inf"))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n].t(), target))


# ---- evaluation maths -------------------------------------------------------------------------------

def retrieval_metrics(q: torch.Tensor, d: torch.Tensor, ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """Query i's relevant document is d[i]; recall@k and mean reciprocal rank over cosine scores."""
    scores = q @ d.t()  # (N, N)
    rank = (scores > scores.diagonal()[:, None]).sum(dim=1) + 1  # (N,): 1 = the positive ranked first
    out = {f"recall@{k}": (rank <= k).float().mean().item() for k in ks}
    out["mrr"] = (1.0 / rank.float()).mean().item()
    return out


def classification_metrics(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1, classes present in gold or pred)."""
    f1s = []
    for c in range(num_labels):
        tp = ((pred == c) & (gold == c)).sum().item()
        fp = ((pred == c) & (gold != c)).sum().item()
        fn = ((pred != c) & (gold == c)).sum().item()
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": (pred == gold).float().mean().item(), "macro_f1": sum(f1s) / max(len(f1s), 1)}


@torch.no_grad()
def exact_match(model: DecoderLM, rows: dict[str, torch.Tensor], eos_id: int | None, max_new_tokens: int) -> float:
    """Fraction of prompts whose greedy continuation reproduces the reference response token for token
    (up to and including the end-of-text token when there is one)."""
    hits = 0
    n = len(rows["length"])
    for i in range(n):
        p, L = int(rows["prompt_len"][i]), int(rows["length"][i])
        prompt, reference = rows["input_ids"][i, :p], rows["input_ids"][i, p:L].tolist()
        budget = min(len(reference), max_new_tokens, model.cfg.block_size - p)
        out = model.generate(prompt[None], budget, temperature=0.0,
                             stop_tokens=[eos_id] if eos_id is not None else ())[0, p:].tolist()
        if eos_id is not None and eos_id in out:
            out = out[:out.index(eos_id) + 1]
        hits += out == reference
    return hits / max(n, 1)


@torch.no_grad()
def evaluate_task(kind: str, model: nn.Module, rows: dict[str, torch.Tensor], *, eos_id: int | None = None,
                  max_new_tokens: int = 128, batch_size: int = 64) -> dict[str, float]:
    """The task's held-out metrics: sft exact-match; classify accuracy / macro-F1; embed recall@k / MRR."""
    model.eval()
    n = len(next(iter(rows.values())))
    chunks = [{k: v[i:i + batch_size] for k, v in rows.items()} for i in range(0, n, batch_size)]
    if kind == "sft":  # response-token loss (weighted by response tokens) and exact-match generation
        sft, total, count = SFT(model), 0.0, 0
        for c in chunks:
            inputs, targets = sft.batch(c)
            k = int((targets != IGNORE).sum())
            total, count = total + sft(inputs, targets).item() * k, count + k
        return {"response_loss": total / max(count, 1), "exact_match": exact_match(model, rows, eos_id, max_new_tokens)}
    if kind == "classify":
        pred = torch.cat([model(trim(c["input_ids"], c["length"]), c["length"]).argmax(-1) for c in chunks])
        return classification_metrics(pred, rows["label"], model.num_labels)
    q = torch.cat([embed(model, trim(c["query_ids"], c["query_len"]), c["query_len"]) for c in chunks])
    d = torch.cat([embed(model, trim(c["pos_ids"], c["pos_len"]), c["pos_len"]) for c in chunks])
    return retrieval_metrics(q, d)
