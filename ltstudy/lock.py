"""Snakemake's working-directory lock: who holds it, and clearing it once its holder is dead.

Snakemake writes `.snakemake/locks/*.lock` while it runs and removes them when it exits; a
Snakemake killed with SIGKILL (or on a crashed node) leaves them behind, and every later run
fails with "Directory cannot be locked" until someone runs `snakemake --unlock`, which does not
check that no Snakemake still works in the directory. `ltstudy unlock` does: it clears the
locks only when no Snakemake process on this host (a killed one's job processes included) has
the directory as its working directory, and no Snakemake on another host has recorded itself
there (the Snakefile records each run in `.snakemake/ltstudy-owners/` while it holds the lock).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

OWNERS = ".snakemake/ltstudy-owners"
LOCKS = ".snakemake/locks"


def _owner_path(workdir: Path, host: str, pid: int) -> Path:
    return workdir / OWNERS / f"{host}.{pid}.json"


def record_owner(workdir: str | Path = ".") -> None:
    """Record this process as a Snakemake holding the lock of `workdir` (the `onstart` hook)."""
    from ltstudy.io import write_json

    host, pid = socket.gethostname(), os.getpid()
    record = {"host": host, "pid": pid, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(_owner_path(Path(workdir), host, pid), record)


def forget_owner(workdir: str | Path = ".") -> None:
    """Remove this process's record (the `onsuccess` and `onerror` hooks)."""
    _owner_path(Path(workdir), socket.gethostname(), os.getpid()).unlink(missing_ok=True)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # gone, or another user's
        return []


def _is_snakemake(pid: int) -> bool:
    return any(Path(arg).name == "snakemake" for arg in _cmdline(pid)[:3])


def _ancestors() -> set[int]:
    """This process and its parents: a check run inside Snakemake must not find itself."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def snakemake_processes(workdir: str | Path = ".") -> list[int]:
    """Snakemake processes on this host whose working directory is `workdir` (a killed
    Snakemake's job processes included: they still write its outputs)."""
    target, mine = os.path.realpath(workdir), _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == target and _is_snakemake(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def lock_holders(workdir: str | Path = ".") -> list[str]:
    """Who may hold the lock of `workdir`, one description each; empty when it is stale.
    On this host the processes tell; a record from another host cannot be checked from here."""
    workdir = Path(workdir)
    holders = [f"snakemake pid {pid} on this host" for pid in snakemake_processes(workdir)]
    for path in sorted((workdir / OWNERS).glob("*.json")):
        record = json.loads(path.read_text())
        if record["host"] != socket.gethostname():
            holders.append(
                f"snakemake pid {record['pid']} on {record['host']} (started {record['started']}"
                "; if it is dead, run `ltstudy unlock` on that host)"
            )
    return holders


def locked(workdir: str | Path = ".") -> bool:
    return any((Path(workdir) / LOCKS).glob("*.lock"))


def unlock(workdir: str | Path = ".") -> str:
    """Clear a stale lock of `workdir`; raise RuntimeError naming the holders if one is live."""
    workdir = Path(workdir)
    if not locked(workdir):
        return f"{workdir.resolve()}: not locked"
    holders = lock_holders(workdir)
    if holders:
        raise RuntimeError(
            f"{workdir.resolve()} is locked by a live Snakemake: {'; '.join(holders)}. Wait for "
            "it to finish or stop it (Ctrl-C, or kill the pid), then rerun"
        )
    shutil.rmtree(workdir / LOCKS)
    shutil.rmtree(workdir / OWNERS, ignore_errors=True)
    return f"{workdir.resolve()}: removed the stale lock of a Snakemake that was killed"


class _LockMessages(logging.Filter):
    """Snakemake's lock messages, made to say who holds the lock or what clears it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "Directory cannot be locked. Another Snakemake" in message:
            from snakemake.exceptions import WorkflowError

            # a dry run (and --summary) only logs this message and exits 0: make it fail
            raise WorkflowError(f"Dry run of a locked directory: the lock is {lock_advice()}")
        if "Directory cannot be locked. Please make" in message:
            record.msg = f"{message}\nThe lock is {lock_advice()}"
        return True


def lock_advice(workdir: str | Path = ".") -> str:
    holders = lock_holders(workdir)
    if holders:
        return f"held by {'; '.join(holders)}"
    return "stale (no Snakemake works here any more): `ltstudy unlock` clears it"


def explain_locks() -> None:
    """Make Snakemake's lock errors name the holder or the cure (called by the Snakefile)."""
    logging.getLogger("snakemake.logging").addFilter(_LockMessages())
