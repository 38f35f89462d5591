"""models/pyfuncs.py: documented functions out of source text, no Ray."""

from __future__ import annotations

import ast

import pytest

from models.pyfuncs import (comment_prompt, extract_functions, first_paragraph, in_val, module_name,
                            package_name, source_root)

SOURCE = '''\
"""Module docstring, not a function."""
import functools


def plain(x):
    """Return x doubled, for the plain case.

    A second paragraph that the record leaves out.
    """

    # a comment that stays
    return 2 * x


async def fetch(url):
    """Fetch the page at url asynchronously."""
    return await get(url)


class Box:
    """A class docstring is not a function's."""

    @functools.cache
    def method(self, y):
        """Add y to the box contents, returning the sum."""
        text = """
not indented: inside a string
"""
        return self.v + y

    class Inner:
        def deep(self):
            """Deeply nested method of an inner class."""
            return 1


def outer():
    """Build and return a closure over a counter."""
    def inner():
        """Count one more call of the closure."""
        return 1
    return inner


def undocumented():
    return 0


def short():
    """Too short."""
    return 1


def stub():
    """An abstract hook that subclasses override."""
    ...


def inline(x):
    """A docstring sharing its line with code."""; return x


if True:
    def conditional():
        """Defined inside an if block at module level."""
        return 3
'''


@pytest.fixture(scope="module")
def extracted():
    records, skipped = extract_functions(SOURCE, "pkg.mod")
    return {r["name"]: r for r in records}, skipped


def test_documented_functions_and_qualified_names(extracted):
    records, _ = extracted
    assert sorted(records) == sorted(["plain", "fetch", "Box.method", "Box.Inner.deep", "outer",
                                      "outer.<locals>.inner", "conditional"])
    for r in records.values():
        assert (r["module"], r["package"]) == ("pkg.mod", "pkg")


def test_skips_are_counted_by_reason(extracted):
    _, skipped = extracted
    assert skipped == {"no_docstring": 1, "short_docstring": 1, "empty_body": 1, "inline_docstring": 1}


def test_docstring_is_first_paragraph_on_one_line(extracted):
    records, _ = extracted
    assert records["plain"]["docstring"] == "Return x doubled, for the plain case."


def test_code_loses_its_docstring_and_parses_alone(extracted):
    records, _ = extracted
    assert records["plain"]["code"] == "def plain(x):\n    # a comment that stays\n    return 2 * x\n"
    assert records["fetch"]["code"] == "async def fetch(url):\n    return await get(url)\n"
    for r in records.values():
        assert '"""' + r["docstring"][:10] not in r["code"]
        ast.parse(r["code"])


def test_methods_are_dedented_decorators_kept_strings_untouched(extracted):
    records, _ = extracted
    code = records["Box.method"]["code"]
    assert code.startswith("@functools.cache\ndef method(self, y):\n    text = \"\"\"\nnot indented: inside a string\n")
    assert records["Box.Inner.deep"]["code"] == "def deep(self):\n    return 1\n"


def test_nested_function_code_keeps_the_inner_docstring(extracted):
    records, _ = extracted
    assert "Count one more call" in records["outer"]["code"]
    assert "Build and return" not in records["outer"]["code"]
    assert records["outer.<locals>.inner"]["code"] == "def inner():\n    return 1\n"


def test_syntax_error_is_one_skip_for_the_file():
    assert extract_functions("def broken(:\n    '''Doc string long enough.'''\n", "m") == ([], {"syntax_error": 1})
    assert extract_functions("x = 1\x00\n", "m") == ([], {"syntax_error": 1})


def test_thresholds_are_arguments():
    doc = "Returns one, for a test."
    src = f'def f():\n    """{doc}"""\n    return 1\n'
    assert extract_functions(src, "m", min_docstring_chars=len(doc) + 1)[1] == {"short_docstring": 1}
    assert extract_functions(src, "m", max_code_chars=10)[1] == {"long_code": 1}
    assert len(extract_functions(src, "m")[0]) == 1


def test_crlf_and_bom_sources():
    src = '\ufeffdef f():\r\n    """Windows line endings are fine."""\r\n    return 1\r\n'
    (record,), _ = extract_functions(src, "m")
    assert record["code"] == "def f():\n    return 1\n"


@pytest.mark.parametrize("rel, module, package", [
    ("email/utils.py", "email.utils", "email"),
    ("json/__init__.py", "json", "json"),
    ("os.py", "os", "os"),
    ("xml/etree/ElementTree.py", "xml.etree.ElementTree", "xml"),
])
def test_module_and_package_names(rel, module, package):
    assert module_name(rel) == module
    assert package_name(module) == package


def test_source_root_keeps_package_names():
    assert source_root(["/src/a/x.py", "/src/b/y.py"]) == "/src"
    assert source_root(["/src/pkg/__init__.py", "/src/pkg/sub/m.py"]) == "/src"
    assert source_root(["/src/one.py"]) == "/src"


def test_prompt_is_a_comment_block():
    prompt = comment_prompt("word " * 40)
    lines = prompt.splitlines()
    assert prompt.endswith("\n") and len(lines) > 1
    assert all(line.startswith("# ") and len(line) <= 79 for line in lines)
    assert first_paragraph("  Lead\n  line.\n\n Rest.") == "Lead line."


def test_split_is_stable_and_near_the_fraction():
    modules = [f"pkg{i}.mod" for i in range(2000)]
    val = [m for m in modules if in_val(m, 0.1)]
    assert val == [m for m in modules if in_val(m, 0.1)]
    assert 150 < len(val) < 250
    assert val != [m for m in modules if in_val(m, 0.1, seed=1)]
