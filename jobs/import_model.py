"""Import a Hugging Face model folder as a model artifact that every later stage can start from.

    python -m jobs.import_model --set source=/path/to/Qwen2.5-0.5B --set name=qwen2.5-0.5b
    python -m jobs.import_model --set source=s3://bucket/models/llama-3.2-1b --set storage=s3://bucket/helio

`source` is a folder in Hugging Face layout: config.json (LlamaForCausalLM,
Qwen2ForCausalLM, MistralForCausalLM, GPT2LMHeadModel, BERT), single or sharded
safetensors (model.safetensors.index.json), tokenizer.json, and where present
tokenizer_config.json (special tokens, chat template) and generation_config.json
(eos ids). A local path, an s3:// / gs:// URI, or pkg:<package>/<folder> inside an
installed Python package (how the MiniLM demo base ships). The folder is validated
by loading it; anything Helio cannot honour (an unsupported architecture, a missing
shard, a tensor an index names but its shard lacks, an unknown rope_scaling type)
is one sentence naming the file or field, and exit 2. Nothing is downloaded.

Writes models/{name}: the config and tokenizer files byte for byte, the weights as
one model.safetensors, and in its manifest the source and the sha256 of every
source file. Runs on the machine it is started on (no Ray work).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.model_import import import_model, source_folder
from cluster.cli import UserError, format_summary, run_job
from cluster.runtime import JobConfig
from cluster.storage import Storage


@dataclass(frozen=True)
class ImportConfig(JobConfig):
    name: str = ""  # the model artifact; default: the source folder's name ('.' -> '-')
    source: str = ""  # the Hugging Face folder: a path, s3:// / gs:// URI, or pkg:<package>/<folder>
    replace: bool = False  # import again over an existing artifact of that name

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source: must name a Hugging Face model folder")


def run(cfg: ImportConfig) -> dict[str, Any]:
    store = Storage(cfg.storage)
    name = cfg.name or Path(source_folder(cfg.source).rstrip("/")).name.replace(".", "-")
    store.artifact_path("model", name)  # validates the name before any work
    if store.exists("model", name) and not cfg.replace:
        raise UserError(f"model artifact '{name}' exists; set replace=true to import over it, or another name")
    art = import_model(store, cfg.source, name)
    m = art.manifest["model"]
    print(format_summary("import summary", [
        ("source", m["imported_from"]),
        ("architecture", m["architecture"] or "?"),
        ("parameters", f"{m['parameters']:,}"),
        ("source files", f"{len(m['source_files'])}, {sum(f['bytes'] for f in m['source_files'].values()):,} bytes "
                         f"(the sha256 of each in the manifest)"),
        ("model artifact", art.uri),
    ]))
    return art.manifest


CONFIG_CLASS = ImportConfig


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.import_model", __doc__, ImportConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
