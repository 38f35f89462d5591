"""The held-out task evaluation: one actor per finetune job scores the base, then the result.

The actor reserves no CPU: it works only while training does not (before
`fit` starts and after it returns), so on a small machine it never takes the
cores the training workers and their Ray Data reads need. One process serves
both evaluations, so torch and peft are imported once.
"""

from __future__ import annotations

import os

import ray
import torch

from models.finetune import TaskSpec, build_task_model
from models.hf import load_model
from models.task_heads import evaluate_task


@ray.remote(num_cpus=0)
class Evaluator:
    def __init__(self, threads: int):
        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))

    def evaluate(self, kind: str, model_uri: str, rows_uri: str, max_examples: int, eos_id: int | None,
                 max_new_tokens: int) -> dict[str, float]:
        """Metrics of the model in `model_uri` (a Hugging Face folder) on the first `max_examples` rows.

        A base with no head for the task yet (an encoder about to learn
        embeddings) is wrapped the way the finetune builds it.
        """
        import pyarrow.parquet as pq

        from cluster.storage import columns, fetch_folder, resolve

        fs, path = resolve(rows_uri)
        table = pq.read_table(path, filesystem=fs).slice(0, max_examples)
        rows = {k: torch.from_numpy(v.astype("int64")) for k, v in columns(table).items()}
        folder = fetch_folder(model_uri, ("config.json", "model.safetensors"))
        model = build_task_model(TaskSpec(kind=kind), folder.name)[0] if kind == "embed" else load_model(folder.name)
        metrics = evaluate_task(kind, model, rows, eos_id=eos_id, max_new_tokens=max_new_tokens)
        return {k: round(v, 6) for k, v in metrics.items()}
