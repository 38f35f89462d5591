"""MinHash signatures and LSH banding for near-duplicate detection.

Broder, "On the resemblance and containment of documents" (1997); banding as in
Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3.4. A document
is a set of word k-shingles; each of `num_perm` multiply-shift hashes
h(x) = ((a*x + b) mod 2^64) >> 32 (Dietzfelbinger et al., 1997) keeps its
minimum over the set, and P[min_i(A) == min_i(B)] ~= Jaccard(A, B). Signatures are cut into `bands` bands
of `num_perm / bands` rows; documents sharing any band's hash are candidates.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import numpy as np

_SHIFT = np.uint64(32)
_MASK32 = np.uint64(0xFFFFFFFF)
_MIX = np.uint64(0x9E3779B1)  # odd multiplier that combines word hashes into a shingle hash
_CHUNK = 4096  # shingles per block, bounds memory at CHUNK * num_perm * 8 bytes


@dataclass(frozen=True)
class MinHashConfig:
    shingle_size: int = 5  # words per shingle
    num_perm: int = 128
    bands: int = 16
    threshold: float = 0.8  # Jaccard above which two documents are near-duplicates
    seed: int = 1
    max_bucket_pairs: int = 200  # buckets larger than this are compared to their first member only

    def __post_init__(self) -> None:
        if self.shingle_size < 1:
            raise ValueError("shingle_size: must be >= 1")
        if self.num_perm < 2 or self.bands < 1 or self.num_perm % self.bands:
            raise ValueError(f"bands: must divide num_perm ({self.num_perm})")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("threshold: must be in (0, 1]")

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands


class MinHasher:
    """Computes signatures for one MinHashConfig; cheap to build in each worker."""

    def __init__(self, cfg: MinHashConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        # Odd 64-bit multipliers, 64-bit offsets; arithmetic wraps mod 2^64 on purpose.
        self.a = rng.integers(0, 1 << 63, size=cfg.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, size=cfg.num_perm, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """Distinct 32-bit hashes of the word k-shingles of `text`, shape (S,)."""
        words = np.fromiter((zlib.crc32(w) for w in text.encode("utf-8").split()), dtype=np.uint64)
        k = min(self.cfg.shingle_size, len(words))
        if k == 0:
            return np.zeros(1, dtype=np.uint64)
        n = len(words) - k + 1
        h = np.zeros(n, dtype=np.uint64)
        for j in range(k):  # h = sum_j words[i + j] * MIX^(k-1-j)   (mod 2^64)
            h = h * _MIX + words[j : j + n]
        return np.unique(h & _MASK32)

    def signature(self, text: str) -> np.ndarray:
        """MinHash signature of one document, shape (num_perm,), uint32."""
        x = self.shingles(text)
        low = np.full(self.cfg.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(x), _CHUNK):
            hashed = x[start : start + _CHUNK, None] * self.a  # (S, P), wraps mod 2^64
            hashed += self.b
            np.minimum(low, hashed.min(axis=0), out=low)
        # h >> 32 never decreases as h grows, so the minimum of the shifted hashes is the shifted
        # minimum: one shift per permutation instead of one per shingle and permutation.
        return (low >> _SHIFT).astype(np.uint32)

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """One 63-bit key per band (band index mixed in), shape (bands,), int64."""
        rows = self.cfg.rows
        keys = np.empty(self.cfg.bands, dtype=np.int64)
        for i in range(self.cfg.bands):
            d = hashlib.blake2b(sig[i * rows : (i + 1) * rows].tobytes(), digest_size=8, person=i.to_bytes(2, "little"))
            keys[i] = int.from_bytes(d.digest(), "little") >> 1
        return keys


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of agreeing signature slots: an unbiased estimate of Jaccard."""
    return float(np.mean(a == b))


def candidate_edges(ids: np.ndarray, sigs: np.ndarray, cfg: MinHashConfig) -> list[tuple[int, int]]:
    """Verified near-duplicate pairs among the members of one LSH bucket.

    Candidates sharing a band are compared on their full signatures; only pairs
    whose estimated Jaccard reaches `cfg.threshold` become edges. Buckets larger
    than `max_bucket_pairs` compare every member with the smallest id only.
    """
    order = np.argsort(ids, kind="stable")
    ids, sigs = ids[order], sigs[order]
    edges = []
    n = len(ids)
    anchors = range(1) if n > cfg.max_bucket_pairs else range(n)
    for i in anchors:
        agree = (sigs[i + 1 :] == sigs[i]).mean(axis=1)
        for j in np.nonzero(agree >= cfg.threshold)[0]:
            edges.append((int(ids[i]), int(ids[i + 1 + j])))
    return edges


def band_bucket_edges(
    band_keys: np.ndarray, ids: np.ndarray, hashes: np.ndarray, sigs: np.ndarray, cfg: MinHashConfig
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(exact, near) duplicate pairs among rows (one per document and band) sharing a band key.

    Equal content hashes give exact pairs (each copy linked to the smallest id);
    distinct documents in a band whose signatures agree on >= threshold of
    their slots give near pairs. Exact copies share every band, so one grouping
    by band key finds both kinds.
    """
    order = np.argsort(band_keys, kind="stable")
    keys = band_keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    exact: list[tuple[int, int]] = []
    near: list[tuple[int, int]] = []
    for s, e in zip(starts, ends):
        if e - s < 2:
            continue
        first: dict[bytes, int] = {}
        for i in sorted(order[s:e], key=lambda m: ids[m]):
            h = bytes(hashes[i])
            if h in first:
                exact.append((int(ids[first[h]]), int(ids[i])))
            else:
                first[h] = i
        reps = np.fromiter(first.values(), dtype=np.int64)
        if len(reps) > 1:
            near.extend(candidate_edges(ids[reps], np.stack(sigs[reps]), cfg))
    return sorted(set(exact)), sorted(set(near) - set(exact))


def duplicates_to_drop(edges: list[tuple[int, int]] | np.ndarray) -> set[int]:
    """Ids to drop so exactly one document (the smallest id) of each connected component stays."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in edges:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            parent[hi] = lo
            parent.setdefault(lo, lo)
    return {x for x in parent if find(x) != x}
