"""The make_tasks job's Ray Data UDF: .py files -> their documented functions. Thin: the parsing lives in
models/pyfuncs.py.

  extract_batch   a batch of files from `read_binary_files(include_paths=True)`
                  -> one row per file: its module, its status ('parsed' or why
                  it was dropped), its function records and skipped-function
                  counts (both as JSON: a file holds any number of records, and
                  a string column never trips Arrow's schema inference on an
                  empty list)
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import numpy as np

from models.pyfuncs import extract_functions, module_name
from models.text import decode


def extract_batch(batch: dict[str, np.ndarray], root: str, min_docstring_chars: int,
                  max_code_chars: int) -> dict[str, Any]:
    """Files (columns `bytes`, `path`) -> one row per file: path, module, status, functions, skipped."""
    rows: dict[str, list] = {"path": [], "module": [], "status": [], "functions": [], "skipped": []}
    for path, raw in zip(batch["path"], batch["bytes"]):
        path = str(path)
        module = module_name(posixpath.relpath(path, root))
        records: list[dict] = []
        skipped: dict[str, int] = {}
        text, status = decode(bytes(raw))  # status: 'binary' or 'invalid_utf8' when undecodable
        if text is not None:
            records, skipped = extract_functions(text, module, min_docstring_chars, max_code_chars)
            status = "syntax_error" if skipped.pop("syntax_error", 0) else "parsed"
        rows["path"].append(path)
        rows["module"].append(module)
        rows["status"].append(status)
        rows["functions"].append(json.dumps(records))
        rows["skipped"].append(json.dumps(skipped))
    return {k: np.array(v, dtype=object) for k, v in rows.items()}
