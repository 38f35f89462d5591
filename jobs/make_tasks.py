"""Python source -> a tasks artifact of finetuning data (SFT, classification, retrieval), on Ray Data.

    python -m jobs.make_tasks jobs/configs/make_tasks_demo.yaml [--set paths=[DIR] --set name=mine]

Ray Data reads the .py files and parses each into its documented functions
(models/pyfuncs.py); the driver removes exact duplicate (docstring, code)
pairs, splits by module (a stable hash of the module name, so evaluation never
sees a training module) and writes the task artifact `{storage}/tasks/{name}/`,
all JSONL, one record a line:

  sft/{train,val}.jsonl        {"prompt", "response"}: prompt is the docstring's
                               first paragraph as `# ` comment lines (wrapped at
                               79 columns, each ending in a newline); response
                               is the function's source, decorators included,
                               docstring removed, dedented, ending in one newline.
                               `prompt + response` is valid Python.
  classify/{train,val}.jsonl   {"text": code, "label": package}: the
                               `classify_labels` top-level packages with the
                               most functions among those present in both
                               splits (so every val label is a train label),
                               `classify_exclude` left out.
  retrieval/{train,val}.jsonl  {"query": docstring, "positive": code}, and in
                               train with `hard_negatives` a "negative": the
                               code of another function of the same module.

With no `paths`, it reads the Python standard library of this interpreter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import sysconfig
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from cluster.cli import UserError, format_summary, run_job
from cluster.config import to_dict
from cluster.runtime import JobConfig, connect_job
from cluster.sources import SourceConfig, expand_sources, stdlib_files
from cluster.storage import Storage, resolve
from models.pyfuncs import comment_prompt, in_val, source_root

log = logging.getLogger("helio")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class MakeTasksConfig(JobConfig):
    name: str = "stdlib_tasks"
    paths: tuple[str, ...] = ()  # .py files, folders, globs or URIs; empty: this interpreter's stdlib
    val_fraction: float = 0.1  # share of modules (whole modules) sent to val
    seed: int = 0  # salts the module split and the choice of hard negatives
    min_docstring_chars: int = 20  # shorter docstring summaries make poor prompts
    max_code_chars: int = 1500  # longer functions are skipped (about 400 tokens)
    classify_labels: int = 8  # packages kept as classes, the ones with the most functions
    classify_exclude: tuple[str, ...] = ("test",)  # stdlib's test suite covers every topic: its label says nothing
    hard_negatives: bool = True  # retrieval train records get a same-module negative

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction: must be in (0, 1): evaluation needs modules on both sides")
        if self.min_docstring_chars < 1:
            raise ValueError("min_docstring_chars: must be at least 1")
        if self.max_code_chars < 1:
            raise ValueError("max_code_chars: must be at least 1")
        if self.classify_labels < 2:
            raise ValueError("classify_labels: must be at least 2")


def python_files(paths: tuple[str, ...]) -> tuple[list[str], str]:
    """The .py files to read (as Ray Data reads them: local paths absolute, URIs as given) and their module root."""
    if not paths:
        return stdlib_files(), sysconfig.get_paths()["stdlib"]
    files = [f for f in expand_sources(SourceConfig(paths=paths, extensions=(".py",)), key="paths")
             if f.endswith(".py")]  # not .py.gz
    if not files:
        raise UserError(f"paths {list(paths)} hold no .py file")
    try:
        root = source_root([resolve(f)[1] for f in files])
    except ValueError:
        raise UserError(f"paths {list(paths)} mix local files and URIs; give one kind") from None
    return [f if "://" in f else resolve(f)[1] for f in files], root


def dedupe(records: list[dict]) -> tuple[list[dict], int]:
    """Records sorted by (module, name, code), the first of each exact (docstring, code) pair kept."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for r in sorted(records, key=lambda r: (r["module"], r["name"], r["code"])):
        if (key := (r["docstring"], r["code"])) not in seen:
            seen.add(key)
            kept.append(r)
    return kept, len(records) - len(kept)


