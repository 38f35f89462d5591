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



# ---- on an object store: a real S3 API on loopback (tests/s3_server.py) -----------------------------

def test_an_artifact_on_s3_round_trips_a_multipart_object_verified(s3_server):
    """24 MiB goes up in several parts (Arrow's S3 stream uploads 10 MiB parts) and is read back
    sha256-verified; the manifest is written last, so a reader sees all of it or nothing."""
    from s3_server import S3Server

    store = Storage(S3Server.create_bucket("helio-storage") + "/multipart")
    big = os.urandom(24 << 20)
    make(store, files={"big.bin": big, "small.txt": b"ok"})
    art = store.open("dataset", "a")  # every file's size and sha256 checked against the manifest
    assert art.read_bytes("big.bin") == big and art.manifest["files"]["big.bin"]["bytes"] == 24 << 20


def test_an_artifact_cut_short_on_s3_is_invisible_and_the_previous_version_stays(s3_server):
    from s3_server import S3Server

    store = Storage(S3Server.create_bucket("helio-cut-short") + "/helio")
    make(store, files={"x.bin": b"v1"})
    with pytest.raises(RuntimeError, match="the server went away"):
        with store.create("dataset", "a", config={}) as art:
            art.write_bytes("x.bin", b"v2" * 1000)
            raise RuntimeError("the server went away mid-write")
    assert store.open("dataset", "a").read_bytes("x.bin") == b"v1"
    with pytest.raises(RuntimeError):
        with store.create("dataset", "b", config={}) as art:
            art.write_bytes("x.bin", b"half")
            raise RuntimeError("cut")
    assert not store.exists("dataset", "b")
    with pytest.raises(ArtifactError, match="no dataset artifact named 'b'"):
        store.open("dataset", "b")


def test_a_missing_bucket_is_one_sentence_naming_it(s3_server):
    """Every job checks its storage first (cluster/runtime.py connect_job); writing and reading say so too."""
    from s3_server import S3Server

    store = Storage("s3://helio-no-such-bucket/helio")
    said = "bucket 'helio-no-such-bucket' does not exist (create it first: Helio never creates buckets)"
    for attempt in (store.check_reachable, lambda: make(store), lambda: store.open("dataset", "a")):
        with pytest.raises(ArtifactError) as e:
            attempt()
        message = str(e.value)
        assert message.startswith("storage 's3://helio-no-such-bucket/helio': cannot ") and message.endswith(said)
        assert "\n" not in message and s3_server.env["AWS_SECRET_ACCESS_KEY"] not in message
    Storage(f"{S3Server.create_bucket('helio-there')}/x").check_reachable()
    Storage("/tmp/anywhere/at/all").check_reachable()  # a local folder is made when written


@pytest.mark.slow  # the S3 client retries a refused connection for about 12 s before it gives up
def test_a_server_that_stops_mid_write_and_refused_credentials_are_one_sentence_each(s3_server, monkeypatch):
    """Each against a server of its own (the environment points at it for this test): no endpoint and no
    secret in the sentence, and the job's error path (ArtifactError) rather than a raw OSError."""
    from s3_server import S3Server

    own = S3Server().start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", own.env["AWS_ENDPOINT_URL"])
        store = Storage(S3Server.create_bucket("helio-stops") + "/helio")
        with pytest.raises(ArtifactError) as e:
            with store.create("dataset", "a", config={}) as art:
                art.write_bytes("first.bin", b"x" * 1000)
                own.stop()  # the server goes away mid-write
                art.write_bytes("second.bin", b"y" * 1000)
        message = str(e.value)
        assert message.startswith("storage 's3://helio-stops/helio': cannot write 'second.bin' of dataset artifact 'a': ")
        assert "\n" not in message and own.env["AWS_ENDPOINT_URL"].split("://")[1] not in message, message
    finally:
        own.stop()
    checked = S3Server(authenticate=True).start()  # credentials checked: the test's keys are nobody's
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", checked.env["AWS_ENDPOINT_URL"])
        with pytest.raises(ArtifactError) as e:
            Storage("s3://helio-private/helio").check_reachable()
        message = str(e.value)
        assert message.startswith("storage 's3://helio-private/helio': cannot reach it: "), message
        assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in message and "\n" not in message
    finally:
        checked.stop()
