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


def reference_rows() -> dict:
    """{key: (default cell, allowed cell)} of docs/configuration.md's table."""
    rows = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        match = re.match(r"^\| `([\w.]+)` \|([^|]*)\|([^|]*)\|", line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} twice"
            rows[match.group(1)] = (match.group(2).strip(), match.group(3).strip())
    return rows


def test_configuration_reference_matches_the_defaults():
    """docs/configuration.md lists every key of config.DEFAULTS (encoder.scratch's too) with its default, and the
    ranges it states are config.RANGES'."""
    import yaml

    import config

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, prefix + key + ".")
            else:
                yield prefix + key, value
    expected = dict(leaves(config.DEFAULTS))
    expected.update({f"encoder.scratch.{k}": v for k, v in config.SCRATCH_DEFAULTS.items()})
    rows = reference_rows()
    assert sorted(rows) == sorted(expected)
    for key, (default, allowed) in rows.items():
        value = yaml.safe_load(default)
        if isinstance(expected[key], float) and isinstance(value, (str, int)):
            value = float(value)  # YAML 1.1 reads 5e-05 as a string
        if key.startswith("encoder.scratch.") and key != "encoder.scratch":
            value = int(default)
        assert value == expected[key] and type(value) is type(expected[key]), (key, default)
        if key in config.RANGES:
            low, high = config.RANGES[key]
            numbers = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", allowed)]
            assert numbers == [float(x) for x in (low, high) if x is not None], (key, allowed)
            opening = {(True, True): "(", (True, False): ">", (False, True): "[", (False, False): "≥"}
            assert allowed.startswith(opening[(key in config.OPEN_LOW, high is not None)]), (key, allowed)
            if high is not None:
                assert allowed.split(" or ")[0].endswith(")" if key in config.OPEN_HIGH else "]"), (key, allowed)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_reach_existing_files_and_headings():
    """Every relative link of README.md and docs/*.md names a file that exists and, with #anchor, a heading of it."""
    broken = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links in code blocks are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                headings = {slug(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)}
                if anchor not in headings:
                    broken.append(f"{path.name}: {target} (no such heading)")
    assert broken == []


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
