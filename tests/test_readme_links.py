"""The README is a front page (at most 200 lines), and every link in it and in docs/*.md resolves: a relative link to
an existing file, a `#anchor` to a heading of the page it names (GitHub's slug rules), an http(s) link well formed
(no network)."""

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a link or heading inside code is neither)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation but `-` and `_` dropped, each space a
    `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        if m := HEADING.match(line):
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    found = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        found += LINK.findall(INLINE_CODE.sub("", line))  # nor is a link inside inline code
    return found


def test_slug_follows_githubs_rules():
    assert slug("`make demo`, seeds 42, 1 and 7 (2026-12-02)") == "make-demo-seeds-42-1-and-7-2026-12-02"
    assert slug("Stages and commands") == "stages-and-commands"
    assert slug("CPU peak memory: `malloc_mmap_threshold` and huge pages") == (
        "cpu-peak-memory-malloc_mmap_threshold-and-huge-pages"
    )
    assert slug("A — B") == "a--b"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/ (at most 200)"
    head = "\n".join(lines[:15])
    assert "make demo" in head and "make test" in head  # the two commands open it


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # a URL: http(s) only, well formed
            parts = urlsplit(target)
            if parts.scheme not in ("http", "https") or not parts.netloc or " " in target:
                bad.append(f"{target}: not a well-formed http(s) URL")
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist")
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            bad.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_readme_links_the_pages_that_hold_its_detail():
    # Also proves the link finder finds links at all.
    readme = {t.partition("#")[0] for t in links(ROOT / "README.md")}
    for page in ("docs/recipes.md", "docs/memory.md", "docs/distributed.md", "docs/troubleshooting.md",
                 "docs/measurements.md"):  # fmt: skip
        assert page in readme, f"README.md does not link {page}"
