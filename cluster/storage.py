"""Artifact storage: one root (local folder, s3:// or gs://) through pyarrow.fs.

An artifact is a folder `{root}/{kind}s/{name}/` holding its files and a
`helio.json` manifest (kind, created-at, config, parent, sha256 and size of
every file, metrics). Writes go to a hidden temporary folder next to the final
one; the manifest is written last and the folder is then moved into place, so
a reader never sees a half-written artifact: a folder without a manifest, a
missing file or a checksum mismatch is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.fs as pafs

MANIFEST = "helio.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact is missing, partial, corrupted or of the wrong kind."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A (filesystem, path) pair for a local path or an s3:// / gs:// URI."""
    if "://" not in uri:
        import os

        return pafs.LocalFileSystem(), os.path.abspath(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def sha256_file(fs: pafs.FileSystem, path: str) -> tuple[str, int]:
    """The sha256 hex digest and size of one file, streamed."""
    digest, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def write_file_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary name, then renames."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


@dataclass
class Artifact:
    """A verified, complete artifact opened for reading."""

    kind: str
    name: str
    uri: str
    manifest: dict[str, Any]
    fs: pafs.FileSystem = field(repr=False)
    path: str = field(repr=False)

    def file_uri(self, rel: str) -> str:
        return _join_uri(self.uri, rel)

    def files(self, prefix: str = "") -> list[str]:
        """Relative names of the artifact's files under `prefix`, sorted."""
        return sorted(f for f in self.manifest["files"] if f.startswith(prefix))

    def read_bytes(self, rel: str) -> bytes:
        """One file's bytes, checked against the manifest's sha256."""
        entry = self.manifest["files"].get(rel)
        if entry is None:
            raise ArtifactError(f"{self.kind} artifact '{self.uri}' has no file '{rel}'")
        with self.fs.open_input_stream(posixpath.join(self.path, rel)) as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ArtifactError(f"file '{rel}' of artifact '{self.uri}' is corrupted (sha256 mismatch)")
        return data

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})


