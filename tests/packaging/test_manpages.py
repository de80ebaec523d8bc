"""
The man pages packaging/manpages.py writes from the argparse parsers (shipped in the .deb).

They are checked the way lintian checks a package's pages: ``man --warnings`` must say
nothing and ``lexgrog`` must find the whatis line. Every flag the parsers accept must be
on the page, so a page cannot fall behind the command line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import agent
from agent.proxy.cli import build_parser


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "packaging" / "manpages.py"
EPOCH = 1700000000  # 2023-11-14
# How lintian runs man: anything on stderr is its manpage-has-errors-from-man tag.
MAN_ENV = {"LC_ALL": "C.UTF-8", "MANROFFSEQ": "", "MANWIDTH": "80"}


def load_script():
    spec = importlib.util.spec_from_file_location("manpages", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["manpages"] = module
    spec.loader.exec_module(module)
    return module


manpages = load_script()


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} not found: apt-get install man-db (lintian depends on it)")
    return path


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    output = tmp_path_factory.mktemp("man")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(output)],
        env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    written = {Path(line).stem: Path(line) for line in result.stdout.split()}
    assert set(written) == {"tunnel-agent", "tunnel-localproxy"}
    return written


def formatted(page: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need("man"), "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)],
        env={**os.environ, **MAN_ENV},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def displayed(page: Path) -> str:
    """The page as a reader sees it (hyphenation and justification off, so flags stay whole)."""
    result = subprocess.run(
        [need("man"), "-l", str(page)],
        env={**os.environ, **MAN_ENV, "MANWIDTH": "200"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # Without a terminal man prints plain text; \- is U+2212 and a hyphen may be U+2010 in UTF-8.
    return result.stdout.replace("\u2212", "-").replace("\u2010", "-")


def option_strings(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Every documented flag of PARSER and of each sub-command, by command name ('' for the top).

    Hidden flags (help=SUPPRESS: the agent's private channels to the proxy) are not documented.
    """

    def flags(p: argparse.ArgumentParser) -> set[str]:
        return {o for a in p._actions if a.help != argparse.SUPPRESS for o in a.option_strings}

    found = {"": flags(parser)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = flags(sub)
    return found


class TestLikeLintian:
    @pytest.mark.parametrize("name", ["tunnel-agent", "tunnel-localproxy"])
    def test_man_reports_nothing(self, pages, name):
        """The man command formats the page without a single warning."""
        result = formatted(pages[name])

        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout.strip()

    @pytest.mark.parametrize(
        ("name", "whatis"),
        [
            ("tunnel-agent", "tunnel-agent - AWS IoT Secure Tunneling device agent"),
            ("tunnel-localproxy", "tunnel-localproxy - local proxy for AWS IoT Secure Tunneling"),
        ],
    )
    def test_whatis_entry(self, pages, name, whatis):
        """The whatis line that mandb indexes (lexgrog) is the NAME line."""
        result = subprocess.run(
            [need("lexgrog"), str(pages[name])],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert result.stdout.strip() == f'{pages[name]}: "{whatis}"'

    def test_catches_a_broken_page(self, tmp_path):
        """The same man check reports a roff error, so a clean run means something."""
        broken = tmp_path / "broken.1"
        broken.write_text(".TH BROKEN 1\n.SH NAME\nbroken \\- x\n.SH X\n\\fBunterminated \\*(ZZ\n")

        result = formatted(broken)

        assert result.stderr


class TestContent:
    def test_every_flag_of_tunnel_agent_is_on_its_page(self, pages):
        """Each sub-command is a heading of its own, and every flag it accepts is listed."""
        from agent.cli import build_parser

        text = displayed(pages["tunnel-agent"])
        missing = [
            (command, flag)
            for command, flags in option_strings(build_parser()).items()
            for flag in sorted(flags)
            if flag not in text
        ]
        commands = option_strings(build_parser()).keys() - {""}

        assert missing == []
        assert {"run", "check-config", "status", "version"} <= commands
        for command in commands:
            assert re.search(rf"^ {{3}}tunnel-agent {command}$", text, re.MULTILINE), command

    def test_every_flag_of_tunnel_localproxy_is_on_its_page(self, pages):
        """Every flag and each choice list of the local proxy is listed."""
        text = displayed(pages["tunnel-localproxy"])
        flags = option_strings(build_parser())[""]

        assert sorted(f for f in flags if f not in text) == []
        assert "{V1,V2,V3}" in text
        assert "AWSIOT_TUNNEL_ACCESS_TOKEN" in text

    def test_header_has_the_version_and_the_source_date(self, pages):
        """.TH carries SOURCE_DATE_EPOCH's date and the package version: a build repeats."""
        header = next(
            line
            for line in pages["tunnel-agent"].read_text().splitlines()
            if line.startswith(".TH")
        )

        assert header == (
            f'.TH TUNNEL\\-AGENT 1 "2023-11-14" "iot\\-tunnel\\-agent {agent.__version__}" '
            '"User Commands"'
        )

    def test_sections_argparse_does_not_know(self, pages):
        """Exit status, files and environment are documented on the agent's page."""
        text = displayed(pages["tunnel-agent"])

        for heading in ("EXIT STATUS", "FILES", "ENVIRONMENT", "SEE ALSO"):
            assert re.search(rf"^{heading}$", text, re.MULTILINE), heading
        assert "/etc/iot-tunnel-agent/environment" in text
        assert re.search(r"^\s+78\s+Configuration error \(EX_CONFIG\)", text, re.MULTILINE)


class TestEscaping:
    @pytest.mark.parametrize(
        ("text", "roff"),
        [
            (".hidden request", "\\&.hidden request"),
            ("'quoted", "\\&'quoted"),
            ("a\\b", "a\\eb"),
            ("line one\n.two", "line one\n\\&.two"),
        ],
    )
    def test_text_cannot_become_a_request(self, text, roff):
        """Help text starting with . or ' is escaped, backslashes are printed."""
        assert manpages._text(text) == roff

    def test_option_hyphens_are_minus_signs(self):
        """Flags are written with minus signs, so that they can be searched and copied."""
        assert manpages._option("--no-tls") == "\\-\\-no\\-tls"
