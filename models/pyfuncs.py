"""Documented Python functions, pulled out of source text: the raw material of the demo tasks.

Every function and method (sync or async, nested too) that has a docstring
becomes one record: its module, top-level package, qualified name, the first
paragraph of its docstring and its code with the docstring removed. The pair
is what the finetuning tasks are made of (docstring -> code instructions,
code -> package classification, docstring <-> code retrieval), so the code a
record holds is source that parses on its own and never repeats its docstring.

Standard library only (`ast`): no Ray, testable on a string.
"""

from __future__ import annotations

import ast
import hashlib
import posixpath
import re
import textwrap
import warnings
from typing import Iterator

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_PARAGRAPH = re.compile(r"\n\s*\n")
_INDENT = re.compile(r"[ \t\f]*")


def module_name(rel_path: str) -> str:
    """'email/utils.py' -> 'email.utils'; 'json/__init__.py' -> 'json'; 'os.py' -> 'os'."""
    parts = rel_path.replace("\\", "/").removesuffix(".py").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def package_name(module: str) -> str:
    """The top-level package a module belongs to (a top-level module is its own package)."""
    return module.split(".", 1)[0]


def source_root(paths: list[str]) -> str:
    """The folder module names are taken relative to: the files' common folder,
    moved up past any package folder (one holding an `__init__.py` among `paths`)
    so that a package keeps its own name in its modules' names."""
    root = posixpath.commonpath([posixpath.dirname(p) for p in paths])
    names = set(paths)
    while posixpath.join(root, "__init__.py") in names and posixpath.dirname(root) != root:
        root = posixpath.dirname(root)
    return root


def first_paragraph(docstring: str) -> str:
    """The summary of a cleaned docstring: its first paragraph on one line."""
    return " ".join(_PARAGRAPH.split(docstring.strip(), maxsplit=1)[0].split())


def comment_prompt(docstring: str, width: int = 79) -> str:
    """The SFT prompt: the docstring as a block of `# ` comment lines, each ending in a newline.

    A comment rather than a natural-language instruction keeps `prompt + response`
    a valid Python snippet, which a model pretrained on source continues naturally.
    """
    lines = textwrap.wrap(docstring, width - 2, break_long_words=False, break_on_hyphens=False) or [""]
    return "".join(f"# {line}\n" for line in lines)


def in_val(module: str, fraction: float, seed: int = 0) -> bool:
    """Whether a whole module goes to the validation split: a stable hash, never the visiting order."""
    digest = hashlib.sha1(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def extract_functions(
    source: str, module: str, min_docstring_chars: int = 20, max_code_chars: int = 1500
) -> tuple[list[dict], dict[str, int]]:
    """Records of the documented functions of one file, and the functions skipped, by reason.

    A file that does not parse is counted once as `syntax_error`. Skipped
    functions: `no_docstring`, `short_docstring` (first paragraph shorter than
    `min_docstring_chars`), `empty_body` (nothing but the docstring, `pass` or
    `...`), `inline_docstring` (shares a line with other code, cannot be cut
    out cleanly), `long_code` (more than `max_code_chars` once the docstring is
    removed) and `unparsable_code` (the cut-out code does not parse alone).
    """
    source = source.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    try:
        with warnings.catch_warnings():  # invalid escapes in old code warn; they still parse
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return [], {"syntax_error": 1}
    lines = source.split("\n")
    records: list[dict] = []
    skipped: dict[str, int] = {}
    for node, name in _functions(tree, ""):
        docstring = ast.get_docstring(node, clean=True)
        if docstring is None:
            reason = "no_docstring"
        elif len(summary := first_paragraph(docstring)) < min_docstring_chars:
            reason = "short_docstring"
        elif all(_is_trivial(s) for s in node.body[1:]):
            reason = "empty_body"
        elif (code := _code_without_docstring(node, lines)) is None:
            reason = "inline_docstring"
        elif len(code) > max_code_chars:
            reason = "long_code"
        elif not _parses(code):
            reason = "unparsable_code"
        else:
            records.append({"module": module, "package": package_name(module), "name": name,
                            "docstring": summary, "code": code})
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    return records, skipped


def _functions(node: ast.AST, prefix: str) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]]:
    """Every function below `node` with its qualified name, as `__qualname__` spells it."""
    for child in _statements(node):
        if isinstance(child, _FUNCTIONS):
            yield child, prefix + child.name
            yield from _functions(child, f"{prefix}{child.name}.<locals>.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")
        else:  # if / try / with / for / match blocks keep the enclosing scope
            yield from _functions(child, prefix)


def _statements(node: ast.AST) -> Iterator[ast.AST]:
    """Direct child statements (and except / case clauses); defs never live in expressions."""
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        value = getattr(node, field, None)
        if isinstance(value, list):
            yield from value


def _is_trivial(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Pass):
        return True
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis


def _code_without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """The function's source (decorators included), dedented, its docstring lines cut out.

    None when the docstring shares a line with other code. Blank lines right
    after the docstring go with it. Only the def line's own indentation is
    removed, so a multi-line string inside the body keeps its text.
    """
    doc = node.body[0]
    first, last = lines[doc.lineno - 1].encode(), lines[doc.end_lineno - 1].encode()  # col offsets count UTF-8 bytes
    after = last[doc.end_col_offset:].strip()
    if first[: doc.col_offset].strip() or (after and not after.startswith(b"#")):
        return None
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    head = lines[start - 1 : doc.lineno - 1]
    tail = lines[doc.end_lineno : node.end_lineno]
    while tail and not tail[0].strip():
        tail.pop(0)
    indent = _INDENT.match(lines[node.lineno - 1]).group()
    return "\n".join(_dedent(ln, indent) for ln in head + tail) + "\n"


def _dedent(line: str, indent: str) -> str:
    if line.startswith(indent):
        return line[len(indent):]
    return line if line.strip() else ""  # a shorter line is inside a string (kept) or blank


def _parses(code: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True
