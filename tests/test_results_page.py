"""A table script rewrites exactly its own table of a results page, and refuses a page without its markers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# scripts/ is not a package: the module is loaded from its file.
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "results_page.py"
SPEC = importlib.util.spec_from_file_location("results_page", SCRIPT)
results_page = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(results_page)
write_between_markers = results_page.write_between_markers

PAGE = """# Results

Prose before.

<!-- sweep -->
| s | accuracy |
|---|---|
| 2 | 0.90 |
<!-- /sweep -->

<!-- other -->
kept
<!-- /other -->
"""


def test_rewrites_only_the_named_table_and_leaves_no_temporary_file(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    write_between_markers(str(page), "sweep", "| s | accuracy |\n|---|---|\n| 4 | 0.98 |\n")
    text = page.read_text()
    assert "| 4 | 0.98 |" in text and "| 2 | 0.90 |" not in text
    assert text.replace("| 4 | 0.98 |", "| 2 | 0.90 |") == PAGE
    assert [file.name for file in tmp_path.iterdir()] == ["page.md"]


def test_rewriting_with_the_same_table_changes_nothing(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    write_between_markers(str(page), "other", "kept")
    assert page.read_text() == PAGE


@pytest.mark.parametrize("marker", ["missing", "/sweep"])
def test_refuses_a_page_without_the_markers_naming_page_and_marker(tmp_path, marker):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    with pytest.raises(ValueError, match=f"page.md.*--marker.*{marker}"):
        write_between_markers(str(page), marker, "x")
    assert page.read_text() == PAGE


def test_a_long_caption_is_wrapped_and_its_table_and_code_kept_whole(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    caption = (
        "Protocol: " + "500 samples per row, the same seeds for every row; " * 8 + "- 1 = as varied as real digits."
    )
    row = "| " + " | ".join(["0.974 [0.956, 0.985]"] * 12) + " |"
    code = "```bash\npython scripts/x.py " + "--option value " * 20 + "\n```"
    write_between_markers(str(page), "sweep", f"{caption}\n\n{row}\n\n{code}")
    block = page.read_text().split("<!-- sweep -->\n")[1].split("\n<!-- /sweep -->")[0]
    prose, kept = block.split("\n\n", 1)
    assert kept == f"{row}\n\n{code}"
    assert " ".join(prose.split("\n")) == caption and all(
        len(line) <= results_page.LINE_WIDTH for line in prose.split("\n")
    )
    assert not any(line.startswith(("- ", "|")) for line in prose.split("\n")[1:]), "a continuation became a list item"
