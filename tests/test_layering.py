"""DESIGN.md section 1: imports flow jobs -> actors -> models; cluster serves jobs and actors."""

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
