"""Negatives gathered across workers: two gloo processes compute one process's gradient exactly, with a
pair per row and with packed rows, whose ranks hold different numbers of pairs."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.train_loop import gather_rows
from models.encoder import Encoder, EncoderConfig
from models.task_heads import Contrastive

CFG = EncoderConfig(vocab_size=60, max_position=16, n_layer=1, n_head=2, n_embd=16, intermediate_size=32)
N, T = 8, 10  # global batch of pairs, tokens per text


def _batch(short: bool = False) -> tuple[torch.Tensor, ...]:
    """Queries, positives and hard negatives, ids (N, T) and lengths (N,) each; `short`: texts of 1-4 tokens,
    which pack several to a row."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 60, (3, N, T), generator=g)
    lens = torch.randint(1, 5, (3, N), generator=g) if short else torch.randint(3, T + 1, (3, N), generator=g)
    lens[2, ::3] = 0  # some queries have no hard negative
    return ids[0], lens[0], ids[1], lens[1], ids[2], lens[2]


def _packed() -> tuple[dict[str, torch.Tensor], int]:
    """Short pairs packed (actors.finetune_data.pack_pairs), and the row where the second rank's share starts;
    the shares hold different numbers of pairs."""
    from actors.finetune_data import pack_pairs

    names = ("query_ids", "query_len", "pos_ids", "pos_len", "neg_ids", "neg_len")
    rows = pack_pairs({k: v.numpy() for k, v in zip(names, _batch(short=True))}, pad_id=0)
    order = (rows["pos_len"] > 0).sum(1).argsort(kind="stable")[::-1]  # the fuller rows to the first rank
    half = (len(order) + 1) // 2
    rows = {k: torch.from_numpy(v[order].astype("int64")) for k, v in rows.items()}
    counts = [(rows["pos_len"][:half] > 0).sum().item(), (rows["pos_len"][half:] > 0).sum().item()]
    assert half >= 1 and counts[0] != counts[1], counts  # the case the padded gather is for
    return rows, half


def _model() -> Encoder:
    torch.manual_seed(0)
    return Encoder(CFG).drop_mlm_head()


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _rank(rank: int, world: int, store: str, out, packed: bool) -> None:
    # a file rendezvous: a TCP port picked beforehand can be taken by another process before rank 0 binds it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = _model()
    objective = Contrastive(model, 0.05, gather=gather_rows, world=world)
    if packed:
        rows, half = _packed()
        local = objective.batch({k: v[:half] if rank == 0 else v[half:] for k, v in rows.items()})
    else:
        m = N // world
        local = [x[rank * m:(rank + 1) * m] for x in _batch()]
    loss = objective(*local)
    loss.backward()
    grads = _grads(model)
    dist.all_reduce(grads)  # what data-parallel averaging does
    if rank == 0:
        out.put((loss.item(), (grads / world).tolist()))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("packed", [False, True], ids=["a pair a row", "packed"])
def test_two_workers_with_gathered_negatives_match_one_process(tmp_path, packed):
    model = _model()
    objective = Contrastive(model, 0.05)
    loss = objective(*objective.batch(_packed()[0])) if packed else objective(*_batch())
    loss.backward()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, str(tmp_path / "rendezvous"), out, packed)) for r in range(2)]
    for p in procs:
        p.start()
    dp_loss, dp_grads = out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert abs(dp_loss - loss.item()) < 1e-5  # every rank computes the global loss
    assert torch.allclose(torch.tensor(dp_grads), _grads(model), atol=1e-6)
