"""Every relative link in README.md and docs/*.md points at a file of this repository,
and, when it names an anchor in a Markdown page, at a heading of that page (GitHub's
rule for heading ids). Moving a section from one page to another breaks links
silently; this fails instead, naming the page, the link and what is missing. Every
page under docs/ is also listed in docs/README.md (the reading order), so a new page
is not left where no operator finds it."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")])

_FENCE = re.compile(r"^(```|~~~)")
_INLINE_CODE = re.compile(r"(`+).*?\1", re.DOTALL)
# [text](target) and ![alt](target); the target ends at whitespace or ")" (an optional
# "title" after a space is ignored).
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks (links and headings there are code)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's heading id: the rendered text, lower case, punctuation but - and _ dropped,
    spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def _anchors(page: Path) -> frozenset[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for line in _prose_lines(page.read_text()):
        if match := _HEADING.match(line):
            slug = _slug(match.group(2))
            count = counts.get(slug, 0)  # a repeated heading gets -1, -2, ...
            anchors.add(f"{slug}-{count}" if count else slug)
            counts[slug] = count + 1
    return frozenset(anchors)


def _links(page: Path) -> list[str]:
    # Per paragraph, not per line: a code span may run over a line break.
    found = []
    for paragraph in re.split(r"\n\s*\n", "\n".join(_prose_lines(page.read_text()))):
        found += _LINK.findall(_INLINE_CODE.sub("", paragraph))
    return found


def _problem(page: Path, target: str) -> str | None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
        return None
    path_part, _, anchor = target.partition("#")
    dest = (page.parent / path_part).resolve() if path_part else page
    if ROOT not in dest.parents and dest != ROOT:
        return f"{target}: points outside the repository"
    if not dest.exists():
        return f"{target}: no such file"
    if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
        return f"{target}: no heading with id #{anchor} in {dest.relative_to(ROOT)}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    problems = [p for t in _links(page) if (p := _problem(page, t)) is not None]
    assert problems == [], f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_in_the_reading_order() -> None:
    index = ROOT / "docs" / "README.md"
    listed = {(index.parent / t.partition("#")[0]).resolve() for t in _links(index)}
    pages = {p.resolve() for p in (ROOT / "docs").rglob("*") if p.suffix in {".md", ".5", ".8"}}
    missing = sorted(str(p.relative_to(ROOT)) for p in pages - listed - {index.resolve()})
    assert missing == [], f"add these pages to docs/README.md: {missing}"


def test_the_checker_catches_a_broken_link(tmp_path: Path) -> None:
    # The checks above would pass vacuously if no link were ever found: make sure the
    # parser sees links (not those in code) and that a bad target is reported.
    page = ROOT / "docs" / "README.md"
    assert "install.md" in _links(page)
    assert _problem(page, "no-such-page.md") == "no-such-page.md: no such file"
    assert _problem(page, "install.md#no-such-heading") is not None
    assert _problem(page, "install.md#2-postillon-setup") is None
    assert _problem(page, "../../outside.md") is not None
    sample = tmp_path / "sample.md"
    sample.write_text("`[x](gone.md)`\n```\n[y](gone.md)\n```\n`a\nb` [z](gone.md)\n")
    assert _links(sample) == ["gone.md"]
