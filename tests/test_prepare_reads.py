"""How the prepare job cuts its input into read pieces: large line-record files are split, every line read once."""

from __future__ import annotations

import random

import pytest

from actors.prepare import read_piece, splittable
from jobs.prepare import plan_reads


def lines_file(tmp_path, rng: random.Random, n: int) -> tuple[str, list[bytes]]:
    """A file of `n` lines of random length (some empty, one far longer than a piece)."""
    lines = [f"line{i} ".encode() + b"x" * rng.choice([0, 1, 5, 40, 300]) + b"\n" for i in range(n)]
    lines[n // 2] = b"long " + b"y" * 5000 + b"\n"
    lines.insert(n // 3, b"\n")
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"".join(lines))
    return str(path), lines


@pytest.mark.parametrize("pieces", [1, 2, 7, 64, 900])
def test_pieces_give_every_line_to_exactly_one_reader(tmp_path, pieces):
    path, lines = lines_file(tmp_path, random.Random(pieces), 200)
    data = b"".join(lines)
    size = len(data)
    cuts = [size * i // pieces for i in range(pieces + 1)]
    got = [read_piece(path, a, b) for a, b in zip(cuts, cuts[1:])]
    assert b"".join(got) == data  # in order, no line lost or read twice
    for chunk in got:  # and each piece is whole lines
        assert chunk == b"" or chunk.endswith(b"\n")


def test_a_file_without_a_final_newline_keeps_its_last_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"a\nbb\nccc")
    # "bb" starts at 2 (in the first range), "ccc" at 5 (in the second)
    assert [read_piece(str(path), a, b) for a, b in ((0, 3), (3, 6), (6, 8))] == [b"a\nbb\n", b"ccc", b""]
    assert read_piece(str(tmp_path / "missing.txt"), 0, 10) is None


def test_large_line_files_are_split_into_even_pieces_and_the_rest_stay_whole(tmp_path):
    files = {"a.jsonl": 10_500, "b.txt": 900, "c.jsonl.gz": 10_500, "d.parquet": 7_000, "e.json": 7_000, "f.md": 0}
    groups = plan_reads(files, 1_000, splittable)
    pieces = [p for g in groups for p in g]
    by_file: dict[str, list[tuple[int, int]]] = {}
    for f, start, end in pieces:
        by_file.setdefault(f, []).append((start, end))
    assert len(by_file["a.jsonl"]) == 11  # ceil(10500 / 1000) even ranges
    assert {e - s for s, e in by_file["a.jsonl"]} <= {954, 955}
    for f, size in files.items():  # the ranges of a file tile it, in order
        ranges = by_file[f]
        assert ranges[0][0] == 0 and ranges[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for f in ("b.txt", "c.jsonl.gz", "d.parquet", "e.json", "f.md"):
        assert len(by_file[f]) == 1
    for g in groups:  # a block holds more than one piece only while it stays under the target
        assert len(g) == 1 or sum(e - s for _, s, e in g) <= 1_000
    assert plan_reads(files, 1_000, splittable) == groups  # from the input alone
