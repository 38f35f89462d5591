"""lm-evaluation-harness on Helio's models: three offline tasks and the Ray task that scores a model
with them through one of lm-eval's own backends.

The tasks are ordinary lm-eval task YAML (actors/eval_tasks/); their documents are derived here from
a tasks artifact's held-out functions (sft/val.jsonl: a docstring as `# ` comment lines, the code):

  helio_docstring_choice   multiple choice by log-likelihood: the function's first lines among 4;
  helio_code_perplexity    rolling log-likelihood of the docstring and code (word/byte perplexity);
  helio_signature_exact    greedy generation of the `def` line, exact match.

A document that does not fit the model's context is left out and counted (truncated, an in-process
and a served score would differ by how each backend cuts, not by the model).

Backends (`score`):
  hf                 lm-eval's HFLM on the model artifact's folder (Hugging Face layout, float);
  helio              HelioLM below: lm-eval's model interface over Helio's own loader, so a quantized
                     artifact (integer weights, fbgemm kernels) is scored in-process too;
  local-completions  lm-eval's OpenAI-completions client against a served model: Helio's HTTP API
                     (`echo` and `logprobs` score, greedy generation answers), so a quantized model is
                     scored exactly as clients reach it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

log = logging.getLogger("helio")
TASK_DIR = Path(__file__).parent / "eval_tasks"
TASKS = ("helio_docstring_choice", "helio_code_perplexity", "helio_signature_exact")
CHOICES = 4  # the right function and 3 others
CHOICE_LINES = 3  # a choice is a function's first lines
GEN_TOKENS = 32  # helio_signature_exact's max_gen_toks (its YAML)


def task_files(names: tuple[str, ...] = TASKS) -> dict[str, str]:
    """The task YAMLs, by file name."""
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: Helio's are {', '.join(TASKS)}")
    return {f"{n}.yaml": (TASK_DIR / f"{n}.yaml").read_text() for n in names}


def _signature(response: str) -> tuple[str, str] | None:
    """(decorator lines, the `def` line) of a function's source, or None if it has no def line."""
    lines = response.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith(("def ", "async def ")):
            return "".join(lines[:i]), line.rstrip("\n")
    return None


def task_documents(rows: list[dict], count: Any, context: int, limit: int, seed: int
                   ) -> tuple[dict[str, list[dict]], dict[str, Counter]]:
    """sft/val records {"prompt", "response"} -> (each task's documents, what was left out by reason).

    `count(text)` is the model's token count of a text and `context` its context length: every scored
    sequence fits in one forward with a token to spare (nothing is cut). At most `limit` documents per
    task, the same ones for a given seed (a seeded shuffle of the records)."""
    rows = sorted({(r["prompt"], r["response"]) for r in rows if r["prompt"].strip() and r["response"].strip()})
    random.Random(seed).shuffle(rows)
    heads = sorted({"".join(r.splitlines(keepends=True)[:CHOICE_LINES]) for _, r in rows})
    docs: dict[str, list[dict]] = {t: [] for t in TASKS}
    dropped: dict[str, Counter] = {t: Counter() for t in TASKS}
    rng = random.Random(seed + 1)
    for prompt, response in rows:
        if all(len(d) >= limit for d in docs.values()):
            break
        head = "".join(response.splitlines(keepends=True)[:CHOICE_LINES])
        if len(docs["helio_docstring_choice"]) < limit:
            others = rng.sample([h for h in heads if h != head], CHOICES - 1) if len(heads) >= CHOICES else []
            choices = others + [head]
            rng.shuffle(choices)
            if not others:
                dropped["helio_docstring_choice"]["fewer than 4 distinct functions"] += 1
            elif max(count(prompt + c) for c in choices) + 1 >= context:
                dropped["helio_docstring_choice"]["longer than the context"] += 1
            else:
                docs["helio_docstring_choice"].append({"prompt": prompt, "choices": choices,
                                                       "gold": choices.index(head)})
        if len(docs["helio_code_perplexity"]) < limit:
            if count(prompt + response) + 2 >= context:  # and the prefix token lm-eval puts before it
                dropped["helio_code_perplexity"]["longer than the context"] += 1
            else:
                docs["helio_code_perplexity"].append({"text": prompt + response})
        if len(docs["helio_signature_exact"]) < limit:
            sig = _signature(response)
            if sig is None:
                dropped["helio_signature_exact"]["no def line"] += 1
            elif count(prompt + sig[0]) + GEN_TOKENS + 1 >= context:
                dropped["helio_signature_exact"]["longer than the context"] += 1
            else:
                docs["helio_signature_exact"].append({"prompt": prompt + sig[0], "signature": sig[1]})
    return docs, dropped


def write_tasks(folder: str | Path, names: tuple[str, ...], docs: dict[str, list[dict]]) -> None:
    """The task YAMLs and their documents (JSONL) into `folder`, as lm-eval's --include_path reads them."""
    folder = Path(folder)
    for file, text in task_files(names).items():
        (folder / file).write_text(text)
    for name in names:
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[name]))


