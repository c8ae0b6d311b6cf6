"""A session folder's ownership: the lock a recording process holds on it (released by the OS
when the process dies, even by SIGKILL). Below the recorder (:mod:`bmc.edge_app.store`) and the
session database (:mod:`bmc.edge_app.sessiondb`), which both need it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TextIO

from bmc.errors import BmcError


class SessionFolderError(BmcError, RuntimeError):
    """A session folder that this process may not record into: another process owns it, or it
    holds a session that a new one would be added to (its report would count both)."""


LOCK_NAME = "session.lock"


def lock_folder(out_dir: Path) -> TextIO:
    """An exclusive lock on ``out_dir`` for this process (released by the OS when it dies, even by
    SIGKILL), or :class:`SessionFolderError` naming the pid that holds it."""
    path = out_dir / LOCK_NAME
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        pid = fh.read().strip() or "?"
        fh.close()
        raise SessionFolderError(
            f"{out_dir} is being recorded by another process (pid {pid}); "
            "stop it first or record into another --out folder"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def is_locked(out_dir: str | Path) -> bool:
    """Whether a live process is recording into ``out_dir`` now."""
    path = Path(out_dir) / LOCK_NAME
    if not path.exists():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False
