"""Every relative link in the user documentation resolves: README.md, BENCHMARKS.md
and docs/*.md point to files that exist and, where a link names an anchor
(``page.md#section``), to a heading that page has.

Why: the README is short and sends users to docs/ pages for the rest; a link
that breaks when a page or heading is renamed would lose a fact without anyone
noticing. Anchors are made as GitHub makes them (lower case, punctuation
dropped, spaces to hyphens, ``-1``, ``-2`` for repeats). Links inside code
blocks and inline code are not links; web addresses are not checked here
(no network in the suite)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from repo_paths import REPO

PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose(text: str) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code removed."""
    out, fence = [], None
    for line in text.splitlines():
        stripped = line.lstrip()
        marker = stripped[:3]
        if marker in ("```", "~~~"):
            fence = None if fence == marker else (fence or marker)
            out.append("")
            continue
        out.append("" if fence else re.sub(r"`+[^`]*`+", "", line))
    return out


def _slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in _prose_with_code_headings(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = _slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    found |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", path.read_text(encoding="utf-8")))
    return found


def _prose_with_code_headings(text: str) -> list[str]:
    """Lines outside fenced blocks, inline code kept (headings keep their code spans' text)."""
    out, fence = [], None
    for line in text.splitlines():
        marker = line.lstrip()[:3]
        if marker in ("```", "~~~"):
            fence = None if fence == marker else (fence or marker)
            continue
        if not fence:
            out.append(line)
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    for lineno, line in enumerate(_prose(path.read_text(encoding="utf-8")), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):   # http:, https:, mailto:, file:
                continue
            file_part, _, anchor = target.partition("#")
            dest = path if not file_part else (path.parent / file_part).resolve()
            where = f"{path.relative_to(REPO)}:{lineno}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert page.exists()
    assert broken_links(page) == []


def test_the_readme_sends_users_to_every_docs_page():
    """Every docs/ page is reachable from the README, directly or through a page it links."""
    reachable, todo = set(), [REPO / "README.md"]
    while todo:
        page = todo.pop()
        if page in reachable or page.suffix != ".md" or not page.exists():
            continue
        reachable.add(page)
        for line in _prose(page.read_text(encoding="utf-8")):
            for target in LINK.findall(line):
                file_part = target.partition("#")[0]
                if file_part and not re.match(r"^[a-z][a-z0-9+.-]*:", file_part, re.I):
                    todo.append((page.parent / file_part).resolve())
    missing = [str(p.relative_to(REPO)) for p in PAGES if p not in reachable]
    assert missing == []


def test_the_checker_finds_a_broken_file_and_a_broken_anchor(tmp_path, monkeypatch):
    """The check can fail: a missing file and a missing heading are both reported."""
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    (tmp_path / "other.md").write_text("# A heading: with `code`\n\n## Repeat\n\n## Repeat\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading-with-code) [ok2](other.md#repeat-1) [bad](missing.md)\n"
                    "[bad anchor](other.md#nowhere) `[not a link](missing.md)` [web](https://example.org)\n"
                    "```\n[in code](missing.md)\n```\n")
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert "missing.md: no such file" in problems[0]
    assert "#nowhere" in problems[1]
