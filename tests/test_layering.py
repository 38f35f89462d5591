"""DESIGN.md section 1: imports flow jobs -> actors -> models; cluster serves jobs and actors; a job
module imports no other job module (only jobs/pipeline.py composes jobs)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("cluster", "actors", "models", "jobs")
# What each layer may import of Helio's own packages, and which outside packages it may not.
ALLOWED = {
    "models": set(),
    "cluster": set(),
    "actors": {"models", "cluster"},
    "jobs": {"actors", "models", "cluster"},
}
FORBIDDEN_THIRD_PARTY = {"models": {"ray", "deepspeed", "transformers"}}  # peft (LoRA) is allowed


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def imported_jobs(path: Path) -> set[str]:
    """The modules of jobs/ a file imports, anywhere in it (function-level imports too): `import jobs.x`,
    `from jobs.x import y`, `from jobs import x`, a relative import inside jobs/, and
    `importlib.import_module("jobs.x")` (a name built at run time, f"jobs.{...}", shows as jobs.*)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "jobs")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level and path.parent.name == "jobs":  # relative, inside jobs/
                module = f"jobs.{module}".rstrip(".")
            if module == "jobs":
                found.update(f"jobs.{a.name}" for a in node.names)
            elif module.startswith("jobs."):
                found.add(module)
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args:
            arg = node.args[0]
            parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]  # f"jobs.{stage.job}": jobs.*
            name = "".join(v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "*"
                           for v in parts)
            if name.startswith("jobs."):
                found.add("jobs.*" if "*" in name else name)
    return found


def test_every_layer_exists():
    for layer in LAYERS:
        assert (ROOT / layer / "__init__.py").is_file(), f"{layer}/ is missing"


def test_imports_follow_the_layering():
    violations = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            roots = imported_roots(path)
            for other in set(LAYERS) - {layer} - ALLOWED[layer]:
                if other in roots:
                    violations.append(f"{path.relative_to(ROOT)} imports {other}")
            for pkg in FORBIDDEN_THIRD_PARTY.get(layer, set()) & roots:
                violations.append(f"{path.relative_to(ROOT)} imports {pkg}")
    assert not violations, "layering broken:\n" + "\n".join(violations)


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import ray\nfrom jobs.prepare import run\n")
    assert {"ray", "jobs"} <= imported_roots(bad)


COMPOSERS = ("pipeline.py", "gpu_smoke.py")  # runs of other jobs in sequence: the demo pipeline, the GPU smoke


def test_only_the_pipeline_and_the_gpu_smoke_compose_jobs():
    violations = []
    for path in sorted((ROOT / "jobs").glob("*.py")):
        if path.name in COMPOSERS:
            continue
        own = f"jobs.{path.stem}"
        others = sorted(m for m in imported_jobs(path) if m != own)
        if others:
            violations.append(f"{path.relative_to(ROOT)} imports {', '.join(others)}")
    assert not violations, "only jobs/pipeline.py and jobs/gpu_smoke.py may import other job modules:\n" + \
        "\n".join(violations)


def test_the_job_checker_sees_every_form_of_import(tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    bad = jobs / "bad.py"
    bad.write_text("import jobs.serve\n"
                   "def run():\n"
                   "    from jobs import monitor\n"
                   "    from jobs.prepare import stdlib_files\n"
                   "    from . import quantize\n"
                   "    from .finetune import fit\n"
                   "    import importlib\n"
                   "    importlib.import_module('jobs.make_tasks')\n"
                   "    importlib.import_module(f'jobs.{name}')\n")
    assert imported_jobs(bad) == {"jobs.serve", "jobs.monitor", "jobs.prepare", "jobs.quantize", "jobs.finetune",
                                  "jobs.make_tasks", "jobs.*"}