@dataclass
class Prepared:
    """What a scoring task needs, made once in the driver: the task folder's files, the tokenizer
    files transformers reads, the documents and what was left out of them."""
    tasks: dict[str, bytes]  # file name -> bytes: the YAMLs and their JSONL documents
    tokenizer: dict[str, str]  # hf_tokenizer_files'
    documents: dict[str, int]  # per task
    left_out: dict[str, dict[str, int]]  # per task, by reason
    context: int


def context_of(model: Any) -> int:
    """A model artifact's context length, from its config.json."""
    hf = json.loads(model.read_bytes("config.json"))
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(hf.get(key), int):
            return hf[key]
    raise ValueError(f"model artifact '{model.name}': config.json names no context length (n_positions / "
                     f"max_position_embeddings)")


def prepare(model: Any, tasks: Any, names: tuple[str, ...], limit: int, seed: int) -> Prepared:
    """Documents for `names` from the tasks artifact's sft/val.jsonl, fitted to the model artifact's
    tokenizer and context. Raises ValueError (one sentence) when the data cannot make a task."""
    from actors.chat import ChatFormat, tokenizer_files

    if "sft/val.jsonl" not in tasks.manifest["files"]:
        raise ValueError(f"tasks artifact '{tasks.name}' has no sft/val.jsonl: make it with jobs.make_tasks")
    rows = [json.loads(line) for line in tasks.read_bytes("sft/val.jsonl").decode().splitlines() if line.strip()]
    files = tokenizer_files(model)
    chat, context = ChatFormat(files), context_of(model)
    tok = chat.tokenizer
    if not chat.eos_ids:
        raise ValueError(f"model artifact '{model.name}': its tokenizer has no end-of-text token, which lm-eval "
                         f"needs to end generations and to start a text scored from nothing")
    eos = tok.id_to_token(chat.eos_ids[0])
    docs, dropped = task_documents(rows, lambda t: len(tok.encode(t, add_special_tokens=False).ids), context,
                                   limit, seed)
    if empty := [t for t in names if not docs[t]]:
        raise ValueError(f"no document of task(s) {', '.join(empty)} fits model '{model.name}' (context {context}): "
                         f"left out {', '.join(f'{t}: {dict(dropped[t])}' for t in empty)}")
    with tempfile.TemporaryDirectory() as tmp:
        write_tasks(tmp, names, docs)
        task_bytes = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    return Prepared(task_bytes, hf_tokenizer_files(files, eos, tok.id_to_token(chat.pad_id), context),
                    {t: len(docs[t]) for t in names}, {t: dict(dropped[t]) for t in names}, context)


def scores(results: dict) -> dict[str, float]:
    """{task/metric: value} of lm-eval's results (standard errors left out)."""
    return {f"{task}/{key.split(',')[0]}": float(v) for task, metrics in results.items()
            for key, v in metrics.items() if key.endswith(",none") and "_stderr" not in key
            and isinstance(v, int | float)}


def hf_tokenizer_files(files: dict[str, str], eos: str | None, pad: str | None, context: int) -> dict[str, str]:
    """The tokenizer files transformers' AutoTokenizer reads: a checkpoint's own, or for a tokenizer
    Helio trained (tokenizer.json alone) a tokenizer_config.json naming its special tokens."""
    if "tokenizer_config.json" in files:
        return files
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context,
              "eos_token": eos, "pad_token": pad or eos, "bos_token": None, "add_bos_token": False}
    return files | {"tokenizer_config.json": json.dumps(config)}