def choose_labels(split: dict[str, list[dict]], k: int, exclude: tuple[str, ...]) -> tuple[list[str], dict[str, int]]:
    """The k packages with the most functions among those in both splits; functions dropped, by reason."""
    counts = {s: Counter(r["package"] for r in split[s]) for s in SPLITS}
    total = counts["train"] + counts["val"]
    eligible = [p for p in total if p not in exclude and counts["train"][p] and counts["val"][p]]
    labels = sorted(sorted(eligible, key=lambda p: (-total[p], p))[:k])
    if len(labels) < 2:  # one class makes no classification task: leave classify/ empty
        labels = []
    dropped = {
        "excluded_package": sum(n for p, n in total.items() if p in exclude),
        "package_in_one_split": sum(n for p, n in total.items() if p not in exclude and not (counts["train"][p] and counts["val"][p])),
        "package_not_kept_as_label": sum(total[p] for p in eligible if p not in labels),
    }
    return labels, dropped


def negative_for(record: dict, group: list[dict], seed: int) -> str | None:
    """The code of another function of the same module, picked by a stable hash; None if there is none."""
    others = [r["code"] for r in group if r["code"] != record["code"]]
    if not others:
        return None
    digest = hashlib.sha1(f"{seed}:{record['module']}:{record['name']}:{record['code']}".encode()).digest()
    return others[int.from_bytes(digest[:8], "big") % len(others)]


def build_tasks(records: list[dict], cfg: MakeTasksConfig) -> tuple[dict[str, dict[str, list[dict]]], dict[str, Any]]:
    """{task: {split: rows}} from deduplicated, sorted records, and what the manifest says about them."""
    split = {s: [r for r in records if in_val(r["module"], cfg.val_fraction, cfg.seed) == (s == "val")] for s in SPLITS}
    labels, classify_dropped = choose_labels(split, cfg.classify_labels, cfg.classify_exclude)
    by_module: dict[str, list[dict]] = {}
    for r in split["train"]:
        by_module.setdefault(r["module"], []).append(r)
    tasks: dict[str, dict[str, list[dict]]] = {"sft": {}, "classify": {}, "retrieval": {}}
    negatives = 0
    for s in SPLITS:
        tasks["sft"][s] = [{"prompt": comment_prompt(r["docstring"]), "response": r["code"]} for r in split[s]]
        tasks["classify"][s] = [{"text": r["code"], "label": r["package"]} for r in split[s] if r["package"] in labels]
        tasks["retrieval"][s] = []
        for r in split[s]:
            row = {"query": r["docstring"], "positive": r["code"]}
            if s == "train" and cfg.hard_negatives and (neg := negative_for(r, by_module[r["module"]], cfg.seed)):
                row["negative"] = neg
                negatives += 1
            tasks["retrieval"][s].append(row)
    info = {
        "modules": {s: len({r["module"] for r in split[s]}) for s in SPLITS},
        "classify": {"labels": labels, "dropped": classify_dropped,
                     "label_counts": {s: dict(sorted(Counter(r["label"] for r in tasks["classify"][s]).items())) for s in SPLITS}},
        "retrieval": {"train_with_negative": negatives},
    }
    return tasks, info


