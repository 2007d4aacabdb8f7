"""Rewrites one table of a results page (docs/results/*.md): the text between `<!-- name -->` and `<!-- /name -->`.

Each table script takes `--page` (the page to rewrite; by default none, so a partial or exploratory run never
overwrites a published table) and `--marker` (the table's name on that page). The page is written to a temporary
name in its folder and renamed, so a crash never leaves it half written.
"""

from __future__ import annotations

import argparse
import os
import re
import textwrap

# Prose lines of a written table (its caption, notes) are wrapped at this width; tables and code blocks are not.
LINE_WIDTH = 119


def add_page_arguments(parser: argparse.ArgumentParser, marker: str) -> None:
    """Adds `--page` and `--marker` (default `marker`) to a table script's arguments."""
    parser.add_argument("--page", default=None, help="results page whose table to rewrite, e.g. docs/results/ppap.md")
    parser.add_argument("--marker", default=marker, help=f"the table's marker name on that page (default: {marker})")


def wrap_prose(text: str, width: int = LINE_WIDTH) -> str:
    """`text` with every prose line longer than `width` wrapped at word boundaries, so the page stays readable as
    text; table rows, fenced code blocks, HTML comments and headings are left as they are (markdown renders the
    wrapped lines as the same paragraph or list item)."""
    lines, fence = [], None
    for line in text.split("\n"):
        opening = re.match(r"^\s*(```|~~~)", line)
        if opening:
            fence = None if fence == opening.group(1) else fence or opening.group(1)
        if fence or opening or len(line) <= width or line.lstrip().startswith(("|", "<!--", "#")):
            lines.append(line)
            continue
        indent = "  " if re.match(r"^[-*] ", line) else ""
        wrapped = textwrap.wrap(line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
        lines.append(wrapped[0])
        for part in wrapped[
            1:
        ]:  # a continuation that markdown would read as a list item, table or heading joins the line above
            if re.match(r"^\s*([-*+] |\d+[.)] |\||#|>)", part):
                lines[-1] += " " + part.strip()
            else:
                lines.append(part)
    return "\n".join(lines)


def write_between_markers(page: str, marker: str, text: str) -> None:
    """Replaces what lies between the lines `<!-- marker -->` and `<!-- /marker -->` of `page` with `text`.

    Args:
        page (str): path of the markdown page.
        marker (str): the table's name in its markers.
        text (str): the new table, without the marker lines; its prose lines are wrapped (`wrap_prose`).

    Raises:
        ValueError: if the page does not hold both marker lines exactly once, in order.
    """
    with open(page) as file:
        lines = file.read().split("\n")
    opening, closing = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if lines.count(opening) != 1 or lines.count(closing) != 1 or lines.index(opening) > lines.index(closing):
        raise ValueError(
            f"`--page` {page!r} must hold the lines {opening!r} and {closing!r} once each, in that order "
            f"(`--marker` {marker!r})."
        )
    start, end = lines.index(opening), lines.index(closing)
    updated = "\n".join([*lines[: start + 1], wrap_prose(text.rstrip("\n")), *lines[end:]])
    temporary = f"{page}.tmp-{os.getpid()}"
    with open(temporary, "w") as file:
        file.write(updated)
    os.replace(temporary, page)


def publish_table(text: str, output_dir: str, page: str | None, marker: str) -> None:
    """Writes a table script's `text` to `<output_dir>/table.md` (a temporary name, then renamed) and, when `page` is
    given (`--page`), between the `marker` lines of that results page (`write_between_markers`)."""
    path = os.path.join(output_dir, "table.md")
    with open(f"{path}.tmp", "w") as file:
        file.write(text + "\n")
    os.replace(f"{path}.tmp", path)
    if page:
        write_between_markers(page, marker, text)
