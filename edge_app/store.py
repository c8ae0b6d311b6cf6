"""Everything stays on the device: a SQLite session database (WAL) and a JPEG crop per cell.

Each frame's cells are written in one transaction, committed before the next frame is read, so
Ctrl-C, SIGTERM, a SIGKILL or a power cut lose at most the frame in flight: every cell already
counted is on disk. A full disk stops recording with a clear message and leaves the database
intact. ``cells.csv`` is written from the database, so it can always be rebuilt from it.
"""

from __future__ import annotations

import csv
import datetime
import errno
import json
import os
import platform
import sqlite3
from pathlib import Path

import cv2
import numpy as np

from edge_app import review

SCHEMA = """
CREATE TABLE IF NOT EXISTS session (
    id INTEGER PRIMARY KEY, started TEXT NOT NULL, ended TEXT, source TEXT NOT NULL,
    model_file TEXT NOT NULL, model_sha256 TEXT NOT NULL, labels TEXT NOT NULL, device TEXT NOT NULL,
    config TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'running', exported TEXT
);
CREATE TABLE IF NOT EXISTS frame (
    id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL REFERENCES session(id), idx INTEGER NOT NULL,
    source TEXT NOT NULL, time TEXT NOT NULL, n_cells INTEGER NOT NULL, error TEXT
);
CREATE TABLE IF NOT EXISTS cell (
    id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL REFERENCES session(id),
    frame_id INTEGER NOT NULL REFERENCES frame(id), source TEXT NOT NULL, frame INTEGER NOT NULL,
    x INTEGER NOT NULL, y INTEGER NOT NULL, w INTEGER NOT NULL, h INTEGER NOT NULL,
    label TEXT NOT NULL, confidence REAL NOT NULL, probabilities TEXT NOT NULL, flag TEXT NOT NULL,
    track INTEGER, crop TEXT
);
CREATE INDEX IF NOT EXISTS cell_session ON cell(session_id);
"""
# ``label`` is the model's call; ``counted_as`` the class the cell counts as after review (empty
# while it waits for review or when a reviewer rejected it); ``id`` is what a reviewer's
# decisions file refers to (``bmc edge review --apply``)
CSV_COLUMNS = ["source", "frame", "x", "y", "w", "h", "label", "confidence", "flag", "track", "crop", "id",
               "reviewed_label", "reviewed_by", "counted_as"]


class StorageFull(RuntimeError):
    """The disk is full: recording stopped; what was recorded is intact."""


def _is_disk_full(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(e, sqlite3.OperationalError) and "full" in str(e).lower())


class SessionStore:
    def __init__(self, out_dir: str | Path, source: str, model_file: str, model_sha256: str, labels,
                 config: dict | None = None, save_crops: bool = True):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.crops_dir = self.dir / "crops"
        self.save_crops = save_crops
        if save_crops:
            self.crops_dir.mkdir(exist_ok=True)
        self.db = sqlite3.connect(self.dir / "session.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed frame survives a power cut
        self.db.executescript(SCHEMA)
        device = f"{platform.node()} {platform.machine()} {platform.system()} {platform.release()}"
        cur = self.db.execute(
            "INSERT INTO session (started, source, model_file, model_sha256, labels, device, config) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (_now(), source, model_file, model_sha256, json.dumps(list(labels)), device, json.dumps(config or {})))
        self.session_id = cur.lastrowid
        self.full = False

    def record_frame(self, idx: int, source: str, cells: list[dict], crops: list[np.ndarray | None],
                     error: str = "") -> None:
        """Write one frame and its cells in one transaction (crops first, then the commit)."""
        if self.full:
            raise StorageFull(f"{self.dir}: disk full; recording stopped")
        try:
            names = []
            for k, (cell, crop) in enumerate(zip(cells, crops)):
                name = ""
                if self.save_crops and crop is not None:
                    name = f"crops/s{self.session_id}_f{idx:06d}_{k:02d}_{cell['label']}.jpg"
                    ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
                    if ok:
                        with open(self.dir / name, "wb") as fh:
                            fh.write(buf.tobytes())
                names.append(name)
            self.db.execute("BEGIN IMMEDIATE")
            fid = self.db.execute("INSERT INTO frame (session_id, idx, source, time, n_cells, error) "
                                  "VALUES (?, ?, ?, ?, ?, ?)",
                                  (self.session_id, idx, source, _now(), len(cells), error or None)).lastrowid
            self.db.executemany(
                "INSERT INTO cell (session_id, frame_id, source, frame, x, y, w, h, label, confidence, "
                "probabilities, flag, track, crop) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(self.session_id, fid, source, idx, c["x"], c["y"], c["w"], c["h"], c["label"],
                  c["confidence"], json.dumps([round(float(p), 5) for p in c["probabilities"]]), c["flag"],
                  c.get("track"), n) for c, n in zip(cells, names)])
            self.db.execute("COMMIT")
        except (OSError, sqlite3.OperationalError) as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if _is_disk_full(e):
                self.full = True
                raise StorageFull(f"{self.dir}: disk full after frame {idx - 1}; recording stopped, "
                                  "the session database is intact") from e
            raise

    def close(self, status: str = "finished") -> None:
        try:
            self.db.execute("UPDATE session SET ended = ?, status = ? WHERE id = ?", (_now(), status, self.session_id))
        except sqlite3.OperationalError:
            pass  # disk full: the session stays 'running', which readers treat as interrupted
        try:
            write_csv(self.dir)
        except OSError:
            pass
        self.db.close()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def write_csv(out_dir: str | Path) -> Path:
    """``cells.csv`` from the session database (all sessions in the folder), with the reviews."""
    out_dir = Path(out_dir)
    db = review.connect(out_dir)
    try:
        rows = [(c.source, c.frame, *c.box, c.model_label, c.confidence, c.flag, c.track, c.crop, c.id,
                 c.reviewed_label, c.reviewer if c.reviewed_label else "", c.final_label) for c in review.cells(db)]
    finally:
        db.close()
    tmp = out_dir / "cells.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v) for v in r])
    os.replace(tmp, out_dir / "cells.csv")
    return out_dir / "cells.csv"
