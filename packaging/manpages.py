#!/usr/bin/env python3
"""
Write the man pages tunnel-agent(1) and tunnel-localproxy(1) from their argparse parsers.

Run at build time by an interpreter that can import the agent (packaging/debian/build.sh
uses the package's own virtualenv), so that every flag, choice and help text on the page
is the one the command accepts: ``python packaging/manpages.py OUTPUT_DIR``. The
sections argparse knows nothing about (exit status, files, environment) are written
here. Standard library only: a build-time tool, never a runtime dependency.

The date on the pages is ``SOURCE_DATE_EPOCH`` (default: today), so a build repeats.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


__all__ = ["PAGES", "Page", "main", "render"]


@dataclass(frozen=True)
class Page:
    """One man page: the program, where its parser comes from, and the sections added."""

    name: str
    #: "module:function" returning the program's argparse.ArgumentParser.
    parser: str
    summary: str
    synopsis: str
    extra: tuple[tuple[str, str], ...] = field(default=())


AGENT_EXTRA = (
    (
        "ENVIRONMENT",
        (
            "Every setting of the configuration file can be given as an environment variable "
            "TUNNEL_AGENT_<SECTION>__<FIELD> (for example TUNNEL_AGENT_MQTT__PORT=8883, "
            "TUNNEL_AGENT_SERVICES='{\"SSH\": 22}') or as the flag listed above; a flag "
            "overrides the environment, which overrides the file. TUNNEL_AGENT_CONFIG names "
            "the configuration file. Under systemd the unit reads variables from "
            "/etc/iot-tunnel-agent/environment (mode 0600): the place for secrets such as "
            "an outbound proxy with credentials (TUNNEL_AGENT_MQTT__HTTP_PROXY)."
        ),
    ),
    (
        "FILES",
        (
            ".TP\n/etc/iot-tunnel-agent/config.toml\nThe configuration (thing name, MQTT endpoint, "
            "device certificate and key, the services a tunnel may reach).\n"
            ".TP\n/etc/iot-tunnel-agent/environment\nEnvironment of the systemd unit, "
            "read by systemd as root; created by the package (comments only), mode 0600."
        ),
    ),
    (
        "EXIT STATUS",
        (
            ".TP\n0\nStopped on request.\n.TP\n1\nRuntime failure.\n.TP\n2\nUsage error.\n"
            ".TP\n78\nConfiguration error (EX_CONFIG): the unit does not restart the agent."
        ),
    ),
    ("SEE ALSO", "tunnel\\-localproxy(1), /usr/share/doc/iot\\-tunnel\\-agent/README.md.gz"),
)

LOCALPROXY_EXTRA = (
    (
        "EXIT STATUS",
        (
            "0 when the tunnel ends (closed, expired, or the token is refused); "
            "1 on a usage or mapping error or when the service cannot be reached."
        ),
    ),
    ("SEE ALSO", "tunnel\\-agent(1)"),
)

PAGES = (
    Page(
        name="tunnel-agent",
        # The parser factory of agent/cli.py (the `tunnel-agent` console script).
        parser="agent.cli:build_parser",
        summary="AWS IoT Secure Tunneling device agent",
        synopsis="[\\fB\\-\\-version\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        extra=AGENT_EXTRA,
    ),
    Page(
        name="tunnel-localproxy",
        parser="agent.proxy.cli:build_parser",
        summary="local proxy for AWS IoT Secure Tunneling",
        synopsis="[\\fIOPTIONS\\fR]",
        extra=LOCALPROXY_EXTRA,
    ),
)


_DEFAULT_GROUPS = {"options", "optional arguments", "positional arguments"}


def _text(value: str) -> str:
    """Escape running text for roff: backslashes, and a leading control character."""
    lines = value.replace("\\", "\\e").splitlines() or [""]
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in lines)


def _option(value: str) -> str:
    """An option or command name: its hyphens are minus signs (searchable, copyable)."""
    return _text(value).replace("-", "\\-")


def _invocation(formatter: argparse.HelpFormatter, action: argparse.Action) -> str:
    if not action.option_strings:
        metavar = formatter._metavar_formatter(action, action.dest)(1)[0]  # noqa: SLF001
        return f"\\fI{_text(metavar)}\\fR"
    parts = []
    for option in action.option_strings:
        part = f"\\fB{_option(option)}\\fR"
        if action.nargs != 0:
            default = action.dest.upper()
            metavar = formatter._format_args(action, default)  # noqa: SLF001
            part += f" \\fI{_text(metavar)}\\fR"
        parts.append(part)
    return ", ".join(parts)


def _help(formatter: argparse.HelpFormatter, action: argparse.Action) -> str:
    if not action.help:
        return ""
    return _text(formatter._expand_help(action))  # noqa: SLF001


def _actions(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's options, group by group, as .TP paragraphs (sub-commands excluded)."""
    formatter = parser._get_formatter()  # noqa: SLF001
    out: list[str] = []
    for group in parser._action_groups:  # noqa: SLF001
        actions = [
            action
            for action in group._group_actions  # noqa: SLF001
            if action.help != argparse.SUPPRESS
            and not isinstance(action, argparse._SubParsersAction)  # noqa: SLF001
        ]
        if not actions:
            continue
        # argparse's own groups need no heading; the program's groups are named.
        if group.title not in _DEFAULT_GROUPS:
            out.append(f".PP\n\\fI{_text(group.title or '')}\\fR")
        if group.description:
            out.append(_text(group.description))
        out.extend(
            f".TP\n{_invocation(formatter, action)}\n{_help(formatter, action)}"
            for action in actions
        )
    return out


