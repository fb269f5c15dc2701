"""Which study config an `ltstudy` command reads: the one given, else the one the last
Snakemake run in this directory used (the `Snakefile`'s onstart records it), else
config/config.yaml. After `make demo`, `ltstudy status` then shows the demo, not the full study."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

DEFAULT_CONFIG = "config/config.yaml"
LAST_CONFIG = Path(".snakemake") / "ltstudy-last-config"


def record_last_config(configfiles: Iterable[str | Path], workdir: str | Path = ".") -> None:
    """Record the config files of a Snakemake run starting in `workdir` (its onstart hook),
    relative to `workdir` where they lie under it."""
    from ltstudy.io import atomic_path

    workdir = Path(workdir).resolve()
    lines = []
    for path in configfiles:
        path = Path(workdir, path).resolve()
        lines.append(str(path.relative_to(workdir) if path.is_relative_to(workdir) else path))
    with atomic_path(workdir / LAST_CONFIG) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in lines))


def last_config(workdir: str | Path = ".") -> list[str]:
    """The config files of the last Snakemake run in `workdir` (none if none was recorded)."""
    try:
        return (Path(workdir) / LAST_CONFIG).read_text().splitlines()
    except FileNotFoundError:
        return []


def resolve_config(given: str | None, workdir: str | Path = ".") -> str:
    """The config a command reads: `given`, else the last Snakemake run's, else the default.
    Unless given, says on stderr which one and why."""
    if given is not None:
        return given
    recorded = last_config(workdir)
    if len(recorded) == 1 and Path(workdir, recorded[0]).is_file():
        path, why = recorded[0], "the last Snakemake run here"
    elif len(recorded) > 1:
        path = DEFAULT_CONFIG
        why = f"the default; the last Snakemake run merged {len(recorded)} config files"
    elif recorded:
        path, why = DEFAULT_CONFIG, f"the default; the last Snakemake run's {recorded[0]} is gone"
    else:
        path, why = DEFAULT_CONFIG, "the default; no Snakemake run recorded here"
    print(f"using {path} ({why}; --configfile to choose)", file=sys.stderr)
    return path
