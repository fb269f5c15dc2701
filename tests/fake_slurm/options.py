"""Slurm's command-line syntax: options, time limits, signals."""

from __future__ import annotations

import re
import signal
from typing import Any

from .jobs import SlurmError


def parse_options(
    args: list[str], table: dict[str, bool | None], short: dict[str, str]
) -> tuple[dict[str, Any], list[str]]:
    """Options up to the first positional argument. `table`: long name -> takes a value
    (True), is a flag (False) or takes an optional `=value` (None); `short`: letter -> name."""
    opts: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name not in table:
                raise SlurmError(f"unrecognized option '--{name}'")
        elif arg.startswith("-") and len(arg) > 1:
            if arg[1] not in short:
                raise SlurmError(f"invalid option -- '{arg[1]}'")
            name, value = short[arg[1]], arg[2:]
            eq = "=" if value else ""
        else:
            break
        if table[name] is False:
            if eq:
                raise SlurmError(f"option '--{name}' doesn't allow an argument")
            value = True
        elif table[name] is None:
            value = value if eq else True
        elif not eq:
            i += 1
            if i == len(args):
                raise SlurmError(f"option '--{name}' requires an argument")
            value = args[i]
        if name in opts and table[name] and name in ("jobs", "format"):
            value = f"{opts[name]},{value}"  # repeatable lists (sacct -j 1 -j 2)
        opts[name] = value
        i += 1
    return opts, args[i:]


def options_table(values: str, flags: str = "", optional: str = "") -> dict[str, bool | None]:
    """An option table for `parse_options` from space-separated long names."""
    return {
        **dict.fromkeys(values.split(), True),
        **dict.fromkeys(flags.split(), False),
        **dict.fromkeys(optional.split(), None),
    }


def short_options(pairs: str) -> dict[str, str]:
    """Short options from `letter:name` pairs."""
    return dict(pair.split(":") for pair in pairs.split())


def parse_time(text: str) -> int | None:
    """A Slurm time limit in seconds (None: unlimited): min, min:s, h:min:s, d-h[:min[:s]]."""
    if text.lower() in ("unlimited", "infinite"):
        return None
    found = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not found:
        raise SlurmError(f"Invalid time limit specification: {text}")
    days, a, b, c = found.groups()
    if days is not None:
        return ((int(days) * 24 + int(a)) * 60 + int(b or 0)) * 60 + int(c or 0)
    if c is not None:
        return (int(a) * 60 + int(b)) * 60 + int(c)
    return int(a) * 60 + int(b or 0) if b is not None else int(a) * 60


def parse_signal(text: str) -> int:
    """A signal by number or by name, with or without SIG (USR2, SIGUSR2, 12)."""
    if text.isdigit():
        return int(text)
    name = text.upper()
    try:
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        raise SlurmError(f"Invalid signal: {text}") from None
