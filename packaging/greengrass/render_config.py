#!/usr/bin/env python3
"""
Render the Greengrass component configuration as the agent's ``config.toml``.

The recipe's ``Run`` script feeds ``{configuration:/agent}`` on standard input: the
nucleus replaces a recipe variable that points at an object with that object's JSON
serialisation (recipe reference, "Recipe variables"). This script writes it out as
TOML, mode 0600, atomically, for ``tunnel-agent run --config``. Standard library
only, so it runs with any Python 3.11 before anything else is known to work.

Two Greengrass facts shape the conversion: configuration is JSON, which has no
integer type, so the nucleus may hand back ``22`` as ``22.0`` (integral floats are
written as integers); and TOML has no null, so ``null`` values mean "unset" and are
left out, letting the agent's defaults apply.

Exit status: 0 written, 78 (EX_CONFIG) the input is not a JSON object or holds a
value TOML cannot express.
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


__all__ = ["main", "render"]

EXIT_CONFIG = 78
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


def _refuse(why: str) -> int:
    # One line on stderr: the nucleus copies it into the component's log.
    sys.stderr.write(f"render_config: invalid component configuration: {why}\n")
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    """
    Read the JSON object on stdin and write it as TOML to ``--output``.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 78 when the configuration cannot be rendered.
    """
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="config.toml to write")
    args = parser.parse_args(argv)
    try:
        config = json.loads(sys.stdin.read())
        rendered = render(config) if isinstance(config, dict) else None
    except ValueError as exc:
        return _refuse(str(exc))
    if rendered is None:
        return _refuse("the component configuration's 'agent' must be a JSON object")
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
