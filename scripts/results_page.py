"""Rewrites one table of a results page (docs/results/*.md): the text between `<!-- name -->` and `<!-- /name -->`.

Each table script takes `--page` (the page to rewrite; by default none, so a partial or exploratory run never
overwrites a published table) and `--marker` (the table's name on that page). The page is written to a temporary
name in its folder and renamed, so a crash never leaves it half written.
"""

from __future__ import annotations

import argparse
import os


def add_page_arguments(parser: argparse.ArgumentParser, marker: str) -> None:
    """Adds `--page` and `--marker` (default `marker`) to a table script's arguments."""
    parser.add_argument("--page", default=None, help="results page whose table to rewrite, e.g. docs/results/ppap.md")
    parser.add_argument("--marker", default=marker, help=f"the table's marker name on that page (default: {marker})")


def write_between_markers(page: str, marker: str, text: str) -> None:
    """Replaces what lies between the lines `<!-- marker -->` and `<!-- /marker -->` of `page` with `text`.

    Args:
        page (str): path of the markdown page.
        marker (str): the table's name in its markers.
        text (str): the new table, without the marker lines.

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
    updated = "\n".join([*lines[: start + 1], text.rstrip("\n"), *lines[end:]])
    temporary = f"{page}.tmp-{os.getpid()}"
    with open(temporary, "w") as file:
        file.write(updated)
    os.replace(temporary, page)