def run(cfg: MakeTasksConfig) -> dict[str, Any]:
    """Runs the whole job; returns the artifact's manifest."""
    import ray.data

    from actors import make_tasks_data as udf
    from cluster.runtime import cluster_cpus

    store = Storage(cfg.storage)
    store.artifact_path("task", cfg.name)  # validates the name before any work
    files, root = python_files(cfg.paths)
    connect_job(cfg)
    t0 = time.time()  # job time, not counting the start of an embedded cluster

    log.info("[1/3] parse %d .py files into documented functions (Ray Data)", len(files))
    rows = (
        ray.data.read_binary_files(files, include_paths=True, override_num_blocks=min(len(files), 4 * cluster_cpus()))
        .map_batches(udf.extract_batch, batch_size=None,  # a whole read block per call: read and parse fuse into one task
                     fn_kwargs={"root": root, "min_docstring_chars": cfg.min_docstring_chars,
                                "max_code_chars": cfg.max_code_chars})
        .take_all()
    )
    file_status = Counter(r["status"] for r in rows)
    skipped: Counter[str] = Counter()
    found: list[dict] = []
    for r in rows:
        skipped.update(json.loads(r["skipped"]))
        found.extend(json.loads(r["functions"]))
    if len(rows) != len(files):
        raise RuntimeError(f"file accounting broke: listed {len(files)}, parsed {len(rows)}")
    if not found:
        raise UserError(f"no function with a docstring of at least {cfg.min_docstring_chars} characters in the "
                        f"{len(files)} .py files of {list(cfg.paths) or ['<python stdlib>']} (skipped: {dict(skipped)})")

    log.info("[2/3] dedupe %d functions, split by module, build the tasks", len(found))
    functions_found = len(found) + sum(skipped.values())
    records, skipped["exact_duplicate"] = dedupe(found)
    tasks, info = build_tasks(records, cfg)
    counts = {t: {s: len(rows) for s, rows in by_split.items()} for t, by_split in tasks.items()}
    if not info["classify"]["labels"]:
        log.warning("fewer than 2 packages have modules in both splits: classify/ holds no record")

    log.info("[3/3] write the artifact")
    with store.create("task", cfg.name, config=to_dict(cfg)) as art:
        for task, by_split in tasks.items():
            for s, task_rows in by_split.items():
                art.write_bytes(f"{task}/{s}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in task_rows).encode())
        art.metrics = {
            "files": {"read": len(rows), "parsed": file_status.pop("parsed", 0), "dropped": dict(sorted(file_status.items()))},
            "functions": {"found": functions_found, "kept": len(records),
                          "dropped": dict(sorted(skipped.items()))},
            "records": counts,
            "seconds": round(time.time() - t0, 2),
        }
        art.extra = {"tasks": {"source": {"paths": list(cfg.paths) or ["<python stdlib>"], "root": root, "files": len(files)},
                               "formats": {"sft": ["prompt", "response"], "classify": ["text", "label"],
                                           "retrieval": ["query", "positive", "negative (train, optional)"]},
                               **info}}
    artifact = store.open("task", cfg.name, verify=False)
    print(summary_table(artifact.manifest, artifact.uri))
    return artifact.manifest


def summary_table(m: dict[str, Any], uri: str) -> str:
    files, functions, t = m["metrics"]["files"], m["metrics"]["functions"], m["tasks"]
    rows = [("files read / parsed", f"{files['read']:,} / {files['parsed']:,}")]
    rows += [(f"  dropped: {reason}", f"{n:,}") for reason, n in files["dropped"].items() if n]
    rows.append(("functions found / kept", f"{functions['found']:,} / {functions['kept']:,}"))
    rows += [(f"  dropped: {reason}", f"{n:,}") for reason, n in functions["dropped"].items() if n]
    rows.append(("modules train / val", f"{t['modules']['train']:,} / {t['modules']['val']:,}"))
    for task, by_split in m["metrics"]["records"].items():
        rows.append((f"{task} train / val", f"{by_split['train']:,} / {by_split['val']:,}"))
    rows += [
        ("classify labels", ", ".join(t["classify"]["labels"])),
        ("retrieval negatives", f"{t['retrieval']['train_with_negative']:,}"),
        ("time", f"{m['metrics']['seconds']:.1f} s"),
        ("artifact", uri),
    ]
    return format_summary("make_tasks summary", rows)


CONFIG_CLASS = MakeTasksConfig  # what jobs/configs/make_tasks_*.yaml must load into


def main(argv: list[str] | None = None) -> int:
    return run_job("jobs.make_tasks", __doc__, MakeTasksConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