@contextlib.contextmanager
def reaching(root: str, action: str) -> Iterator[None]:
    """Turns the filesystem's OSError (a missing bucket, refused credentials, an unreachable endpoint)
    into one ArtifactError sentence naming the storage and what was being done, with the endpoint taken
    out: it comes from the environment (AWS_ENDPOINT_URL) and is never written into an error."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if m := re.match(r"Bucket '([^']+)' not found", text):
            text = f"bucket '{m.group(1)}' does not exist (create it first: Helio never creates buckets)"
        if endpoint := os.environ.get("AWS_ENDPOINT_URL"):
            text = text.replace(endpoint, "<endpoint>").replace(endpoint.split("://")[-1], "<endpoint>")
        raise ArtifactError(f"storage '{root}': cannot {action}: {text}") from None


class ArtifactWriter:
    """Builds an artifact in a temporary folder; `commit` makes it visible.

    Use as a context manager: leaving the block with an exception deletes the
    temporary folder and leaves any previous artifact of that name untouched.
    Files written by other processes (Ray workers writing shards under
    `tmp_uri`) are declared with `add_files` along with their sha256.
    """

    def __init__(self, store: "Storage", kind: str, name: str, config: dict[str, Any], parent: list[dict] | None):
        self.store, self.kind, self.name = store, kind, name
        self.config, self.parents = config, parent or []
        self.final_path = store.artifact_path(kind, name)
        self.tmp_path = posixpath.join(posixpath.dirname(self.final_path), f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp_uri = store.to_uri(self.tmp_path)
        self.files: dict[str, dict[str, Any]] = {}
        self.metrics: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        with reaching(store.root, f"write {kind} artifact '{name}'"):
            store.fs.create_dir(self.tmp_path, recursive=True)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = posixpath.join(self.tmp_path, rel)
        with reaching(self.store.root, f"write '{rel}' of {self.kind} artifact '{self.name}'"):
            self.store.fs.create_dir(posixpath.dirname(path), recursive=True)
            with self.store.fs.open_output_stream(path) as f:
                f.write(data)
        self.files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def add_files(self, entries: dict[str, dict[str, Any]]) -> None:
        """Declares files that someone else wrote under `tmp_uri`: {rel: {sha256, bytes}}."""
        self.files.update(entries)

    def commit(self) -> Artifact:
        with reaching(self.store.root, f"commit {self.kind} artifact '{self.name}'"):
            return self._commit()

    def _commit(self) -> Artifact:
        fs = self.store.fs
        on_disk = {
            posixpath.relpath(info.path, self.tmp_path): info.size
            for info in fs.get_file_info(pafs.FileSelector(self.tmp_path, recursive=True))
            if info.type == pafs.FileType.File
        }
        undeclared = sorted(set(on_disk) - set(self.files))
        missing = sorted(set(self.files) - set(on_disk))
        if undeclared or missing:
            self.abort()
            raise ArtifactError(
                f"artifact '{self.name}' was not committed: files written but not declared {undeclared[:3]}, "
                f"declared but missing {missing[:3]}"
            )
        for rel, size in on_disk.items():
            if size != self.files[rel]["bytes"]:
                self.abort()
                raise ArtifactError(f"artifact '{self.name}' was not committed: '{rel}' has {size} bytes, declared {self.files[rel]['bytes']}")
        manifest = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "name": self.name,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": self.config,
            "parents": self.parents,
            "files": dict(sorted(self.files.items())),
            "metrics": self.metrics,
            **self.extra,
        }
        data = json.dumps(manifest, indent=2).encode()
        exists = fs.get_file_info(self.final_path).type != pafs.FileType.NotFound
        if isinstance(fs, pafs.LocalFileSystem):
            # A folder rename: readers see the old artifact or the new one, never a mix.
            write_file_atomic(fs, posixpath.join(self.tmp_path, MANIFEST), data)
            old = f"{self.tmp_path}.old"
            if exists:
                fs.move(self.final_path, old)
            fs.move(self.tmp_path, self.final_path)
            if exists:
                fs.delete_dir(old)
        else:
            # Object stores cannot rename folders: copy the files, the manifest last,
            # so a reader that finds the manifest finds every file it names.
            if exists:
                fs.delete_dir(self.final_path)
            for rel in self.files:
                fs.create_dir(posixpath.dirname(posixpath.join(self.final_path, rel)), recursive=True)
                fs.copy_file(posixpath.join(self.tmp_path, rel), posixpath.join(self.final_path, rel))
            with fs.open_output_stream(posixpath.join(self.final_path, MANIFEST)) as f:
                f.write(data)
            fs.delete_dir(self.tmp_path)
        return self.store.open(self.kind, self.name, verify=False)

    def abort(self) -> None:
        try:
            self.store.fs.delete_dir(self.tmp_path)
        except (FileNotFoundError, OSError):
            pass


class Storage:
    """The artifact root. `create` writes an artifact, `open` reads and verifies one."""

    def __init__(self, root: str):
        self.root = root
        self.fs, self.root_path = resolve(root)
        self._scheme = root.split("://", 1)[0] + "://" if "://" in root else ""

    def to_uri(self, path: str) -> str:
        return f"{self._scheme}{path}" if self._scheme else path

    def artifact_path(self, kind: str, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ArtifactError(f"artifact name '{name}' is not valid (no '/', not starting with '.')")
        return posixpath.join(self.root_path, f"{kind}s", name)

    def create(self, kind: str, name: str, config: dict[str, Any], parents: list[dict] | None = None) -> ArtifactWriter:
        return ArtifactWriter(self, kind, name, config, parents)

    def write_json(self, rel: str, data: Any) -> None:
        """A small mutable file under the root (a monitor's state, a deployment's references), not an
        artifact: replaced atomically, so a reader sees the old or the new version, never half."""
        write_file_atomic(self.fs, posixpath.join(self.root_path, rel), json.dumps(data, indent=1).encode())

    def read_json(self, rel: str) -> Any | None:
        """What `write_json` wrote at `rel`, or None when there is nothing there."""
        path = posixpath.join(self.root_path, rel)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            raw = f.read()
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"'{self.to_uri(path)}' is not valid JSON ({e})") from None

    def check_reachable(self) -> None:
        """Raises ArtifactError (one sentence) unless the storage can be reached: on an object store, its
        bucket exists and the credentials may read it. Before a job does any work."""
        if "://" not in self.root or self.root.startswith("file://"):
            return
        bucket = self.root_path.split("/")[0]
        with reaching(self.root, "reach it"):
            if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise OSError(f"Bucket '{bucket}' not found")

    def exists(self, kind: str, name: str) -> bool:
        path = posixpath.join(self.artifact_path(kind, name), MANIFEST)
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def open(self, kind: str, name: str, verify: bool = True) -> Artifact:
        """Opens a complete artifact of `kind`; `verify` checks every file's sha256."""
        path = self.artifact_path(kind, name)
        uri = self.to_uri(path)
        with reaching(self.root, f"read {kind} artifact '{name}'"):
            found = self.fs.get_file_info(path).type != pafs.FileType.NotFound
        if not found:
            self.check_reachable()  # a missing bucket says so, rather than that the artifact is missing
            raise ArtifactError(f"no {kind} artifact named '{name}' under storage '{self.root}' (looked in {uri})")
        try:
            with self.fs.open_input_stream(posixpath.join(path, MANIFEST)) as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            raise ArtifactError(f"artifact '{uri}' is partial: it has no {MANIFEST} manifest") from None
        except json.JSONDecodeError:
            raise ArtifactError(f"artifact '{uri}' has a corrupted {MANIFEST}") from None
        if manifest.get("kind") != kind:
            raise ArtifactError(f"artifact '{uri}' is a {manifest.get('kind')!r} artifact, expected a {kind!r} one")
        for rel, entry in manifest["files"].items():
            file_path = posixpath.join(path, rel)
            info = self.fs.get_file_info(file_path)
            if info.type != pafs.FileType.File:
                raise ArtifactError(f"artifact '{uri}' is partial: file '{rel}' is missing")
            if info.size != entry["bytes"]:
                raise ArtifactError(f"artifact '{uri}' is corrupted: file '{rel}' has {info.size} bytes, expected {entry['bytes']}")
            if verify and sha256_file(self.fs, file_path)[0] != entry["sha256"]:
                raise ArtifactError(f"artifact '{uri}' is corrupted: file '{rel}' fails its sha256 check")
        return Artifact(kind=kind, name=name, uri=uri, manifest=manifest, fs=self.fs, path=path)


