"""README.md and docs/: Markdown structure (code fences on lines of their own, tables contiguous: header,
separator, rows with the header's cell count, no blank line splitting one), the configuration table against
config.DEFAULTS, links and section names (also those quoted in configs, scripts and sources) that reach a heading,
flags of documented commands that their scripts define, and CI running the README's commands."""
import re
from pathlib import Path

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


# ---------------------------------------------------------------- references to sections and command-line flags
def headings(path) -> set:
    """The anchors of a Markdown file's headings (those inside code blocks are not headings)."""
    text = re.sub(r"^ {0,3}```.*?^ {0,3}```", "", path.read_text(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


DOC_NAME = r"(README(?:\.md)?|(?:docs/)?[\w-]+\.md)"
SECTION_REFERENCES = [  # (pattern, group of the document, group of the section name)
    re.compile(DOC_NAME + r"(?:'s)?,?\s+(?:section\s+)?\"([^\"\n]+)\""),   # README's "X", README, "X", x.md "X"
    re.compile(DOC_NAME + r"'s\s+([A-Z][\w`()' -]*?)\s+section\b"),      # the README's X section
    re.compile(r"\(" + DOC_NAME + r",\s+([A-Z][^)\"\n]*)\)"),             # (README, X)
]
SAME_FILE_REFERENCE = re.compile(r"\bsee\s+\"([^\"\n]+)\"")              # see "X", in a Markdown file: its own


def referenced_document(name: str, source):
    """The Markdown file a reference names: README.md, or a docs/ file by its name (with or without docs/)."""
    if name.startswith("README"):
        return ROOT / "README.md"
    for candidate in (ROOT / name, ROOT / "docs" / Path(name).name, source.parent / name):
        if candidate.is_file():
            return candidate
    return None


def section_references(text: str, source) -> list:
    """[(document path or None, section name)] of the section references in `text` (of the file `source`)."""
    found = [(referenced_document(m.group(1), source), m.group(2).strip())
             for pattern in SECTION_REFERENCES for m in pattern.finditer(text)]
    if source.suffix == ".md":
        found += [(source, m.group(1)) for m in SAME_FILE_REFERENCE.finditer(text)]
    return found


def broken_section_references(text: str, source) -> list[str]:
    broken = []
    for document, name in section_references(text, source):
        if document is None:
            broken.append(f"{source.name}: {name!r} of a document that does not exist")
        elif slug(name.replace("`", "")) not in headings(document):
            broken.append(f"{source.name}: {document.name} has no section {name!r}")
    return broken


def referring_files() -> list:
    """Every file whose prose may name a section: the docs, configs, Python sources (this test's examples
    excepted), shell scripts, requirement inputs and CI."""
    files = DOCS + sorted((ROOT / "configs").glob("*.yaml")) + sorted(ROOT.glob("*.py"))
    files += sorted((ROOT / "scripts").glob("*.py")) + sorted((ROOT / "scripts").glob("*.sh"))
    files += [p for p in sorted((ROOT / "tests").glob("*.py")) if p.name != "test_docs.py"]
    return files + sorted(ROOT.glob("requirements*.in")) + [ROOT / ".ci" / "run"]


def test_quoted_section_names_exist():
    """'the README's "X"', 'see README, "X"', 'docs/weights.md "X"', 'the README's X section', '(README, X)' and, in
    a Markdown file, 'see "X"' name a heading that exists, in Markdown, YAML, Python and shell files alike."""
    broken = []
    for path in referring_files():
        broken += broken_section_references(path.read_text(), path)
    assert broken == []


def test_section_reference_checker_finds_missing_sections():
    source = ROOT / "configs" / "demo.yaml"
    assert broken_section_references('# see README, "Weights" and the README\'s "Refreshing the pins"', source) == [
        "demo.yaml: README.md has no section 'Weights'"]
    assert len(broken_section_references("(README, Configuration reference); docs/weights.md, \"Checks\"",
                                         source)) == 1
    assert len(broken_section_references("see the README's Prediction section, or the README's Output section",
                                         source)) == 1
    assert broken_section_references('docs/nothing.md "X"', source) == [
        "demo.yaml: 'X' of a document that does not exist"]


SCRIPT = r"((?:scripts/)?[\w-]+\.(?:py|sh))"
COMMAND_END = re.compile(r"\s#|[;|&]|$", re.M)  # a comment, ; | && or the line's end ends a command


def script_path(name: str):
    """The repository's script of that name (train.py, scripts/cv.py, cv.py for scripts/cv.py), or None for a
    file of another project (upstream's)."""
    for candidate in (ROOT / name, ROOT / "scripts" / Path(name).name):
        if candidate.is_file():
            return candidate
    return None


def commands(text: str) -> list[tuple[str, str]]:
    """[(script, the text after it)] of every command line that runs one of our scripts: in code blocks, lines
    (joined across trailing backslashes) holding `python SCRIPT`, `torchrun ... SCRIPT` or `bash SCRIPT`, cut
    at a comment or ; | &&; in the prose, code spans starting with a script (`python predict.py --x`,
    `predict.py --x`), and a code span of flags right after a script's span (`gpu_check.sh` (`--dry-run`))."""
    found = []
    blocks = re.findall(r"^ {0,3}```[^\n]*\n(.*?)^ {0,3}```", text, flags=re.S | re.M)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for m in re.finditer(r"(?:\bpython3?|\btorchrun\b[^;|&#]*?|\bbash)\s+" + SCRIPT + r"\b", line):
                rest = line[m.end():]
                found.append((m.group(1), rest[:COMMAND_END.search(rest).start()]))
    prose = re.sub(r"^ {0,3}```.*?^ {0,3}```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`\n]+)`", prose):
        m = re.match(r"(?:(?:python3?|bash)\s+)?(?:torchrun\s[^`]*?)?" + SCRIPT + r"(\s.*)?$", span)
        if m:
            found.append((m.group(1), m.group(2) or ""))
    for m in re.finditer(r"`(?:[^`\n]*\s)?" + SCRIPT + r"`[\s(,:]*`(--[^`\n]+)`", prose):
        found.append((m.group(1), m.group(2)))
    return found


def missing_flags(text: str, where: str) -> list[str]:
    """'where: SCRIPT --flag' for each flag a command of `text` gives one of our scripts that its source does not
    define (as the string literal "--flag" of a Python script, or anywhere in a shell script)."""
    missing = []
    for name, rest in commands(text):
        path = script_path(name)
        if path is None:
            continue
        source = path.read_text()
        for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", rest):
            defined = flag in source if path.suffix == ".sh" else re.search(rf"[\"']{flag}[\"']", source)
            if not defined:
                missing.append(f"{where}: {name} {flag}")
    return missing


def test_flags_quoted_in_the_docs_exist():
    """Every flag a README / docs command gives train.py, predict.py or a script of scripts/ is one the script
    defines (its add_argument), so no documented command fails with 'unrecognized arguments'."""
    missing = []
    for path in DOCS:
        missing += missing_flags(path.read_text(), path.name)
    assert missing == []


def test_flag_checker_finds_missing_flags():
    text = ("```bash\npython train.py --config x.yaml --set a=1 --bogus-flag   # --not-this\n"
            "torchrun --nproc_per_node=2 predict.py --fasta a.fa \\\n    --also-bogus 3 | head --lines 2\n```\n"
            "Then `predict.py --plot-dir` and `scripts/cv.py --made-up`; `bash scripts/gpu_check.sh` (`--dry-run`), "
            "`scripts/gpu_check.sh` (`--wet-run`), `python -m pytest -q --lf`, upstream's `main.py --config_path`.")
    assert missing_flags(text, "t") == ["t: train.py --bogus-flag", "t: predict.py --also-bogus",
                                        "t: scripts/cv.py --made-up", "t: scripts/gpu_check.sh --wet-run"]


def test_ci_runs_the_readme_install_and_test_commands():
    """.ci/run runs exactly the README's install command for the tests, then exactly its test command."""
    readme = (ROOT / "README.md").read_text()

    def section(title):
        return readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]

    installs = [line for block in re.findall(r"```bash\n(.*?)```", section("Install"), flags=re.S)
                for line in block.splitlines() if line.startswith("pip install -r")]
    assert installs == ["pip install -r requirements.txt", "pip install -r requirements.txt -r requirements-test.txt"]
    test_command = re.search(r"```bash\n(.*?)\n```", section("Tests"), flags=re.S).group(1)
    steps = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line and not line.startswith(("#", "set ", "cd "))]
    assert steps == [installs[1], test_command]


def test_test_only_packages_stay_out_of_the_users_install():
    """requirements.txt (what users install) holds no test runner; requirements-test.txt holds pytest and
    transformers, and every package both files pin has one version."""
    def pins(name):
        return dict(re.findall(r"^([\w.-]+)==(\S+)$", (ROOT / name).read_text(), flags=re.M))
    users, tests = pins("requirements.txt"), pins("requirements-test.txt")
    assert "pytest" not in users and "transformers" not in users
    assert {"pytest", "transformers"} <= set(tests)
    assert {name: (users[name], tests[name]) for name in set(users) & set(tests) if users[name] != tests[name]} == {}
