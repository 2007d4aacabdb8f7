"""The docs hold: links resolve, the README stays short, its quickstart runs, the product speaks of itself only."""

from __future__ import annotations

import importlib
import os
import re
import shlex
from pathlib import Path

import PIL.Image
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ASSET_CARDS = sorted((ROOT / "assets").rglob("README.md"))
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md")), *ASSET_CARDS]
ASSETS_PAGE = ROOT / "docs" / "results" / "assets.md"
RESULTS = ROOT / "docs" / "results"
# Results pages say what a table shows; how a target fared, or what an older protocol measured, is not a result.
BOOKKEEPING = re.compile(r"target met|target missed|former reference", re.IGNORECASE)
README_LIMIT_BYTES = 20_000
# A prose line of docs/ longer than this is a wall of text in any editor or diff; tables and code blocks may run on.
PROSE_LINE_LIMIT = 200
# The README's sample grid: a few KB, committed under docs/.
README_IMAGE_LIMIT_BYTES = 16_000
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


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table of a markdown text outside code blocks, as rows of stripped cells (header first, rule dropped)."""
    tables, rows = [], []
    for line in [*without_code_blocks(text).splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                rows.append(cells)
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def test_every_shipped_model_has_a_card_with_licence_and_recipe():
    folders = sorted(path.parent for path in (ROOT / "assets").rglob("config.json") if path.parent.name != "unet")
    folders = [folder for folder in folders if folder.name not in ("scheduler", "vae")]
    missing = [str(folder.relative_to(ROOT)) for folder in folders if not (folder / "README.md").is_file()]
    assert not missing, f"shipped models without a README.md card: {missing}"
    for card in ASSET_CARDS:
        text = card.read_text()
        name = card.relative_to(ROOT)
        assert "More Information Needed" not in text, f"{name}: a placeholder of the hub's default card"
        assert re.search(r"^license: apache-2\.0$", text, re.MULTILINE), f"{name}: no licence in its metadata"
        assert re.search(r"configs/pretrain/\w+\.yaml", text), f"{name}: names no configs/pretrain/ recipe"


def test_asset_cards_quote_their_rows_of_the_assets_page_as_measured():
    """A card's numbers are rows of docs/results/assets.md (written by scripts/measure_assets.py), cell for cell."""
    measured = {
        (tuple(table[0]), tuple(row)) for table in markdown_tables(ASSETS_PAGE.read_text()) for row in table[1:]
    }
    stale = [
        f"{card.relative_to(ROOT)}: the row {' | '.join(row)} is not in docs/results/assets.md"
        for card in ASSET_CARDS
        for table in markdown_tables(card.read_text())
        for row in table[1:]
        if (tuple(table[0]), tuple(row)) not in measured
    ]
    assert not stale, "\n".join(stale)


def test_a_saved_model_writes_a_card_without_placeholders(tmp_path):
    from plugguide.models import TimmClassifier

    model_kwargs = {"layers": [1, 1, 1, 1], "channels": [4, 4, 4, 4], "stem_width": 4}
    TimmClassifier("resnet18", model_kwargs=model_kwargs).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "More Information Needed" not in card and "license: apache-2.0" in card


def readme_table_one_rows() -> dict[str, dict[str, str]]:
    """The README's rows of the paper's Table 1: each row's name and its `--setting value` flags."""
    text = README.read_text()
    section = text[text.index("The rows of the paper's Table 1") :]
    rows = {}
    for name, command in markdown_tables(section)[0][1:]:
        tokens = shlex.split(command.strip("`"))
        rows[name] = dict(zip(tokens[::2], tokens[1::2]))
    return rows


