"""The README and docs/ hold together: every relative link points at a file that exists, every
`#anchor` into a markdown page names one of its headings, docs/index.md reaches every page, and the
README stays a short front page that names the commands a newcomer needs. No Ray; a second or so."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"  # [text], one level of brackets inside
    r"\(\s*<?([^()\s<>]*(?:\([^()\s]*\)[^()\s<>]*)*)>?"  # (target, balanced parentheses allowed
    r"(?:\s+[\"'(].*?[\"')])?\s*\)")  # "optional title")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
ATX_HEADING = re.compile(r"^ {0,3}#{1,6}(?:\s+(.*?))?(?:\s+#+)?\s*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(?:=+|-+)\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (fenced lines become empty, so numbering holds)."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            out.append("")
        elif fence is not None:
            closing = m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence)
            if closing and not line.strip()[len(m.group(1)):]:
                fence = None
            out.append("")
        else:
            out.append(line)
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link and image in the prose: inline, reference definitions, HTML."""
    found = []
    for n, line in enumerate(prose_lines(text), 1):
        if m := REFERENCE_DEF.match(line):
            found.append((n, m.group(1)))
            continue
        bare = INLINE_CODE.sub("", line)
        found += [(n, m.group(1)) for m in INLINE_LINK.finditer(bare)]
        found += [(n, m.group(1)) for m in HTML_LINK.finditer(bare)]
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text as rendered, lowercased, punctuation removed except
    hyphens and underscores, each space a hyphen."""
    text = INLINE_CODE.sub(lambda m: m.group(0).strip("`").strip(), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link reads as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags are not text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    lines = prose_lines(path.read_text(encoding="utf-8"))
    for i, line in enumerate(lines):
        heading = None
        if m := ATX_HEADING.match(line):
            heading = m.group(1) or ""
        elif (i + 1 < len(lines) and SETEXT_UNDERLINE.match(lines[i + 1]) and line.strip()
              and not line.lstrip().startswith(("|", "-", "*", "+", ">")) and not re.match(r"^\s*\d+[.)]\s", line)):
            heading = line.strip()
        if heading is None:
            continue
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(path: Path) -> list[str]:
    """One line per link in `path` whose file is missing, or whose #anchor names no heading there."""
    problems = []
    for n, target in links(path.read_text(encoding="utf-8")):
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue  # http(s)://, mailto: and other absolute URLs are not checked here
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / unquote(file_part)).resolve()
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{n}: {target}"
        if not dest.exists():
            problems.append(f"{where}: {dest} does not exist")
        elif anchor and dest.suffix.lower() == ".md" and dest.is_file() \
                and unquote(anchor).lower() not in anchors(dest):
            problems.append(f"{where}: no heading in {dest.name} has the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert page.exists()
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_short_front_page() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, \
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move reference material into docs/"
    for command in ("make demo", "make test-fast"):
        assert command in text, f"README.md does not mention `{command}`"
    assert re.search(r"make test(?![-\w])", text), "README.md does not mention `make test`"


def test_the_index_reaches_every_docs_page() -> None:
    index = REPO / "docs" / "index.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for _, t in links(index.read_text(encoding="utf-8"))
              if t.partition("#")[0] and not SCHEME.match(t)}
    missing = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p != index and p.resolve() not in linked]
    assert not missing, f"docs/index.md links no page for: {', '.join(missing)}"
    assert "docs/index.md" in (REPO / "README.md").read_text(encoding="utf-8")


def test_slugs_follow_github() -> None:
    assert slug("Wiring: what a stage reads") == "wiring-what-a-stage-reads"
    assert slug("Skipping, resuming and the lineage") == "skipping-resuming-and-the-lineage"
    assert slug("What `make demo` does") == "what-make-demo-does"
    assert slug("ray_cluster.yaml") == "ray_clusteryaml"
    assert slug("From the laptop to a cloud cluster") == "from-the-laptop-to-a-cloud-cluster"
    assert slug("A [linked](x.md) heading") == "a-linked-heading"


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "page.md").write_text("# Page\n\n## Two words\n\n## Two words\n", encoding="utf-8")
    (tmp_path / "a.png").write_bytes(b"")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Doc\n\n"
        "[ok](sub/page.md) [ok](sub/page.md#two-words) [ok](sub/page.md#two-words-1) [ok](#doc)\n"
        "![ok](a.png) <img src=\"a.png\"> [web](https://example.com/nowhere.md) [mail](mailto:x@y.z)\n"
        "`[in code](missing-in-code.md)`\n"
        "```\n[in a fence](missing-in-fence.md)\n```\n"
        "[gone](missing.md) [bad anchor](sub/page.md#three-words) <img src=\"missing.png\">\n"
        "[here](#nowhere)\n"
        "[ref]: sub/missing-ref.md\n",
        encoding="utf-8")
    problems = broken_links(doc)
    targets = sorted(p.split(": ")[1] for p in problems)
    expected = ["#nowhere", "missing.md", "missing.png", "sub/missing-ref.md", "sub/page.md#three-words"]
    assert targets == expected, problems
