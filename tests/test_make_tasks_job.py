"""The make_tasks job on a real local Ray cluster, over a generated tree of Python packages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cluster.storage import Storage
from jobs import make_tasks
from models.pyfuncs import in_val

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # full tier: the pipeline test runs make_tasks once in make test-fast

CONFIG = str(Path(make_tasks.__file__).parent / "configs" / "make_tasks_demo.yaml")
MODULES = ([f"alpha.m{i}" for i in range(6)] + ["alpha"] + [f"beta.m{i}" for i in range(6)] + ["beta"]
           + [f"gamma.m{i}" for i in range(4)] + ["gamma"] + ["test.test_alpha", "test.test_beta", "solo"])
DOCUMENTED = 4  # per module: three functions and one method
MARK = re.compile(r"# mod=([\w.]+)")


def module_source(mod: str) -> str:
    """Four documented functions (marked with their module), one undocumented, one with a short docstring."""
    funcs = "".join(f'def f{j}(x):\n    """Compute value {j} of module {mod} from x."""\n    return x + {j}  # mod={mod}\n\n\n'
                    for j in range(3))
    return (f'"""Module {mod}."""\n\n\n{funcs}'
            f'class Box:\n    def get(self):\n        """Return what the box of {mod} holds."""\n        return self.v  # mod={mod}\n\n'
            f'    def bare(self):\n        return 0\n\n\n'
            f'def short():\n    """Short."""\n    return 1\n')


def split_seed() -> int:
    """A seed that puts a module of alpha, beta and gamma on each side of the 30% split."""
    for seed in range(1000):
        sides = {p: {in_val(m, 0.3, seed) for m in MODULES if m.split(".")[0] == p} for p in ("alpha", "beta", "gamma")}
        if all(s == {True, False} for s in sides.values()):
            return seed
    raise AssertionError("no seed splits every package")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("code") / "src"
    for mod in MODULES:
        parts = mod.split(".")
        path = root.joinpath(*parts[:-1], parts[-1] + ".py") if len(parts) > 1 else root / f"{mod}.py"
        if mod in ("alpha", "beta", "gamma", "test"):
            path = root / mod / "__init__.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(module_source(mod))
    (root / "test" / "__init__.py").write_text("")
    (root / "gamma" / "vendored.py").write_text(module_source("alpha.m0"))  # a vendored copy: exact duplicates
    (root / "broken.py").write_text("def broken(:\n    pass\n")
    (root / "latin.py").write_bytes('def f():\n    """Caf\xe9 au lait, served hot and fresh."""\n'.encode("latin-1"))
    (root / "README.txt").write_text("not python")
    return root


@pytest.fixture(scope="module")
def artifact(ray_cluster, corpus, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    code = make_tasks.main([CONFIG, "--set", f"storage={storage}", "--set", "name=toy", "--set", f"paths=[{corpus}]",
                            "--set", "val_fraction=0.3", "--set", f"seed={split_seed()}", "--set", "classify_labels=2"])
    assert code == 0
    return Storage(str(storage)).open("task", "toy")


def rows(artifact, rel: str) -> list[dict]:
    return [json.loads(line) for line in artifact.read_bytes(rel).decode().splitlines()]


def test_files_and_functions_are_accounted_for(artifact):
    m = artifact.metrics
    py_files = len(MODULES) + 1 + 3  # + test/__init__.py, gamma/vendored.py, broken.py, latin.py
    assert m["files"] == {"read": py_files, "parsed": py_files - 2, "dropped": {"invalid_utf8": 1, "syntax_error": 1}}
    parsed_modules = len(MODULES) + 1  # + the vendored copy
    assert m["functions"]["dropped"] == {"exact_duplicate": DOCUMENTED, "no_docstring": parsed_modules,
                                         "short_docstring": parsed_modules}
    assert m["functions"]["kept"] == DOCUMENTED * len(MODULES)
    assert m["functions"]["found"] == m["functions"]["kept"] + sum(m["functions"]["dropped"].values())
    for task in ("sft", "retrieval"):
        assert sum(m["records"][task].values()) == DOCUMENTED * len(MODULES)


def test_splits_never_share_a_module(artifact):
    modules = {}
    for split in ("train", "val"):
        found = {MARK.search(r["response"]).group(1) for r in rows(artifact, f"sft/{split}.jsonl")}
        assert found, split
        modules[split] = found
    assert not modules["train"] & modules["val"]
    assert modules["train"] | modules["val"] == set(MODULES)
    assert all(in_val(mod, 0.3, artifact.manifest["config"]["seed"]) for mod in modules["val"])


def test_sft_records_are_comment_prompts_and_code(artifact):
    for r in rows(artifact, "sft/train.jsonl"):
        assert set(r) == {"prompt", "response"}
        assert r["prompt"].startswith("# ") and r["prompt"].endswith("\n")
        assert r["response"].startswith("def ") and '"""' not in r["response"]


def test_classify_labels_are_shared_by_both_splits(artifact):
    info = artifact.manifest["tasks"]["classify"]
    assert info["labels"] == ["alpha", "beta"]  # gamma has fewer functions; test is excluded; solo is one module
    labels = {split: {r["label"] for r in rows(artifact, f"classify/{split}.jsonl")} for split in ("train", "val")}
    assert labels["val"] <= labels["train"] == {"alpha", "beta"}
    kept = sum(artifact.metrics["records"]["classify"].values())
    assert kept == 2 * 7 * DOCUMENTED
    assert kept + sum(info["dropped"].values()) == DOCUMENTED * len(MODULES)


def test_retrieval_negatives_come_from_the_same_module(artifact):
    train = rows(artifact, "retrieval/train.jsonl")
    assert all(set(r) == {"query", "positive", "negative"} for r in train)
    for r in train:
        assert r["negative"] != r["positive"]
        assert MARK.search(r["negative"]).group(1) == MARK.search(r["positive"]).group(1)
    assert all(set(r) == {"query", "positive"} for r in rows(artifact, "retrieval/val.jsonl"))


def test_no_python_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("nothing to parse")
    assert make_tasks.main([CONFIG, "--set", f"storage={tmp_path}", "--set", f"paths=[{tmp_path}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jobs.make_tasks: error: paths ['{tmp_path}'] hold no input file (extensions: ['.py'])"]


def test_no_documented_function_is_a_clear_error(ray_cluster, tmp_path, capsys):
    (tmp_path / "bare.py").write_text("def f():\n    return 1\n")
    assert make_tasks.main([CONFIG, "--set", f"storage={tmp_path}", "--set", f"paths=[{tmp_path}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jobs.make_tasks: error: no function with a docstring of at least 20 characters")
    assert "'no_docstring': 1" in err[0]
