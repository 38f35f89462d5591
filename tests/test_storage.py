from __future__ import annotations

import json
import os

import pytest

from cluster.storage import ArtifactError, Storage


def make(store: Storage, name="a", files=None):
    with store.create("dataset", name, config={"k": 1}) as art:
        for rel, data in (files or {"x.bin": b"hello", "sub/y.txt": b"world"}).items():
            art.write_bytes(rel, data)
        art.metrics = {"n": 2}
    return store.artifact_path("dataset", name)


def test_roundtrip_and_verification(tmp_path):
    store = Storage(str(tmp_path))
    path = make(store)
    art = store.open("dataset", "a")
    assert art.read_bytes("sub/y.txt") == b"world"
    assert art.files() == ["sub/y.txt", "x.bin"]
    assert art.metrics == {"n": 2}
    manifest = json.loads(open(os.path.join(path, "helio.json")).read())
    assert manifest["kind"] == "dataset" and manifest["config"] == {"k": 1}
    assert not [p for p in os.listdir(tmp_path / "datasets") if p.startswith(".")], "temporary folders left behind"


def test_corrupted_file_is_refused(tmp_path):
    store = Storage(str(tmp_path))
    path = make(store)
    with open(os.path.join(path, "x.bin"), "wb") as f:
        f.write(b"HELLO")  # same size, other bytes
    with pytest.raises(ArtifactError, match="sha256"):
        store.open("dataset", "a")


def test_partial_artifacts_are_refused(tmp_path):
    store = Storage(str(tmp_path))
    path = make(store)
    os.remove(os.path.join(path, "x.bin"))
    with pytest.raises(ArtifactError, match="partial: file 'x.bin' is missing"):
        store.open("dataset", "a")
    os.remove(os.path.join(path, "helio.json"))
    with pytest.raises(ArtifactError, match="no helio.json"):
        store.open("dataset", "a")


def test_wrong_kind_and_missing(tmp_path):
    store = Storage(str(tmp_path))
    make(store)
    with pytest.raises(ArtifactError, match="no model artifact named 'a'"):
        store.open("model", "a")
    with pytest.raises(ArtifactError, match="no dataset artifact named 'b'"):
        store.open("dataset", "b")


def test_failed_write_keeps_the_previous_version(tmp_path):
    store = Storage(str(tmp_path))
    make(store, files={"x.bin": b"v1"})
    with pytest.raises(RuntimeError):
        with store.create("dataset", "a", config={}) as art:
            art.write_bytes("x.bin", b"v2")
            raise RuntimeError("crash mid-write")
    assert store.open("dataset", "a").read_bytes("x.bin") == b"v1"
    assert sorted(os.listdir(tmp_path / "datasets")) == ["a"]


def test_undeclared_files_block_the_commit(tmp_path):
    store = Storage(str(tmp_path))
    with pytest.raises(ArtifactError, match="not declared"):
        with store.create("dataset", "a", config={}) as art:
            with open(os.path.join(art.tmp_path, "stray.bin"), "wb") as f:
                f.write(b"?")
    assert not store.exists("dataset", "a")

