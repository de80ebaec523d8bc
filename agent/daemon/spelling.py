"""
Misspelt setting names: unknown ``TUNNEL_AGENT_*`` variables and TOML keys, with a suggestion.

pydantic refuses an unknown key in the TOML file but only says "Extra inputs are not
permitted", and pydantic-settings ignores an unknown variable altogether: a typo such as
``TUNNEL_AGENT_MQTT_PORT`` (one underscore) would silently leave the default in place.
Both are found here and answered with the closest known name (difflib).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from pydantic import BaseModel


if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence


__all__ = ["suggest_key", "unknown_variables"]


def _sections(model: type[BaseModel]) -> Iterator[tuple[str, type[BaseModel] | None]]:
    """Each top-level field with its section model (``None`` for a plain value)."""
    for name, info in model.model_fields.items():
        kind = info.annotation
        yield name, kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _dotted_names(model: type[BaseModel]) -> list[str]:
    names: list[str] = []
    for name, section in _sections(model):
        if section is None:
            names.append(name)
        else:
            names.extend(f"{name}.{sub}" for sub in section.model_fields)
    return names


def suggest_key(model: type[BaseModel], loc: Sequence[str | int]) -> str | None:
    """
    Return the known setting closest to the unknown key at ``loc``, as a dotted path.

    Args:
        model: The settings model.
        loc: Where the unknown key is, e.g. ``("mqtt", "prot")``.

    Returns:
        e.g. ``"mqtt.port"``; a key misplaced in another section is found by its name
        (``endpoint`` at the top level suggests ``mqtt.endpoint``), up to two guesses joined
        by "or"; ``None`` if nothing is close.
    """
    *parents, leaf = (str(part) for part in loc)
    known = _dotted_names(model)
    prefix = ".".join(parents)
    siblings = [n for n in known if n.rpartition(".")[0] == prefix]
    close = difflib.get_close_matches(".".join([*parents, leaf]), siblings, n=1)
    if close:
        return close[0]
    # Elsewhere: the same or a similar leaf name in another section (two guesses: names
    # across sections share words, e.g. max_tunnel_lifetime and max_concurrent_tunnels).
    leaves = {n.rpartition(".")[2]: n for n in reversed(known)}
    close = difflib.get_close_matches(leaf, list(leaves), n=2)
    if close and close[0] == leaf:
        close = close[:1]
    return " or ".join(leaves[name] for name in close) or None


def unknown_variables(
    model: type[BaseModel],
    environ: Mapping[str, str],
    *,
    prefix: str,
    delimiter: str,
    others: frozenset[str],
) -> list[str]:
    """
    Describe each variable with the settings prefix that names no setting.

    Args:
        model: The settings model (sections one level deep, as pydantic-settings reads them).
        environ: The environment.
        prefix: The variables' prefix (``TUNNEL_AGENT_``), matched case-insensitively as
            pydantic-settings does.
        delimiter: The nested delimiter (``__``).
        others: Variables with the prefix that are not settings but are read elsewhere.

    Returns:
        One ``NAME: why`` line per unknown variable, sorted; the values are never shown
        (they may be secrets).
    """
    exact: set[str] = set()
    open_prefixes: list[str] = []  # mappings: any key below them is valid
    for name, section in _sections(model):
        top = (prefix + name).upper()
        exact.add(top)
        if section is None:
            if _is_mapping(model, name):
                open_prefixes.append(top + delimiter)
            continue
        for sub in section.model_fields:
            exact.add(f"{top}{delimiter}{sub.upper()}")
            if _is_mapping(section, sub):
                open_prefixes.append(f"{top}{delimiter}{sub.upper()}{delimiter}")
    known = sorted(exact | {o.upper() for o in others})
    lines: list[str] = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(prefix.upper()) or upper in known:
            continue
        if any(upper.startswith(p) and len(upper) > len(p) for p in open_prefixes):
            continue
        # Compared without the shared prefix, which would make every name look close.
        size = len(prefix)
        close = difflib.get_close_matches(upper[size:], [k[size:] for k in known], n=1)
        hint = f"; did you mean {prefix.upper()}{close[0]}?" if close else ""
        lines.append(f"{variable}: not a setting variable{hint}")
    return lines


def _is_mapping(model: type[BaseModel], name: str) -> bool:
    default = model.model_fields[name].get_default(call_default_factory=True)
    return isinstance(default, dict)
