from __future__ import annotations

import random

import numpy as np
import pytest

from models.minhash import MinHashConfig, MinHasher, band_bucket_edges, duplicates_to_drop, jaccard_estimate

VOCAB = [f"w{i}" for i in range(5000)]


def doc(rng: random.Random, n: int = 400) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def mutate(words: list[str], rng: random.Random, every: int) -> list[str]:
    out = list(words)
    for i in range(rng.randrange(every), len(out), every):
        out[i] = f"new{rng.random()}"
    return out


def true_jaccard(h: MinHasher, a: str, b: str) -> float:
    sa, sb = set(h.shingles(a).tolist()), set(h.shingles(b).tolist())
    return len(sa & sb) / len(sa | sb)


def test_a_signature_slot_is_the_minimum_of_its_multiply_shift_hash():
    h = MinHasher(MinHashConfig(num_perm=16, bands=4))
    text = " ".join(doc(random.Random(3), 6000))  # more shingles than one chunk of the vectorised loop
    x = [int(v) for v in h.shingles(text)]
    assert len(x) > 4096
    want = [min(((int(a) * v + int(b)) % 2**64) >> 32 for v in x) for a, b in zip(h.a, h.b)]  # the definition
    assert h.signature(text).tolist() == want


def test_estimate_is_within_0_1_of_true_jaccard():
    h = MinHasher(MinHashConfig(num_perm=256, bands=32, shingle_size=3))
    rng = random.Random(0)
    for every in (2, 3, 5, 8, 13, 21, 34, 55, 89, 400):
        a = doc(rng)
        b = mutate(a, rng, every)
        ja, jb = " ".join(a), " ".join(b)
        assert abs(jaccard_estimate(h.signature(ja), h.signature(jb)) - true_jaccard(h, ja, jb)) < 0.1


def run_lsh(texts: list[str], cfg: MinHashConfig) -> tuple[list, list]:
    """Everything in one bucket: the same code path a single reduce partition runs."""
    h = MinHasher(cfg)
    sigs = np.stack([h.signature(t) for t in texts])
    hashes = np.array([t.encode() for t in texts], dtype=object)
    ids = np.arange(len(texts), dtype=np.int64)
    keys = np.concatenate([h.band_keys(s) for s in sigs])
    return band_bucket_edges(keys, np.repeat(ids, cfg.bands), np.repeat(hashes, cfg.bands),
                             np.repeat(sigs, cfg.bands, axis=0), cfg)


def test_lsh_finds_planted_near_duplicates_and_merges_none_below_half():
    cfg = MinHashConfig()  # 128 perms, 16 bands, threshold 0.8
    h = MinHasher(cfg)
    rng = random.Random(1)
    texts, planted, far = [], [], []
    for _ in range(100):  # pairs at Jaccard ~0.9
        a = doc(rng)
        b = mutate(a, rng, 100)
        texts += [" ".join(a), " ".join(b)]
        planted.append((len(texts) - 2, len(texts) - 1))
    for _ in range(50):  # pairs below Jaccard 0.5
        a = doc(rng)
        b = mutate(a, rng, 4)
        texts += [" ".join(a), " ".join(b)]
        far.append((len(texts) - 2, len(texts) - 1))
    planted_j = [true_jaccard(h, texts[i], texts[j]) for i, j in planted]
    assert min(planted_j) >= 0.85 and np.mean(planted_j) >= 0.88
    assert all(true_jaccard(h, texts[i], texts[j]) < 0.5 for i, j in far)
    exact, near = run_lsh(texts, cfg)
    assert not exact
    found = {tuple(sorted(e)) for e in near}
    recall = sum(p in found for p in planted) / len(planted)
    assert recall >= 0.95
    assert not found & set(far), "merged a pair below Jaccard 0.5"
    assert found <= set(planted), "merged unrelated documents"


def test_exact_copies_are_exact_edges():
    rng = random.Random(2)
    a = " ".join(doc(rng))
    exact, near = run_lsh([a, " ".join(doc(rng)), a, a], MinHashConfig())
    assert sorted(exact) == [(0, 2), (0, 3)]
    assert duplicates_to_drop(exact) == {2, 3}


def test_components_keep_exactly_one_per_cluster():
    edges = [(5, 9), (9, 2), (7, 8), (8, 7), (11, 11)]
    assert duplicates_to_drop(edges) == {5, 9, 8}


@pytest.mark.parametrize("bad", [{"num_perm": 100, "bands": 16}, {"threshold": 0.0}, {"shingle_size": 0}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        MinHashConfig(**bad)
