"""The docs hold together: the README stays short, every relative link points to a file (and a heading, where
it names one), and every page under docs/ is reachable from the README."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, ROOT / "ARCHITECTURE.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md",
         ROOT / "targets" / "README.md", ROOT / "examples" / "js" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 300

LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def links(page: Path) -> list[str]:
    """The targets of the page's markdown links, outside code blocks and code spans."""
    text = CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    return LINK.findall(text)


def anchors(page: Path) -> set[str]:
    """GitHub's ids for the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    out = set()
    for title in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        out.add(slug)
    return out


def broken(page: Path) -> list[str]:
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            where = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest.name
            bad.append(f"{target} (no heading #{fragment} in {where})")
    return bad


def test_the_readme_fits_on_a_few_screens():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move reference material to docs/ (limit {MAX_README_LINES})"


def test_every_relative_link_points_to_a_file_and_heading():
    bad = {str(p.relative_to(ROOT)): b for p in PAGES if p.exists() and (b := broken(p))}
    assert bad == {}


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README) if not re.match(r"^[a-z]+:", t)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert missing == [], "docs pages the README does not link"


def test_the_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "x.md"
    (tmp_path / "there.md").write_text("# A `code` heading, here\n")
    page.write_text("[ok](there.md) [ok](there.md#a-code-heading-here) [ok](https://example.org/none) "
                    "`[not a link](nowhere.md)`\n```\n[not a link](nowhere.md)\n```\n"
                    "[bad](missing.md) [bad](there.md#nope)\n")
    assert broken(page) == ["missing.md (no such file)", "there.md#nope (no heading #nope in there.md)"]
