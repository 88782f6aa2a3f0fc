"""Closest-name suggestions for error messages: module names, keywords."""
from __future__ import annotations

import difflib
from typing import Iterable

SHOWN = 5


def closest(name: str, candidates: Iterable[str], count: int = SHOWN) -> list:
    """Up to ``count`` of ``candidates`` that look most like ``name`` (difflib's ratio >= 0.6), best first."""
    return difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=count, cutoff=0.6)


def closest_phrase(name: str, candidates: Iterable[str]) -> str:
    """``"; closest: 'a', 'b'"`` for the names most like ``name``, or ``""`` when none is close."""
    found = closest(name, candidates)
    return "; closest: " + ", ".join(repr(c) for c in found) if found else ""


def module_name_phrase(entry: str, names: list) -> str:
    """What to tell about a module name ``entry`` that matched none of ``names`` (dotted module names,
    an entry matching a whole name or a dotted suffix): the closest names and suffixes, or else the
    first names there are."""
    suffixes = [".".join(parts[i:]) for parts in (n.split(".") for n in names) for i in range(len(parts))]
    found = closest(entry, names + suffixes)
    if found:
        return "; closest: " + ", ".join(repr(c) for c in found)
    if not names:
        return ""
    more = f", ... ({len(names)} in all)" if len(names) > SHOWN else ""
    return "; the candidates are " + ", ".join(repr(n) for n in names[:SHOWN]) + more
