"""The input files a job reads: files, folders, globs or URIs named in a config, listed with their sizes.

jobs.prepare reads text from them, jobs.make_tasks Python source, and jobs.pipeline hashes the list to
tell whether a stage's inputs changed. With no paths the input is the demo corpus, this
interpreter's standard library.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from dataclasses import dataclass

import pyarrow.fs as pafs

from cluster.cli import UserError
from cluster.storage import iter_files, resolve


@dataclass(frozen=True)
class SourceConfig:
    paths: tuple[str, ...] = ()  # files, folders, globs or URIs; empty: the stdlib demo corpus
    text_field: str = "text"  # field of jsonl / json / parquet records holding the text
    extensions: tuple[str, ...] = ()  # keep only files ending so (before .gz); empty: all


def stdlib_files() -> list[str]:
    """The demo corpus: every .py file of this interpreter's standard library."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return files


def expand_sources(cfg: SourceConfig, key: str = "source.paths") -> dict[str, int]:
    """{uri: size} of every input file named by `cfg.paths` (files, folders, globs, URIs), sorted.

    `key` is the config key the paths came from, named in the error when they hold no file.
    """
    if not cfg.paths:
        return {f: os.path.getsize(f) for f in stdlib_files()}
    files: list[tuple[str, int]] = []
    for spec in cfg.paths:
        if "://" not in spec and glob.has_magic(spec):
            matched = sorted(glob.glob(spec, recursive=True))
            if not matched:
                raise UserError(f"source path '{spec}' matches no file")
            for m in matched:
                files.extend(iter_files(m))
            continue
        fs, path = resolve(spec)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise UserError(f"source path '{spec}' does not exist")
        files.extend(iter_files(spec))
    if cfg.extensions:
        wanted = tuple(e.lower() for e in cfg.extensions)
        files = [(f, n) for f, n in files if f.lower().removesuffix(".gz").endswith(wanted)]
    files = dict(sorted(files))
    if not files:
        raise UserError(f"{key} {list(cfg.paths)} hold no input file (extensions: {list(cfg.extensions) or 'any'})")
    return files
