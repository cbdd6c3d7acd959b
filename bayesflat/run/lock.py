"""One owner per run folder: a lock file naming the process that writes the folder.

Two runs writing into one folder would leave a trace from one and a report from the other.
The owner creates ``.lock`` in the folder with ``O_CREAT | O_EXCL`` (atomic on local and
network file systems) and writes its pid, host and start time into it; the lock is removed
when the owner is done, however it ends short of being killed. A second run finds the file
and is refused with the owner's pid and host. A lock whose process is gone (killed with
``SIGKILL``, a crashed machine) is reported as stale, with the command that clears it: it is
never taken over silently, because "gone" can only be checked on the owner's host.

A process may take the lock of a folder it already holds (the command line holds it from
sampling through writing the report, and :func:`bayesflat.sample` takes it again inside).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "RunLockedError", "run_lock"]

LOCK_NAME = ".lock"

_HELD: dict[Path, int] = {}


class RunLockedError(ValueError):
    """The run folder is owned by another (running or dead) process."""


def _owner(lock: Path) -> dict[str, object]:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refusal(folder: Path, lock: Path) -> RunLockedError:
    owner = _owner(lock)
    pid, host = owner.get("pid"), owner.get("host")
    since = owner.get("started")
    started = f", started {since}" if since else ""
    if isinstance(pid, int) and host == socket.gethostname() and not _alive(pid):
        return RunLockedError(
            f"output folder {folder} has a stale lock: process {pid} on {host}{started} is no "
            f"longer running (killed?). If no other run writes there, remove {lock} "
            "(`rm` it) and run again (with --resume / bayesflat.resume to continue its draws)"
        )
    who = f"process {pid} on {host}{started}" if pid is not None else "another process"
    return RunLockedError(
        f"output folder {folder} is in use by {who} (lock file {lock}); wait for that run to "
        "finish or choose another output folder"
    )


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the lock of the run folder ``folder`` (created if missing) for the ``with`` block.

    Raises
    ------
    RunLockedError
        (a ``ValueError``) If another process holds the folder, naming the folder, the owner's
        pid and host, and, for a stale lock, how to clear it.
    OSError
        If the folder cannot be created or written.
    """
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    lock = path / LOCK_NAME
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield lock
        finally:
            _HELD[key] -= 1
        return
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise _refusal(path, lock) from None
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(owner) + "\n")
    _HELD[key] = 1
    try:
        yield lock
    finally:
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            if _owner(lock).get("pid") == os.getpid():
                lock.unlink()
