"""
Comments and docstrings cite only the repository's own documents, by sections that exist.

Every ``§`` in the scanned trees must follow ``docs/protocol.md`` or ``docs/architecture.md``
and name a heading of that document (``## N.`` or ``### N.M``). Public standards cited by
their own numbering (RFC 6455, MQTT 5.0, Debian policy) are the only other form allowed.
"""

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("agent", "tests", "packaging", "systemd", "config")
SCANNED_FILES = ("Makefile", "pyproject.toml")
DOCUMENTS = ("docs/protocol.md", "docs/architecture.md")

# A cited section: "docs/protocol.md §5" or "docs/architecture.md §5.1".
CITATION = re.compile(r"(docs/(?:protocol|architecture)\.md) §(\d+(?:\.\d+)?)")
# Public standards keep their own section numbers.
STANDARD = re.compile(r"(?:RFC \d+|OASIS MQTT 5\.0|Debian policy) §\d+(?:\.\d+)*")
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", re.MULTILINE)


def headings(document: str) -> set[str]:
    """Return the section numbers of a document's ``##`` and ``###`` headings."""
    text = (ROOT / document).read_text(encoding="utf-8")
    return set(HEADING.findall(text))


def scanned_files() -> list[Path]:
    """Return every text file under the scanned trees (this file excepted), and the top files."""
    this = Path(__file__).resolve()
    files = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or path == this or "__pycache__" in path.parts:
                continue
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            files.append(path)
    return files + [ROOT / name for name in SCANNED_FILES]


def line_problems(line: str, sections: dict[str, set[str]]) -> list[str]:
    """Return one message per stray ``§`` or unknown section in one line."""
    found = []
    for match in CITATION.finditer(line):
        document, section = match.groups()
        if section not in sections[document]:
            found.append(f"{document} has no section {section}")
    if "§" in STANDARD.sub("", CITATION.sub("", line)):
        found.append(f"citation outside docs/: {line.strip()}")
    return found


def problems(path: Path, sections: dict[str, set[str]]) -> list[str]:
    """Return ``file:line: message`` for every problem in ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [
        f"{path.relative_to(ROOT)}:{number}: {message}"
        for number, line in enumerate(lines, start=1)
        for message in line_problems(line, sections)
    ]


class TestCitations:
    def test_headings_parse(self):
        """Both documents yield their numbered headings (else every check would pass)."""
        protocol, architecture = (headings(document) for document in DOCUMENTS)
        assert {"1", "5.5", "17.4", "19"} <= protocol
        assert {"2.3", "5.1", "5.2", "7.4"} <= architecture

    def test_files_are_scanned(self):
        """The scan reaches Python and non-Python files in every tree."""
        files = {path.relative_to(ROOT).parts[0] for path in scanned_files()}
        assert files == set(SCANNED) | set(SCANNED_FILES)

    def test_every_citation_is_to_docs_and_exists(self):
        """No comment cites a document outside docs/, or a section docs/ does not have."""
        sections = {document: headings(document) for document in DOCUMENTS}
        found = [line for path in scanned_files() for line in problems(path, sections)]
        assert found == []

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            ("# see docs/protocol.md §5.5", []),
            ("# see docs/protocol.md §5.9", ["docs/protocol.md has no section 5.9"]),
            ("# see docs/architecture.md §20", ["docs/architecture.md has no section 20"]),
            ("# (data-plane §4)", ["citation outside docs/"]),
            ("# STYLE §6", ["citation outside docs/"]),
            ("# bare §3 pattern", ["citation outside docs/"]),
            ("# masked (RFC 6455 §5.3)", []),
        ],
    )
    def test_checker_catches(self, line, expected):
        """The checker flags stray and unknown citations and accepts valid ones."""
        sections = {document: headings(document) for document in DOCUMENTS}
        found = line_problems(line, sections)
        assert len(found) == len(expected)
        assert all(
            message.startswith(prefix) for message, prefix in zip(found, expected, strict=True)
        )
