"""The docs hold together: every result quoted in README.md and docs/*.md points to a row of
docs/RESULTS.md's table of current numbers, the tables render, and relative links resolve.

    pytest tests/test_docs.py
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "RESULTS.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("*/*.md"))]
COLUMNS = ["ID", "Measure", "Value (median)", "Spread", "Command", "Commit", "Date"]
ROW_LINK = re.compile(r"\[(R\d+)(?:-(R\d+))?\]\(([^)#]*RESULTS\.md)#current\)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def cells(line: str) -> list[str]:
    """A markdown table line's cells; pipes inside backticks do not split (`a|b`)."""
    text = re.sub(r"`[^`]*`", lambda m: m.group(0).replace("|", "\0"), line.strip())
    return [c.strip().replace("\0", "|") for c in text.strip("|").split("|")]


def prose(page: Path) -> str:
    """A page without its code blocks and inline code (examples there are not links)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return re.sub(r"`[^`]*`", "", text)


def current_rows() -> dict[str, list[str]]:
    lines = RESULTS.read_text().splitlines()
    start = lines.index("## Current")
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("| ID |"))
    assert cells(lines[header]) == COLUMNS
    rows = {}
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        row = cells(line)
        rows[row[0]] = row
    return rows


def test_current_table_opens_results_and_every_row_is_complete() -> None:
    text = RESULTS.read_text()
    assert text.index("## Current") < 300, "the table of current numbers must open docs/RESULTS.md"
    rows = current_rows()
    assert list(rows) == [f"R{i}" for i in range(1, len(rows) + 1)], "IDs run R1, R2, ... in order"
    for rid, row in rows.items():
        assert len(row) == len(COLUMNS), rid
        measure, value, spread, command, commit, date = row[1:]
        assert measure and value and spread, rid
        assert command.strip(), f"{rid}: no command"
        assert re.fullmatch(r"[0-9a-f]{7}(, [0-9a-f]{7})*", commit), f"{rid}: commit {commit!r}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", date), f"{rid}: date {date!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_row_links_name_existing_rows(page: Path) -> None:
    rows = current_rows()
    for m in ROW_LINK.finditer(prose(page)):
        for rid in filter(None, m.group(1, 2)):
            assert rid in rows, f"{page.name} links {rid}, which docs/RESULTS.md does not have"
        assert (page.parent / m.group(3)).resolve() == RESULTS, f"{page.name}: {m.group(0)} points elsewhere"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_have_one_column_count(page: Path) -> None:
    table: list[tuple[int, int]] = []
    in_code = False
    for n, line in enumerate([*page.read_text().splitlines(), ""], 1):
        in_code ^= line.startswith("```")
        if not in_code and line.startswith("|"):
            table.append((n, len(cells(line))))
            continue
        if table:
            widths = {w for _, w in table}
            assert len(widths) == 1, f"{page.name}: table at line {table[0][0]} has rows of {sorted(widths)} cells"
            table = []


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    heads = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path) if path else page
        assert dest.exists(), f"{page.name}: link to {target} does not resolve"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: {dest.name} has no heading for #{anchor}"