def _subcommands(page: Page, parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:  # noqa: SLF001
        if not isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}  # noqa: SLF001
        for name, sub in action.choices.items():
            out.append(f'.SS "{_option(page.name)} {_option(name)}"')
            out.append(_text(helps.get(name, "")))
            if sub.description and sub.description != helps.get(name):
                out.append(f".PP\n{_text(sub.description)}")
            out.extend(_actions(sub))
    return out


def render(page: Page, *, version: str, date: dt.date) -> str:
    """
    Render PAGE as a man(7) page.

    Args:
        page: What to render.
        version: The package version for the footer.
        date: The page's date.

    Returns:
        The roff source.
    """
    module_name, function = page.parser.split(":")
    parser: argparse.ArgumentParser = getattr(importlib.import_module(module_name), function)()
    title = page.name.upper().replace("-", "\\-")
    lines = [
        f'.\\" Generated by packaging/manpages.py from {page.parser}; do not edit.',
        f'.TH {title} 1 "{date.isoformat()}" "iot\\-tunnel\\-agent {version}" "User Commands"',
        ".SH NAME",
        f"{_option(page.name)} \\- {_text(page.summary)}",
        ".SH SYNOPSIS",
        f".B {_option(page.name)}\n{page.synopsis}",
        ".SH DESCRIPTION",
        _text(parser.description or page.summary),
    ]
    commands = _subcommands(page, parser)
    if commands:
        lines += [".SH COMMANDS", *commands]
    options = _actions(parser)
    if options:
        lines += [".SH OPTIONS", *options]
    if parser.epilog:
        lines += [".SH NOTES", _text(parser.epilog)]
    for heading, body in page.extra:
        lines += [f".SH {heading}", body]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write ``<name>.1`` for every page into the output directory."""
    cli = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    cli.add_argument("output", type=Path, help="directory for tunnel-agent.1 and friends")
    args = cli.parse_args(argv)
    from agent import __version__  # noqa: PLC0415 - after argv: --help works anywhere

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = (
        dt.datetime.fromtimestamp(int(epoch), tz=dt.UTC) if epoch else dt.datetime.now(tz=dt.UTC)
    )
    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    for page in PAGES:
        path = output / f"{page.name}.1"
        path.write_text(render(page, version=__version__, date=moment.date()), encoding="utf-8")
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
