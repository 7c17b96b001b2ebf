"""Markdown structure of README.md and docs/: code fences on lines of their own, tables contiguous
(header, separator, rows with the header's cell count; no blank line splitting one)."""
import re

import pytest
from conftest import ROOT

DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
OPEN_FENCE = re.compile(r"^ {0,3}```[\w+.-]*\s*$")
CLOSE_FENCE = re.compile(r"^ {0,3}```\s*$")
SEPARATOR = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+\s*$")


def cells(row: str) -> int:
    """Cells of a table row; pipes inside `code spans` or escaped (\\|) do not count."""
    row = re.sub(r"`[^`]*`", "", row.replace("\\|", ""))
    return row.strip().strip("|").count("|") + 1


def problems(text: str) -> list[str]:
    """Structure errors of a Markdown text, each as 'line N: what'."""
    found, in_code, table = [], False, None  # table: cell count of the table being read
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if "```" in line:
            fence = CLOSE_FENCE if in_code else OPEN_FENCE
            if not fence.match(line):
                found.append(f"line {n}: a code fence must stand on a line of its own: {line.strip()[:60]!r}")
            in_code = not in_code
            table = None
            continue
        if in_code:
            continue
        if line.startswith("|"):
            if table is None:
                following = lines[n] if n < len(lines) else ""
                if not SEPARATOR.match(following):
                    found.append(f"line {n}: table row without a header and separator above it (a table split "
                                 f"by a blank line?): {line[:60]!r}")
                    table = cells(line)
                    continue
                table = cells(line)
            elif cells(line) != table and not SEPARATOR.match(line):
                found.append(f"line {n}: {cells(line)} cells, the table's header has {table}")
        else:
            table = None
    if in_code:
        found.append("end of file: a code fence is never closed")
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_markdown_structure(path):
    assert problems(path.read_text()) == []


def test_checker_finds_the_defects_it_is_meant_for():
    good = "text\n```bash\nrun | this\n```\n| a | b |\n|---|---|\n| `x | y` | 2 |\n\nafter\n"
    assert problems(good) == []
    assert len(problems("```bash\nx\n``` `tool.py` does this\n")) == 1  # text after a closing fence
    split = "| a | b |\n|---|---|\n| 1 | 2 |\n\n| 3 | 4 |\n"
    assert [p.split(":")[0] for p in problems(split)] == ["line 5"]
    assert problems("| a | b |\n|---|---|\n| 1 | 2 | 3 |\n") == ["line 3: 3 cells, the table's header has 2"]
