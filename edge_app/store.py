"""Everything stays on the device: a SQLite session database (WAL) and a JPEG crop per cell.

Each frame's cells are written in one transaction, committed before the next frame is read, so
Ctrl-C, SIGTERM, a SIGKILL or a power cut lose at most the frame in flight: every cell already
counted is on disk. A full disk stops recording with a clear message and leaves the database
intact. ``cells.csv`` is written from the database, so it can always be rebuilt from it.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import platform
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bmc.edge_app import sessiondb
from bmc.edge_app.cells import CellCall
from bmc.edge_app.folder_lock import LOCK_NAME, SessionFolderError, is_locked, lock_folder, outputs
from bmc.edge_app.sessiondb import RecordedConfig

__all__ = ["LOCK_NAME", "SessionFolderError", "is_locked", "lock_folder"]

# what ``SessionStore`` does with a folder that already holds a session
ON_EXISTING = ("resume", "new", "refuse")

# ``embedding``: the cell's pooled features (float16 bytes), what ``bmc edge adapt`` learns from.
# ``label`` is the model's call; ``counted_as`` the class the cell counts as after review (empty
# while it waits for review or when a reviewer rejected it); ``id`` is what a reviewer's
# decisions file refers to (``bmc edge review --apply``)
# ``counted_as_class``: for a stage model, the 8-class parent of ``counted_as`` (band → neutrophil);
# a flag that begins with ``unknown`` marks a cell unlike any the model knows, counted in no class
CSV_COLUMNS = [
    "source",
    "frame",
    "x",
    "y",
    "w",
    "h",
    "label",
    "confidence",
    "flag",
    "track",
    "crop",
    "id",
    "reviewed_label",
    "reviewed_by",
    "counted_as",
    "counted_as_class",
    "model",
]


RESUMABLE = ("interrupted", "disk-full")  # the statuses of a session that resumes


class StorageFull(RuntimeError):
    """The disk is full: recording stopped; what was recorded is intact."""


def _is_disk_full(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(e, sqlite3.OperationalError) and "full" in str(e).lower()
    )


class SessionStore:
    """One recording session in a folder that this process owns while it records.

    A folder holds one session unless asked otherwise, so that its report and ``cells.csv`` never
    add up two passes over the same fields. ``on_existing`` says what to do when the folder already
    holds one: ``"resume"`` continues an interrupted session of the same source and model after its
    last committed frame (``resume_after``) and refuses anything else; ``"new"`` adds a session to
    the folder; ``"refuse"`` refuses. ``resumable`` is False for live sources (a camera cannot be
    rewound), which are then refused rather than resumed.
    """

    def __init__(
        self,
        out_dir: str | Path,
        source: str,
        model_file: str,
        model_sha256: str,
        labels: Sequence[str],
        config: RecordedConfig | None = None,
        save_crops: bool = True,
        on_existing: str = "resume",
        resumable: bool = True,
        started: str | None = None,
    ) -> None:
        if on_existing not in ON_EXISTING:
            raise ValueError(f"on_existing must be one of {ON_EXISTING}, got {on_existing!r}")
        self.dir = Path(out_dir)
        inside = next((p for p in self.dir.resolve().parents if sessiondb.path_of(p).is_file()), None)
        if inside is not None:  # its crops or a subfolder: the report, an export and rotation would mix the two
            raise SessionFolderError(
                f"{self.dir}: inside the session folder {inside}; record a session in a folder of its own"
            )
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = lock_folder(self.dir)
        except OSError as e:
            where = "" if e.filename in (None, str(self.dir)) else f": {e.filename}"
            raise SessionFolderError(f"{self.dir}: cannot record a session here ({e.strerror or e}{where})") from e
        try:
            self._open(source, model_file, model_sha256, labels, config, save_crops, on_existing, resumable, started)
        except BaseException:
            self._lock.close()
            raise

    def _open(
        self,
        source: str,
        model_file: str,
        model_sha256: str,
        labels: Sequence[str],
        config: RecordedConfig | None,
        save_crops: bool,
        on_existing: str,
        resumable: bool,
        started: str | None,
    ) -> None:
        self.db = sessiondb.open_for_recording(self.dir)  # first: a folder it refuses gets nothing new
        self.crops_dir = self.dir / "crops"
        self.save_crops = save_crops
        if save_crops:
            self.crops_dir.mkdir(exist_ok=True)
        self.full = False
        self.resume_after: int | None = None  # the last committed frame of a resumed session
        last = sessiondb.last_session(self.db)
        if last is not None and on_existing != "new":
            same = same_source(last.source, source) and last.model_sha256 == model_sha256
            # a session cut short by a crash or by a full disk goes on where it stopped, once the
            # command is given again (and space freed); one a person stopped or that finished does not
            cut_short = last.status in RESUMABLE
            if on_existing == "resume" and cut_short and same and resumable:
                self.session_id = last.id
                self.resume_after = sessiondb.resume_session(self.db, last.id)
                return
            why = f"its session {last.id} ({last.status}) recorded {last.source!r}" + (
                "" if last.model_sha256 == model_sha256 else " with another model"
            )
            what = (
                "a live source cannot resume"
                if cut_short and same and not resumable
                else "a second session would be counted together with it in the report"
            )
            self.db.close()
            raise SessionFolderError(
                f"{self.dir} already holds a session: {why}; {what}. Record into a new "
                "--out folder, or add a session to this one with --new-session"
            )
        device = f"{platform.node()} {platform.machine()} {platform.system()} {platform.release()}"
        recorded = config if isinstance(config, RecordedConfig) else RecordedConfig.from_json(None)
        self.session_id = sessiondb.start_session(
            self.db, source, model_file, model_sha256, labels, device, recorded, started
        )

    def prior_cells(self) -> list[tuple[str, str]]:
        """(label, flag) of the cells a resumed session had already recorded."""
        return sessiondb.session_calls(self.db, self.session_id)

    def prior_states(self) -> list[dict[str, Any]]:
        """What each frame a resumed session had committed taught its adaptive measures (the cells'
        sizes, the red cells, the lamp: ``record_frame``'s ``state``), oldest first."""
        return sessiondb.frame_states(self.db, self.session_id)

    def record_frame(
        self,
        idx: int,
        source: str,
        cells: list[CellCall],
        crops: list[np.ndarray | None],
        error: str = "",
        state: dict[str, Any] | None = None,
    ) -> None:
        """Write one frame and its cells in one transaction (crops first, then the commit). ``state``:
        what the frame taught the session's adaptive measures, so that a resumed session goes on
        exactly where the interrupted one stopped."""
        if self.full:
            raise StorageFull(f"{self.dir}: disk full; recording stopped")
        written: list[str] = []
        try:
            names = self._write_crops(idx, cells, crops, written)
            with sessiondb.transaction(self.db):
                fid = sessiondb.add_frame(self.db, self.session_id, idx, source, len(cells), error, state)
                self._insert_cells(fid, idx, source, cells, names)
        except (OSError, sqlite3.OperationalError) as e:
            self._discard(written)
            self._failed(e, f"after frame {idx - 1}")

    def record_late(self, cells: list[CellCall], crops: list[np.ndarray | None]) -> None:
        """Cells judged after their last frame was committed (moving cells still tracked when the
        session ends), attached to the session's last frame."""
        if not cells:
            return
        if self.full:
            raise StorageFull(f"{self.dir}: disk full; recording stopped")
        row = sessiondb.last_frame(self.db, self.session_id)
        if row is None:
            return
        fid, idx, source = row
        written: list[str] = []
        try:
            names = self._write_crops(idx, cells, crops, written, first=1000)
            with sessiondb.transaction(self.db):
                self._insert_cells(fid, idx, source, cells, names)
                sessiondb.grow_frame(self.db, fid, len(cells))
        except (OSError, sqlite3.OperationalError) as e:
            self._discard(written)
            self._failed(e, "at the session's end")

    def _discard(self, names: list[str]) -> None:
        """The crops of cells whose commit failed: no crop without its cell in the database."""
        for name in names:
            with contextlib.suppress(OSError):
                (self.dir / name).unlink(missing_ok=True)

    def _failed(self, e: Exception, where: str) -> None:
        if _is_disk_full(e):
            self.full = True
            raise StorageFull(
                f"{self.dir}: disk full {where}; recording stopped, the session database is intact "
                "(free some space and give the same command again: the session goes on where it stopped)"
            ) from e
        raise e

    def _write_crops(
        self,
        idx: int,
        cells: list[CellCall],
        crops: Sequence[np.ndarray | None],
        written: list[str],
        first: int = 0,
    ) -> list[str]:
        """Each cell's crop file (its name, '' for none), named by the frame that records it (each
        frame is recorded once, so no two cells share a file: named by a moving cell's best view, two
        cells judged in different frames could); ``written`` gets each file this call made, for
        :meth:`_discard` should the commit fail (one left by a session that died before its commit
        is no cell's, and is overwritten)."""
        names = []
        for k, (cell, crop) in enumerate(zip(cells, crops), start=first):
            name = ""
            if self.save_crops and crop is not None:
                name = f"crops/s{self.session_id}_f{idx:06d}_{k:02d}_{cell.label}.jpg"
                ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
                if ok:
                    written.append(name)
                    with open(self.dir / name, "wb") as fh:
                        fh.write(buf.tobytes())
            names.append(name)
        return names

    def _insert_cells(self, fid: int, idx: int, source: str, cells: list[CellCall], names: list[str]) -> None:
        sessiondb.add_cells(
            self.db,
            self.session_id,
            fid,
            source,
            [
                (
                    c.frame if c.frame is not None else idx,
                    c.box.x,
                    c.box.y,
                    c.box.w,
                    c.box.h,
                    c.label,
                    c.confidence,
                    c.probabilities,
                    c.flag,
                    c.track,
                    n,
                    c.embedding,
                )
                for c, n in zip(cells, names)
            ],
        )

    def record_scale(self, scale: dict[str, Any]) -> None:
        """The field's measured scale (red-cell diameter in pixels, µm per pixel) in the session's
        recorded config, where the report reads it."""
        try:
            sessiondb.set_scale(self.db, self.session_id, scale)
        except sqlite3.OperationalError as e:
            if _is_disk_full(e):
                self.full = True
                raise StorageFull(f"{self.dir}: disk full; recording stopped, the session database is intact") from e
            raise

    def close(self, status: str = "finished") -> None:
        try:
            sessiondb.end_session(self.db, self.session_id, status)
        except sqlite3.OperationalError:
            pass  # disk full: the session stays 'running', which readers treat as interrupted
        try:
            with outputs(self.dir):  # in turn with the screen's rewrites after decisions
                write_csv(self.dir)
        except (OSError, sqlite3.Error):
            pass
        self.db.close()
        with contextlib.suppress(OSError):  # nobody records now: no pid left in the lock file to mislead
            self._lock.seek(0)
            self._lock.truncate()
        self._lock.close()


def same_source(recorded: str, source: str) -> bool:
    """Whether a recorded source is ``source``: the same spec, or the same file or folder (a session
    recorded before sources were stored by their full path holds the path as it was typed)."""
    if recorded == source:
        return True
    try:
        return os.path.exists(recorded) and os.path.samefile(recorded, source)
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: the mode a plain file gets under this process's umask (0644 under the usual 022): a LIS connector,
#: a file share or a second account reads the report as it reads the crops
_FILE_MODE = 0o666 & ~_umask()


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a unique temporary file beside it: a full disk, a crash or
    a second writer leaves the previous file (or none), never a truncated or mixed one."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a read-only or full folder: named by the file meant, not the temporary one
        raise OSError(e.errno, e.strerror, str(path)) from e
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp's 0600 would leave the report to its writer alone
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_csv(out_dir: str | Path) -> Path:
    """``cells.csv`` from the session database (all sessions in the folder), with the reviews."""
    out_dir = Path(out_dir)
    db = sessiondb.connect(out_dir)
    try:
        recorded = sessiondb.sessions(db)
        models = {s.id: s.model for s in recorded}
        parents = {s.id: s.config.parents for s in recorded}
        rows = [
            (
                c.source,
                c.frame,
                *c.box,
                c.model_label,
                c.confidence,
                c.flag,
                c.track,
                c.crop,
                c.id,
                c.reviewed_label,
                c.reviewer if c.reviewed_label else "",
                c.final_label,
                parents.get(c.session_id, {}).get(c.final_label, c.final_label) if c.final_label else "",
                models.get(c.session_id, ""),
            )
            for c in sessiondb.cells(db)
        ]
    finally:
        db.close()
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v) for v in r])
    write_atomic(out_dir / "cells.csv", buf.getvalue())
    return out_dir / "cells.csv"