def test_readme_table_one_flags_are_the_settings_the_table_script_trains(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    script = importlib.import_module("ppap_table")
    config = yaml.safe_load((ROOT / "configs" / "ppap.yaml").read_text())
    trained = {name: spec for name, spec in script.ROWS["table"].items() if spec is not None}
    rows = readme_table_one_rows()
    assert sorted(rows) == sorted(trained), "the README's Table 1 rows are not the script's trained rows"
    for name, flags in rows.items():
        spec = trained[name]
        model = {**config["model"]["init_args"]}
        model |= {key.removeprefix("--model."): value for key, value in flags.items() if key.startswith("--model.")}
        for key in ("num_experts", "finetune", "supervision", "per_expert_head", "expert_schedule"):
            expected = spec.get(key, config["model"]["init_args"][key])
            assert str(model[key]).lower() == str(expected).lower(), f"README row {name!r}: {key} is not the script's"
        steps = int(flags.get("--trainer.max_steps", config["trainer"]["max_steps"]))
        assert steps == spec["num_experts"] * script.STEPS_PER_EXPERT, f"README row {name!r}: steps per expert"
        if spec["finetune"] == "full":
            lr = float(flags.get("--model.optimizer.init_args.lr", "nan"))
            assert lr == script.FULL_FINETUNE_OPTIMIZER["init_args"]["lr"], f"README row {name!r}: learning rate"
        labels = spec["supervision"] == "labels"
        assert (flags.get("--data") == "plugguide.datamodules.DigitsDataModule") == labels, (
            f"README row {name!r}: data"
        )
        if not labels:
            assert config["data"]["init_args"]["num_images"] == spec["num_images"], f"README row {name!r}: images"


def long_prose_lines(page: Path, limit: int = PROSE_LINE_LIMIT) -> list[str]:
    """`page:line (N characters): start` for every line over `limit` outside tables and fenced code blocks."""
    found, fence = [], None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        opening = re.match(r"^\s*(```|~~~)", line)
        if opening:
            fence = None if fence == opening.group(1) else fence or opening.group(1)
        elif not fence and not line.lstrip().startswith("|") and len(line) > limit:
            name = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name
            found.append(f"{name}:{number} ({len(line)} characters): {line[:60]}...")
    return found


def test_no_prose_line_in_docs_runs_over_200_characters():
    found = [entry for page in sorted((ROOT / "docs").rglob("*.md")) for entry in long_prose_lines(page)]
    assert not found, f"prose lines over {PROSE_LINE_LIMIT} characters (wrap them):\n" + "\n".join(found)


def test_long_prose_lines_are_found_outside_tables_and_code_only(tmp_path):
    page = tmp_path / "probe.md"
    page.write_text("x" * 201 + "\n| " + "y" * 300 + " |\n```\n" + "z" * 300 + "\n```\n- " + "w " * 101)
    assert [entry.split(" (")[0] for entry in long_prose_lines(page)] == ["probe.md:1", "probe.md:6"]


def unlisted_results_pages(folder: Path = RESULTS) -> list[str]:
    """The pages of a results folder that its index, the folder's README.md, does not link."""
    listed = {link.split("#")[0] for link in relative_links(folder / "README.md")}
    return sorted(page.name for page in folder.glob("*.md") if page.name != "README.md" and page.name not in listed)


def bookkeeping_lines(page: Path) -> list[str]:
    """`page:line: text` for every line of `page` that keeps target bookkeeping or a former reference."""
    lines = page.read_text().splitlines()
    return [
        f"{page.name}:{number}: {line.strip()[:80]}"
        for number, line in enumerate(lines, 1)
        if BOOKKEEPING.search(line)
    ]


def test_results_index_lists_every_results_page():
    assert not unlisted_results_pages(), f"docs/results/README.md does not list: {unlisted_results_pages()}"


def test_unlisted_results_pages_are_found(tmp_path):
    (tmp_path / "README.md").write_text("| [a.md](a.md) | one |\n\n[b](b.md#section)\n\n```\n[c](c.md)\n```\n")
    for name in ("a.md", "b.md", "c.md"):
        (tmp_path / name).write_text("# page\n")
    assert unlisted_results_pages(tmp_path) == ["c.md"]


def test_no_results_page_keeps_target_bookkeeping_or_former_references():
    found = [entry for page in sorted(RESULTS.glob("*.md")) for entry in bookkeeping_lines(page)]
    assert not found, "results pages state results only:\n" + "\n".join(found)


def test_bookkeeping_lines_are_found_in_any_case(tmp_path):
    page = tmp_path / "probe.md"
    page.write_text(
        "FID 5.9.\nTarget met: 0.97.\nUnder the Former Reference it read 2.6.\nno target missed here either\n"
    )
    assert [entry.split(":")[1] for entry in bookkeeping_lines(page)] == ["2", "3", "4"]


def test_readme_shows_its_sample_grid_near_the_top():
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+\.png)\)", without_code_blocks(README.read_text())[:1000])
    assert images, "README.md: no PNG image linked near the top"
    path = ROOT / images[0]
    assert path.is_file() and path.is_relative_to(ROOT / "docs"), (
        f"README.md links {images[0]}, not a file under docs/"
    )
    assert path.stat().st_size <= README_IMAGE_LIMIT_BYTES, f"{images[0]} is {path.stat().st_size:,} bytes"
    with PIL.Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 64
