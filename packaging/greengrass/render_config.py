#!/usr/bin/env python3
"""
Render the Greengrass component configuration as the agent's ``config.toml``.

The recipe's ``Run`` script feeds, on standard input, a JSON object it assembles from
recipe variables::

    {"agent": {configuration:/agent},
     "maxConcurrentTunnels": "{configuration:/maxConcurrentTunnels}",
     "tunnelTimeoutSeconds": "{configuration:/tunnelTimeoutSeconds}"}

The nucleus replaces a variable that points at an object with that object's JSON
serialisation, and one that points at a value with its text (recipe reference,
"Recipe variables"); a variable that points nowhere is left as written. ``agent`` is
rendered as TOML, mode 0600, atomically, for ``tunnel-agent run --config``.

The other two keys are the ``aws.greengrass.SecureTunneling`` component's, accepted so
that a deployment written for it keeps working: ``maxConcurrentTunnels`` becomes
``limits.max_concurrent_tunnels`` and ``tunnelTimeoutSeconds`` becomes
``limits.max_tunnel_lifetime`` (seconds). They arrive as text (quoted in the
recipe, so that any value keeps the JSON valid); an unset key (left as written,
empty or ``null``) leaves the agent's default. Setting a limit both ways is refused
rather than one spelling silently winning.

Two Greengrass facts shape the conversion: configuration is JSON, which has no
integer type, so the nucleus may hand back ``22`` as ``22.0`` (integral floats are
written as integers); and TOML has no null, so ``null`` values mean "unset" and are
left out, letting the agent's defaults apply.

Standard library only, so it runs with any Python 3.11 before anything else is known
to work. Exit status: 0 written, 78 (EX_CONFIG) the input is not such an object, an
alias is not a whole number or clashes with its ``agent.limits`` twin, or a value
TOML cannot express.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any


__all__ = ["ALIASES", "apply_aliases", "main", "render"]

EXIT_CONFIG = 78
#: The aws.greengrass.SecureTunneling component's keys -> the agent's [limits] fields.
ALIASES = {
    "maxConcurrentTunnels": "max_concurrent_tunnels",
    "tunnelTimeoutSeconds": "max_tunnel_lifetime",
}
_UNINTERPOLATED = re.compile(r"\{configuration:[^{}]*\}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            # TOML basic strings forbid raw control characters (TOML 1.0, "String").
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value if item is not None) + "]"
    if isinstance(value, dict):
        items = (f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(items) + "}"
    raise ValueError(f"cannot express {type(value).__name__} in TOML")


def render(config: dict[str, Any]) -> str:
    """
    Render a JSON object as TOML: scalars and arrays first, then one table per object.

    Args:
        config: The component configuration's ``agent`` object.

    Returns:
        TOML text that :mod:`tomllib` reads back as ``config`` (nulls dropped,
        integral floats as integers).

    Raises:
        ValueError: A value TOML cannot express (NaN, infinity).
    """
    lines: list[str] = []

    def table(path: list[str], mapping: dict[str, Any]) -> None:
        scalars = [(k, v) for k, v in mapping.items() if v is not None and not isinstance(v, dict)]
        tables = [(k, v) for k, v in mapping.items() if isinstance(v, dict)]
        # A table holding only sub-tables needs no header; an empty one does (it exists).
        if path and (scalars or not tables):
            lines.append(f"[{'.'.join(_key(part) for part in path)}]")
        lines.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars)
        for key, sub in tables:
            table([*path, key], sub)

    table([], config)
    return "\n".join(lines) + "\n"


def _whole_number(key: str, value: Any) -> int | None:
    """An alias's value as an integer; None when the deployment does not set it."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in {"", "null"} or _UNINTERPOLATED.fullmatch(text):
            return None
        try:
            value = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise ValueError(f"{key} must be a whole number, not {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise ValueError(f"{key} must be a whole number, not {value!r}")


def apply_aliases(component: dict[str, Any]) -> dict[str, Any]:
    """
    Return the agent configuration with the official component's keys folded in.

    Args:
        component: ``{"agent": {...}, "maxConcurrentTunnels": ..., "tunnelTimeoutSeconds": ...}``
            as the recipe's Run script assembles it; the aliases may be absent.

    Returns:
        A copy of ``component["agent"]`` whose ``limits`` holds the aliases' values.

    Raises:
        ValueError: ``agent`` is not an object, an alias is not a whole number, a key is
            unknown, or a limit is set both ways.
    """
    unknown = sorted(set(component) - {"agent", *ALIASES})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (expected 'agent' and {sorted(ALIASES)})")
    agent = component.get("agent")
    limits = agent.get("limits") if isinstance(agent, dict) else None
    # A wrong JSON type in the deployment is a configuration value error (exit 78).
    if not isinstance(agent, dict):
        raise ValueError("the component configuration's 'agent' must be a JSON object")  # noqa: TRY004
    if limits is not None and not isinstance(limits, dict):
        raise ValueError("agent.limits must be a JSON object")
    result = dict(agent)
    limits = dict(limits or {})
    for alias, field in ALIASES.items():
        value = _whole_number(alias, component.get(alias))
        if value is None:
            continue
        if limits.get(field) is not None:
            raise ValueError(
                f"{alias} and agent.limits.{field} are both set: keep one (they are the same limit)"
            )
        limits[field] = value
    if limits:
        result["limits"] = limits
    return result


def _refuse(why: str) -> int:
    # One line on stderr: the nucleus copies it into the component's log.
    sys.stderr.write(f"render_config: invalid component configuration: {why}\n")
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    """
    Read the component configuration on stdin and write the agent's TOML to ``--output``.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 78 when the configuration cannot be rendered.
    """
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="config.toml to write")
    args = parser.parse_args(argv)
    try:
        component = json.loads(sys.stdin.read())
        if not isinstance(component, dict):
            return _refuse("expected a JSON object with the key 'agent'")
        rendered = render(apply_aliases(component))
    except ValueError as exc:
        return _refuse(str(exc))
    output: Path = args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    # 0600 and atomic: the agent never reads a half-written file, nobody else reads it.
    fd, temporary = tempfile.mkstemp(dir=output.parent, prefix=".config.", suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(rendered)
        Path(temporary).replace(output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