def helio_lm(model: Any, tokenizer: Any, eos_id: int, bos_id: int | None, batch_size: int) -> Any:
    """An lm-eval LM over a Helio causal LM (GPT or Llama, float or quantized) in this process. A text
    scored from nothing starts after `bos_id` when the tokenizer has one, else after end-of-text (as
    lm-eval's HF and API backends do)."""
    import torch
    import torch.nn.functional as F
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from actors.model_loader import forward, max_len

    class HelioLM(TemplateLM):
        """Log-likelihoods from one forward per batch of right-padded rows (causal: padding after a row
        cannot change it), greedy generation with the model's own KV-cache decoding."""

        def __init__(self):
            super().__init__()
            self.context = max_len(model)

        @property
        def eot_token_id(self) -> int:
            return eos_id

        @property
        def prefix_token_id(self) -> int:
            return bos_id if bos_id is not None else eos_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return tokenizer.encode(string, add_special_tokens=False).ids

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            out = []
            for i in range(0, len(requests), batch_size):
                rows = []
                for _, context, continuation in requests[i:i + batch_size]:
                    whole = (context + continuation)[-(self.context + 1):]  # the last context + 1 tokens
                    rows.append((whole[:-1], len(continuation)))
                width = max(len(r) for r, _ in rows)
                ids = torch.tensor([r + [eos_id] * (width - len(r)) for r, _ in rows])
                logp = F.log_softmax(forward(model, ids).float(), dim=-1)  # (B, T, V)
                for (row, n), lp, (_, context, continuation) in zip(rows, logp, requests[i:i + batch_size]):
                    scores = lp[len(row) - n:len(row)]  # (n, V): the positions that predict the continuation
                    target = torch.tensor(continuation)
                    out.append((scores.gather(1, target[:, None]).sum().item(),
                                bool((scores.argmax(-1) == target).all())))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (string,) in (r.args for r in requests):
                windows = [(None,) + make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.context, context_len=1)]
                out.append(sum(lp for lp, _ in self._loglikelihood_tokens(windows)))
            return out

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for context, kwargs in (r.args for r in requests):
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                n = min(int(kwargs.get("max_gen_toks", 256)), self.context - 1)
                ids = self.tok_encode(context)[-(self.context - n):]
                new = model.generate(torch.tensor([ids]), n, temperature=0.0)[0, len(ids):].tolist()
                if eos_id in new:
                    new = new[:new.index(eos_id)]
                text = tokenizer.decode(new)
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
            return out

    return HelioLM()


@ray.remote(num_cpus=1)
def score(backend: str, model_uri: str | None, tokenizer: dict[str, str], tasks: dict[str, bytes], names: list[str],
          seed: int, batch_size: int, endpoint: dict | None = None) -> dict[str, Any]:
    """lm-eval's simple_evaluate over the task folder `tasks` (file name -> bytes) with one backend:
    "hf" and "helio" load the model folder at `model_uri`; "local-completions" calls `endpoint` {url,
    model, api_key, max_length}. `tokenizer`: hf_tokenizer_files' (its eos_token ends generations).
    Returns lm-eval's results, which way each metric is better, and lm-eval's version."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the documents are local files; nothing downloads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from actors.model_loader import MODEL_FILES
    from cluster.storage import fetch_folder

    import datasets

    with tempfile.TemporaryDirectory(prefix="helio-eval-") as tmp:
        # the documents' Arrow cache lives and goes with this run (a worker process imports datasets once,
        # so its config, not the environment, is where the cache is read from)
        datasets.config.HF_DATASETS_CACHE = Path(tmp, "datasets")
        task_dir, tok_dir = Path(tmp, "tasks"), Path(tmp, "tokenizer")
        task_dir.mkdir()
        tok_dir.mkdir()
        for rel, data in tasks.items():
            text = data.decode()
            if rel.endswith(".yaml"):  # the documents beside it, wherever this worker put them
                text = text.replace(f"test: {rel[:-5]}.jsonl", f"test: {task_dir / rel[:-5]}.jsonl")
            (task_dir / rel).write_text(text)
        for rel, text in tokenizer.items():
            (tok_dir / rel).write_text(text)
        eos = json.loads(tokenizer["tokenizer_config.json"]).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        common = dict(tasks=names, task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                      torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=100, log_samples=False)
        if backend == "hf":
            from lm_eval.models.huggingface import HFLM

            with fetch_folder(model_uri, MODEL_FILES) as folder:
                lm = HFLM(pretrained=folder, tokenizer=str(tok_dir), device="cpu", batch_size=batch_size,
                          dtype="float32", add_bos_token=False)  # as the served API and Helio's: no specials added
                out = lm_eval.simple_evaluate(model=lm, **common)
        elif backend == "local-completions":
            from lm_eval.models.openai_completions import LocalCompletionsAPI

            lm = LocalCompletionsAPI(base_url=f"{endpoint['url']}/v1/completions", model=endpoint["model"],
                                     tokenizer_backend="huggingface", tokenizer=str(tok_dir),
                                     max_length=endpoint["max_length"], batch_size=batch_size,
                                     header={"Authorization": f"Bearer {endpoint.get('api_key') or ''}"},
                                     max_retries=1, timeout=120)
            out = lm_eval.simple_evaluate(model=lm, **common)
        elif backend == "helio":
            from tokenizers import Tokenizer

            from actors.model_loader import load_runnable

            tok = Tokenizer.from_str(tokenizer["tokenizer.json"])
            bos = json.loads(tokenizer["tokenizer_config.json"]).get("bos_token")
            bos = bos.get("content") if isinstance(bos, dict) else bos
            lm = helio_lm(load_runnable(model_uri).eval(), tok, tok.token_to_id(eos),
                          tok.token_to_id(bos) if bos else None, batch_size)
            out = lm_eval.simple_evaluate(model=lm, **common)
        else:
            raise ValueError(f"backend: {backend!r} is not one of hf, helio, local-completions")
    from importlib.metadata import version

    return {"results": out["results"], "higher_is_better": out.get("higher_is_better", {}),
            "lm_eval": version("lm_eval")}
