"""A session folder's locks, released by the OS when their process dies (even by SIGKILL):

* its ownership (``session.lock``): the lock a recording process holds on it for as long as it records;
* its outputs (:func:`outputs`): held, briefly, by whoever rewrites the files derived from its
  database (``cells.csv``, the report, the FHIR document and the record of issued reports) or
  exports it, so that two writers, threads of the screen or processes, take turns: the last file
  written is the one read last from the database, and a report is issued once. Its lock file lies
  in the machine's temporary folder, named by the folder's resolved path, so that a folder only
  read (a damaged one, a copy on a stick) is left exactly as it was.

Below the recorder (:mod:`bmc.edge_app.store`) and the session database (:mod:`bmc.edge_app.sessiondb`),
which both need it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from bmc.errors import BmcError

log = logging.getLogger(__name__)


class SessionFolderError(BmcError, RuntimeError):
    """A session folder that this process may not record into: another process owns it, or it
    holds a session that a new one would be added to (its report would count both)."""


LOCK_NAME = "session.lock"
OUTPUTS_LOCKS = Path(tempfile.gettempdir()) / "bmc-outputs"  # where the outputs locks lie
#: how long a recorder waits out a reader's probe of the lock (:func:`is_locked`, a few microseconds)
#: before it takes the lock for another process's recording
PROBE_WAIT_S = 0.25


def lock_folder(out_dir: Path) -> TextIO:
    """An exclusive lock on ``out_dir`` for this process (released by the OS when it dies, even by
    SIGKILL), or :class:`SessionFolderError` naming the pid that holds it."""
    path = out_dir / LOCK_NAME
    fh = open(path, "a+")
    deadline = time.monotonic() + PROBE_WAIT_S
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            # a reader asking whether the folder is recorded holds the lock for an instant (the
            # screen does, many times a second): only a lock held longer than PROBE_WAIT_S is a recorder's
            if time.monotonic() < deadline:
                time.sleep(0.01)
                continue
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


@contextlib.contextmanager
def unrecorded(out_dir: str | Path) -> Iterator[bool]:
    """True, with the folder's lock held until the block ends, where no process records into
    ``out_dir``; False where one does (or the lock cannot be opened: a read-only folder). What a
    process that finds sessions left 'running' does under it cannot race a recorder starting. A folder
    with no lock file was never recorded here (a copy, an export): True, and none is made in it."""
    path = Path(out_dir) / LOCK_NAME
    if not path.exists():
        yield True
        return
    try:
        fh = open(path, "a+")
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        fh.close()


_guard = threading.Lock()
_in_process: dict[str, threading.RLock] = {}
_depth = threading.local()


@contextlib.contextmanager
def outputs(out_dir: str | Path) -> Iterator[None]:
    """The folder's outputs to this thread alone until the block ends: the threads of this process
    take turns on an in-process lock, processes on a lock file in :data:`OUTPUTS_LOCKS`. Re-entrant
    (an export rewrites the report, which writes the FHIR document). Where that lock file cannot be
    made, the folder is guarded within this process only."""
    key = str(Path(out_dir).resolve())
    with _guard:
        mine = _in_process.setdefault(key, threading.RLock())
    with mine:
        held: dict[str, int] = _depth.__dict__.setdefault("held", {})
        if held.get(key):
            held[key] += 1
            try:
                yield
            finally:
                held[key] -= 1
            return
        fh = _outputs_lock_file(key)
        try:
            if fh is not None:
                fcntl.flock(fh, fcntl.LOCK_EX)
            held[key] = 1
            yield
        finally:
            held.pop(key, None)
            if fh is not None:
                fh.close()


def _outputs_lock_file(key: str) -> TextIO | None:
    """The lock file of a folder's outputs, or None (said in the log: the folder is then guarded
    within this process only). Every user of the device may take it (the service, the screen and a
    technician's command may run as different users): the folder is sticky and world-writable as
    /tmp is, each lock file writable by all, whatever the umask."""
    try:
        try:
            OUTPUTS_LOCKS.mkdir()
            os.chmod(OUTPUTS_LOCKS, 0o1777)
        except FileExistsError:
            pass
        path = OUTPUTS_LOCKS / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o666)
    except OSError as e:
        log.warning("%s: no lock file for its outputs (%s); guarded within this process only", key, e)
        return None
    return os.fdopen(fd, "a+")