def write_parquet_file(uri: str, table: Any) -> dict[str, Any]:
    """Writes a pyarrow Table to `uri` and returns its manifest entry {sha256, bytes}."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _join_uri(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel


def iter_files(uri: str) -> Iterator[tuple[str, int]]:
    """(uri, size) of every file below a folder URI (or of the URI itself if a file), sorted."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        yield uri, info.size
        return
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    for i in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        yield (f"{scheme}{i.path}" if scheme else i.path), i.size


def fetch_folder(uri: str, names: tuple[str, ...]) -> tempfile.TemporaryDirectory:
    """Copies `names` from a local or cloud folder into a temporary local one (kept while referenced)."""
    local = tempfile.TemporaryDirectory(prefix="helio-fetch-")
    fs, path = resolve(uri)
    for name in names:
        with fs.open_input_stream(f"{path}/{name}") as src, open(Path(local.name) / name, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    return local


def blocks(batch, name: str = "input_ids") -> np.ndarray:
    """A pyarrow fixed_size_list column as one (rows, L) array, no per-row copies; a scalar column as (rows,)."""
    col = batch.column(name).combine_chunks()
    if not hasattr(col.type, "list_size"):
        return col.to_numpy(zero_copy_only=False)
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def columns(batch) -> dict[str, np.ndarray]:
    """Every column of a pyarrow batch or table, as arrays with one row per example."""
    return {name: blocks(batch, name) for name in batch.column_names}
