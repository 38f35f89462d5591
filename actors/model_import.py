"""A Hugging Face model folder (local, s3:// / gs://, or inside an installed package) into a model artifact.

The folder is read once, validated by loading it with Helio's own loader (every tensor present and
of the shape its config.json asks for; what Helio cannot honour refused by name), and written as a
model artifact in Helio's layout: config.json and the tokenizer files byte for byte, the weights as
one model.safetensors holding exactly the source's tensors (shards merged, dtypes kept). The
artifact's lineage records where it came from and the sha256 of every source file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import tempfile
from pathlib import Path

from cluster.config import ConfigError
from cluster.storage import Artifact, Storage, resolve

log = logging.getLogger("helio")
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
REQUIRED = ("config.json", "tokenizer.json")
OPTIONAL = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")  # chat template, eos ids


def source_folder(spec: str, key: str = "source") -> str:
    """`pkg:<package>/<sub>` -> the folder inside an installed Python package; anything else as given."""
    if not spec.startswith("pkg:"):
        return spec
    package, _, sub = spec[4:].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(key, f"Python package '{package}' is not installed")
    return str(Path(list(found.submodule_search_locations)[0]) / sub)


def _read(fs, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def read_source(spec: str, key: str = "source") -> dict[str, bytes]:
    """{file name: bytes} of a Hugging Face folder: config, tokenizer files and weights (the shards an
    index names, or model.safetensors). A missing required file is one sentence naming it."""
    folder = source_folder(spec, key)
    fs, path = resolve(folder)
    files: dict[str, bytes] = {}
    for rel in REQUIRED + OPTIONAL + (INDEX,):
        data = _read(fs, f"{path}/{rel}")
        if data is not None:
            files[rel] = data
        elif rel in REQUIRED:
            raise ConfigError(key, f"'{folder}' has no {rel}: a Hugging Face model folder with safetensors "
                                   f"weights and a tokenizer.json is needed")
    if INDEX in files:
        try:
            shards = sorted(set(json.loads(files[INDEX])["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ConfigError(key, f"'{folder}/{INDEX}' is not a safetensors index (no weight_map)") from None
    else:
        shards = [WEIGHTS]
    for rel in shards:
        data = _read(fs, f"{path}/{rel}")
        if data is None:
            named = f"{INDEX} names {rel}, which is missing" if INDEX in files else f"has no {rel} (nor {INDEX})"
            raise ConfigError(key, f"'{folder}': {named}")
        files[rel] = data
    return files


def import_model(store: Storage, spec: str, name: str, key: str = "source") -> Artifact:
    """Imports the folder `spec` as model artifact `name` (validated by loading it); returns it."""
    from safetensors.torch import load, save

    from models.hf import load_model

    folder = source_folder(spec, key)
    files = read_source(spec, key)
    sources = {rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for rel, data in files.items()}
    with tempfile.TemporaryDirectory() as d:
        for rel, data in files.items():
            Path(d, rel).write_bytes(data)
        try:
            model = load_model(d)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(key, str(e).replace(d, folder)) from None
        if INDEX in files:  # one file, the same tensors in their own dtypes
            tensors = {}
            for rel in sorted(set(json.loads(files[INDEX])["weight_map"].values())):
                tensors.update(load(files[rel]))
            weights = save(tensors, metadata={"format": "pt"})
        else:
            weights = files[WEIGHTS]
    params = sum(p.numel() for p in model.parameters())
    hf = json.loads(files["config.json"])
    log.info("importing %s (%s, %s parameters) as model artifact '%s'", folder,
             (hf.get("architectures") or [hf.get("model_type")])[0], f"{params:,}", name)
    with store.create("model", name, {"source": spec}) as out:
        for rel in REQUIRED + OPTIONAL:
            if rel in files:
                out.write_bytes(rel, files[rel])
        out.write_bytes(WEIGHTS, weights)
        out.extra["model"] = {"imported_from": folder, "hf_layout": True, "source_files": sources,
                              "architecture": (hf.get("architectures") or [None])[0], "parameters": params}
    return store.open("model", name, verify=False)
