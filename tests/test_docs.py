"""The docs hold: links resolve, the README stays short, its quickstart runs, the product speaks of itself only."""

from __future__ import annotations

import os
import re
from pathlib import Path

import PIL.Image
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_LIMIT_BYTES = 20_000
# Folders that are not the product: build outputs, caches, runs, version control.
SKIPPED_FOLDERS = {"runs", "build", "dist", "lightning_logs", "__pycache__", "node_modules"}
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)
# The shared brief outside the repository (docs/methods.md is the product's own page), and issue numbers.
OUTSIDE_REFERENCES = re.compile(r"\bMETHODS\.md|\.\./shared|(?i:\bissues?\s+#?\d+)")


def without_code_blocks(text: str) -> str:
    """The markdown with its fenced code blocks removed (their `#` lines are comments, not headings)."""
    return FENCE.sub("", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, inline markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2, ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    result = set()
    for _, heading in HEADING.findall(without_code_blocks(page.read_text())):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        result.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return result


def relative_links(page: Path) -> list[str]:
    """The links of a page that point inside the repository (not web addresses)."""
    links = LINK.findall(without_code_blocks(page.read_text()))
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link)]


def product_files() -> list[Path]:
    """Markdown, Python and YAML files of the product: all but build outputs, runs, hidden folders and this test."""
    files = []
    for folder, subfolders, names in os.walk(ROOT):
        skipped = lambda name: name.startswith(".") or name in SKIPPED_FOLDERS or name.endswith(".egg-info")
        subfolders[:] = [name for name in subfolders if not skipped(name)]
        files += [Path(folder, name) for name in names if name.endswith((".md", ".py", ".yaml", ".yml"))]
    return [file for file in files if file.resolve() != Path(__file__).resolve()]


def quickstart_code() -> str:
    """The README's first python block under its "Quickstart" heading."""
    text = README.read_text()
    section = text[text.index("\n## Quickstart") :]
    match = re.search(r"^```python\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert match, "README.md: no ```python block under the Quickstart heading"
    return match.group(1)


def test_github_slug_follows_githubs_rule():
    assert github_slug("The main job (`configs/ppap.yaml`)") == "the-main-job-configsppapyaml"
    slug = github_slug("The paper's Table 1, every expert trained 1,000 steps")
    assert slug == "the-papers-table-1-every-expert-trained-1000-steps"
    assert github_slug("Set-up: two commands") == "set-up-two-commands"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    broken = []
    for link in relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target})")
        elif anchor and (target.suffix != ".md" or anchor not in anchors(target)):
            broken.append(f"{link} (no heading #{anchor} in {target.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_readme_is_short():
    size = README.stat().st_size
    limit = f"{README_LIMIT_BYTES:,}"
    assert size <= README_LIMIT_BYTES, f"README.md is {size:,} bytes, over {limit}: results go in docs/results/"


def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch):
    (tmp_path / "assets").symlink_to(ROOT / "assets", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    code = compile(quickstart_code(), "README.md quickstart", "exec")
    exec(code, {"__name__": "__quickstart__"})  # noqa: S102 - the README's own code, run as a reader would
    written = list(tmp_path.glob("*.png"))
    assert len(written) == 1, f"the quickstart wrote {written}, expected one PNG"
    with PIL.Image.open(written[0]) as grid:
        assert grid.size[0] > grid.size[1] > 0


def test_product_names_no_outside_file_or_issue_number():
    found = []
    for file in product_files():
        for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE_REFERENCES.search(line):
                found.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "the product should speak of itself only:\n" + "\n".join(found)
