"""The session folder's database, ``session.sqlite``: its schema and migrations, its typed records,
and every read and write of it. No other module of the kit writes SQL (``tests/test_layers.py``
checks it): the recorder (:mod:`bmc.edge_app.store`), the review, the report, FHIR, the screen,
the Live page, adaptation, the export, the harvest and the benchmarks all go through here.

Tables: ``session`` (one per pass over a source, with the configuration it ran under, a
:class:`RecordedConfig`), ``frame`` (one per frame read, with what it taught the session's
adaptive measures), ``cell`` (one per cell found: the model's call, its scores, its flag and its
pooled features), ``review`` (every person's decision, appended, never rewritten) and ``note``
(the session's comments). A folder recorded by an older version gains the newer columns and tables
the first time it is opened for writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bmc.edge_app.unknown import FLAG as UNKNOWN
from bmc.errors import BmcError

DB_NAME = "session.sqlite"
REJECTED = "rejected"  # a reviewer's decision: not a countable cell
# a session whose source ended before its count reached the target: not a finished differential
SHORT = "short of target"

SCHEMA = """
CREATE TABLE IF NOT EXISTS session (
    id INTEGER PRIMARY KEY, started TEXT NOT NULL, ended TEXT, source TEXT NOT NULL,
    model_file TEXT NOT NULL, model_sha256 TEXT NOT NULL, labels TEXT NOT NULL, device TEXT NOT NULL,
    config TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'running', exported TEXT
);
CREATE TABLE IF NOT EXISTS frame (
    id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL REFERENCES session(id), idx INTEGER NOT NULL,
    source TEXT NOT NULL, time TEXT NOT NULL, n_cells INTEGER NOT NULL, error TEXT, state TEXT
);
CREATE TABLE IF NOT EXISTS cell (
    id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL REFERENCES session(id),
    frame_id INTEGER NOT NULL REFERENCES frame(id), source TEXT NOT NULL, frame INTEGER NOT NULL,
    x INTEGER NOT NULL, y INTEGER NOT NULL, w INTEGER NOT NULL, h INTEGER NOT NULL,
    label TEXT NOT NULL, confidence REAL NOT NULL, probabilities TEXT NOT NULL, flag TEXT NOT NULL,
    track INTEGER, crop TEXT, embedding BLOB
);
CREATE INDEX IF NOT EXISTS cell_session ON cell(session_id);
CREATE TABLE IF NOT EXISTS review (
    id INTEGER PRIMARY KEY, cell_id INTEGER NOT NULL REFERENCES cell(id), label TEXT,
    reviewer TEXT NOT NULL, time TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS review_cell ON review(cell_id);
CREATE TABLE IF NOT EXISTS note (
    id INTEGER PRIMARY KEY, text TEXT NOT NULL, author TEXT NOT NULL, time TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS export (
    id INTEGER PRIMARY KEY, time TEXT NOT NULL, status TEXT NOT NULL, counts TEXT NOT NULL, content TEXT NOT NULL,
    document TEXT NOT NULL
);
"""
# columns added after the first release: (table, column, type); a folder recorded before gains them
_ADDED = [("cell", "embedding", "BLOB"), ("frame", "state", "TEXT"), ("export", "document", "TEXT")]
# the latest review row of each cell
_LATEST = (
    "SELECT r.cell_id, r.label, r.reviewer, r.time, r.id FROM review r JOIN "
    "(SELECT cell_id, MAX(id) id FROM review GROUP BY cell_id) m ON r.id = m.id"
)


# -- the records -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecordedConfig:
    """The configuration a session ran under, as it is recorded with it (``session.config``): what
    the report, FHIR and adaptation need to know of how its cells were classified. Unknown keys are
    kept (``extra``), so a folder recorded by a newer version reads back whole."""

    mode: str = "field"
    target: int | None = None
    specimen: str = "blood"
    orientations: int | None = None
    white_balance: bool = False
    finder: dict[str, Any] | None = None
    review: dict[str, Any] | None = None
    unknown: dict[str, Any] | None = None  # score, level, threshold of the unknown-cell check
    calibration: dict[str, Any] | None = None  # the gates calibrated at this laboratory
    contract: dict[str, Any] | None = None
    model: str = ""
    head: dict[str, Any] | None = None  # file, sha256, labels, new_labels of an adapted head
    scale: dict[str, Any] | None = None  # the field's measured scale, recorded as it is learnt
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str | None) -> RecordedConfig:
        """The recorded config; an empty, unreadable or pre-release one reads as the defaults (a
        session's cells stay readable whatever its config says)."""
        try:
            raw = json.loads(text or "{}")
        except ValueError:
            raw = {}
        if not isinstance(raw, dict):
            raw = {}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        known["specimen"] = known.get("specimen") or "blood"
        return cls(**known, extra={k: v for k, v in raw.items() if k not in names})

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        return json.dumps({**d, **extra})

    @property
    def parents(self) -> dict[str, str]:
        """A stage model's stage → 8-class parent map ({} for an 8-class model)."""
        parents = (self.contract or {}).get("parents") if isinstance(self.contract, dict) else None
        return dict(parents) if isinstance(parents, dict) else {}

    @property
    def calibration_statement(self) -> str:
        """How accurate the unaided cells are estimated to be at this microscope ('' if not calibrated)."""
        return str((self.calibration or {}).get("statement") or "")

    @property
    def new_labels(self) -> dict[str, str]:
        """Classes a laboratory taught an adapted head that the base model does not know."""
        return dict((self.head or {}).get("new_labels") or {})

    def model_name(self, model_file: str) -> str:
        """The model that classified the session, as a person reads it: its file, and its head
        where it was adapted at the laboratory."""
        return f"{model_file} + {self.head['file']}" if self.head and self.head.get("file") else model_file


@dataclasses.dataclass(frozen=True)
class SessionRecord:
    """One recorded session of a folder."""

    id: int
    started: str
    ended: str | None
    source: str
    model_file: str
    model_sha256: str
    labels: tuple[str, ...]
    device: str
    config: RecordedConfig
    status: str
    exported: str | None = None

    @property
    def model(self) -> str:
        return self.config.model_name(self.model_file)


@dataclasses.dataclass(frozen=True)
class ReviewedCell:
    """A recorded cell with the model's call and the latest person's decision, if any."""

    id: int
    session_id: int
    source: str
    frame: int
    box: tuple[int, int, int, int]
    model_label: str
    confidence: float
    probabilities: tuple[float, ...]
    flag: str
    crop: str
    track: int | None
    labels: tuple[str, ...]  # its session's model labels, in the model's order
    reviewed_label: str | None = None  # None: not reviewed (or the decision withdrawn)
    reviewer: str = ""
    reviewed_at: str = ""
    review_id: int = 0  # its latest review row (0: none): what a page that shows the decision saw

    @property
    def status(self) -> str:
        """``counted`` (the model's sure call), ``reviewed``, ``rejected`` or ``pending``."""
        if self.reviewed_label == REJECTED:
            return "rejected"
        if self.reviewed_label:
            return "reviewed"
        return "pending" if self.flag else "counted"

    @property
    def unknown(self) -> bool:
        """Set aside by the unknown-cell check (unlike any cell the model knows)."""
        return self.flag.startswith(UNKNOWN)

    @property
    def final_label(self) -> str | None:
        """The class this cell is counted as; None while it waits for review or was rejected."""
        if self.reviewed_label:
            return None if self.reviewed_label == REJECTED else self.reviewed_label
        return None if self.flag else self.model_label

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        order = np.argsort(self.probabilities)[::-1][:k]
        return [(self.labels[i], float(self.probabilities[i])) for i in order if i < len(self.labels)]


@dataclasses.dataclass(frozen=True)
class Note:
    """A comment on the folder's sessions."""

    text: str
    author: str
    time: str


# -- opening -----------------------------------------------------------------------------------------


def path_of(folder: str | Path) -> Path:
    return Path(folder) / DB_NAME


def connect(folder: str | Path, write: bool = False) -> sqlite3.Connection:
    """The session database of ``folder``, read-only; with ``write``, migrated to this version's
    schema (a folder recorded before review existed gains its table), and sessions left 'running'
    by a process that died marked 'interrupted'."""
    path = path_of(folder)
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {DB_NAME} (is this a 'bmc edge run --out' folder?)")
    if not write:
        return _readable(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10), path)
    db = _readable(sqlite3.connect(path, isolation_level=None, timeout=10), path)
    _writable(db)
    from bmc.edge_app.folder_lock import unrecorded

    with unrecorded(folder) as free:  # 'running' with nobody recording: it was killed
        if free:  # (the lock held meanwhile: a recorder starting now waits until it is marked)
            mark_interrupted(db)
    return db


class UnreadableSession(BmcError, sqlite3.DatabaseError):
    """A session.sqlite that is not a readable bmc session database; the message names the file (a
    DatabaseError still, for the callers that take any unreadable database in their stride)."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


def check_intact(db: sqlite3.Connection, folder: str | Path) -> None:
    """SQLite's quick check before a decision is written (about 30 ms a megabyte): a database whose
    tables are there but whose pages are torn is said to be damaged, and nothing is written into it."""
    try:
        found = str(db.execute("PRAGMA quick_check").fetchone()[0])
    except sqlite3.DatabaseError as e:
        found = str(e)
    if found != "ok":
        raise UnreadableSession(
            path_of(folder), f"damaged session database ({found.splitlines()[-1][:120]}); nothing was written into it"
        )


def _readable(db: sqlite3.Connection, path: Path) -> sqlite3.Connection:
    """``db``, once it is known to be a bmc session database (a damaged, empty or foreign file
    says so, naming it, instead of failing deep in a query)."""
    try:
        ok = _has_table(db, "session") and _has_table(db, "cell")
    except sqlite3.DatabaseError as e:
        db.close()
        raise UnreadableSession(path, f"unreadable session database ({e})") from e
    if not ok:
        db.close()
        raise UnreadableSession(path, "not a bmc session database (no session and cell tables)")
    return db


#: what a recorded session leaves in its folder beside its database
OUTPUTS = ("cells.csv", "differential.csv", "report.html", "differential.fhir.json")


def outputs_in(folder: Path) -> list[str]:
    """The files a recorded session leaves that ``folder`` holds (its crops as ``crops/``)."""
    found = [n for n in OUTPUTS if (folder / n).exists()]
    crops = folder / "crops"
    if crops.is_dir() and any(crops.iterdir()):
        found.append("crops/")
    return found


def open_for_recording(folder: Path) -> sqlite3.Connection:
    """The database a recorder writes (the caller holds the folder's lock): made one thread, used by
    the thread that records (the screen starts sessions in their own)."""
    path = path_of(folder)
    if path.exists() and not path.is_file():
        raise UnreadableSession(path, "not a file: cannot record a session database here")
    existed = path.is_file() and path.stat().st_size > 0
    if not existed:
        left = outputs_in(folder)
        if left:  # the record of a session whose files are still here: recording anew would overwrite them
            raise UnreadableSession(
                path,
                f"{'empty' if path.exists() else 'missing'}, but the folder holds a session's files "
                f"({', '.join(left)}): its record is lost or damaged, and recording here would overwrite them; "
                "record into a new folder (nothing in it was changed)",
            )
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        if existed:  # another program's database, or a damaged one, is left as it is
            _readable(db, path)
        _writable(db)
    except sqlite3.OperationalError:  # locked, read-only, disk full: said as sqlite says it, not "damaged"
        db.close()
        raise
    except sqlite3.DatabaseError as e:
        db.close()
        if isinstance(e, UnreadableSession):
            raise
        raise UnreadableSession(path, f"unreadable session database ({e})") from e
    mark_interrupted(db)
    return db


def _writable(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")  # a running session may be writing frames meanwhile
    db.execute("PRAGMA synchronous=FULL")  # a committed frame survives a power cut
    db.executescript(SCHEMA)
    for table, column, kind in _ADDED:
        if column not in _columns(db, table):
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in db.execute(f"PRAGMA table_info({table})")]


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken at once (``BEGIN IMMEDIATE``): committed whole or rolled back."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def snapshot(db: sqlite3.Connection) -> Iterator[None]:
    """One read transaction: every read inside sees the database as its first read did (a decision
    made meanwhile is in all of them or in none)."""
    db.execute("BEGIN")
    try:
        yield
    finally:
        if db.in_transaction:
            db.execute("COMMIT")


def folder_of(db: sqlite3.Connection) -> Path:
    """The session folder a connection reads."""
    return Path(db.execute("PRAGMA database_list").fetchone()[2]).parent


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


# -- reads -------------------------------------------------------------------------------------------


def sessions(db: sqlite3.Connection) -> list[SessionRecord]:
    """Every session of the folder, oldest first."""
    cols = _columns(db, "session")
    exported = "exported" if "exported" in cols else "NULL"
    rows = db.execute(
        "SELECT id, started, ended, source, model_file, model_sha256, labels, device, config, status, "
        f"{exported} FROM session ORDER BY id"
    ).fetchall()
    return [
        SessionRecord(
            sid, started, ended, source, f, sha, _labels(labels), device, RecordedConfig.from_json(cfg), status, exp
        )
        for sid, started, ended, source, f, sha, labels, device, cfg, status, exp in rows
    ]


def _labels(text: str | None) -> tuple[str, ...]:
    try:
        labels = json.loads(text or "[]")
    except ValueError:
        return ()
    return tuple(str(l) for l in labels) if isinstance(labels, list) else ()


def cells(db: sqlite3.Connection) -> list[ReviewedCell]:
    """Every recorded cell of the folder's sessions, oldest first, with its latest decision."""
    labels = {sid: _labels(l) for sid, l in db.execute("SELECT id, labels FROM session")}
    latest = {r[0]: r[1:] for r in db.execute(_LATEST)} if _has_table(db, "review") else {}
    out = []
    for cid, sid, source, frame, x, y, w, h, label, conf, probs, flag, crop, track in db.execute(
        "SELECT id, session_id, source, frame, x, y, w, h, label, confidence, probabilities, flag, crop, track "
        "FROM cell ORDER BY id"
    ):
        rl, who, when, rid = latest.get(cid, (None, "", "", 0))
        out.append(
            ReviewedCell(
                cid,
                sid,
                source,
                frame,
                (x, y, w, h),
                label,
                conf,
                tuple(json.loads(probs)),
                flag or "",
                crop or "",
                track,
                labels.get(sid, ()),
                rl,
                who or "",
                when or "",
                rid or 0,
            )
        )
    return out


def recent_cells(db: sqlite3.Connection, n: int) -> list[tuple[int, str, str]]:
    """(id, model's call, flag) of the ``n`` newest cells with a crop, newest first."""
    return db.execute("SELECT id, label, flag FROM cell WHERE crop != '' ORDER BY id DESC LIMIT ?", (n,)).fetchall()


def crop_of(db: sqlite3.Connection, cell_id: int) -> str:
    """The crop file of a cell, relative to its folder ('' where none was saved or no such cell)."""
    row = db.execute("SELECT crop FROM cell WHERE id = ?", (cell_id,)).fetchone()
    return (row[0] or "") if row else ""


def labels_of_cell(db: sqlite3.Connection, cell_id: int) -> tuple[str, ...] | None:
    """The model labels of a cell's session, or None where there is no such cell."""
    row = db.execute(
        "SELECT s.labels FROM cell c JOIN session s ON s.id = c.session_id WHERE c.id = ?", (cell_id,)
    ).fetchone()
    return None if row is None else _labels(row[0])


def embeddings(db: sqlite3.Connection) -> dict[int, np.ndarray]:
    """The recorded pooled features of each cell that has them (float32), by cell id."""
    if "embedding" not in _columns(db, "cell"):
        return {}
    return {
        cid: np.frombuffer(e, np.float16).astype(np.float32)
        for cid, e in db.execute("SELECT id, embedding FROM cell WHERE embedding IS NOT NULL")
    }


@dataclasses.dataclass(frozen=True)
class Export:
    """A FHIR report the folder issued: when, with which status, and digests of its differential
    (``counts``) and of all it said (``content``), to tell a later one that differs."""

    time: str
    status: str
    counts: str
    content: str
    document: str  # the Bundle as it went out (JSON)


def exports(db: sqlite3.Connection) -> list[Export]:
    """The FHIR reports issued from the folder, oldest first (none for a folder from before)."""
    if not _has_table(db, "export"):
        return []
    if "document" not in _columns(db, "export"):  # the table's first form (a development build): nothing kept
        return []
    rows = db.execute(
        "SELECT time, status, counts, content, document FROM export WHERE document IS NOT NULL ORDER BY id"
    )
    return [Export(*r) for r in rows]


def add_export(db: sqlite3.Connection, e: Export) -> None:
    db.execute(
        "INSERT INTO export (time, status, counts, content, document) VALUES (?, ?, ?, ?, ?)", dataclasses.astuple(e)
    )


def frame_counts(db: sqlite3.Connection) -> tuple[int, int]:
    """(frames read, frames that could not be read) over the folder's sessions."""
    n, bad = db.execute("SELECT COUNT(*), COALESCE(SUM(error IS NOT NULL), 0) FROM frame").fetchone()
    return int(n), int(bad)


def unreadable_frames(db: sqlite3.Connection) -> list[tuple[str, int, str]]:
    """(source, index, why) of every frame that could not be read, oldest first."""
    return db.execute("SELECT source, idx, error FROM frame WHERE error IS NOT NULL ORDER BY id").fetchall()


def frames(db: sqlite3.Connection) -> list[tuple[int, str, int]]:
    """(index, source, cells found) of every committed frame, oldest first."""
    return db.execute("SELECT idx, source, n_cells FROM frame ORDER BY id").fetchall()


def latest_note(db: sqlite3.Connection) -> Note | None:
    """The session's comment (the latest one written), or None."""
    if not _has_table(db, "note"):
        return None
    row = db.execute("SELECT text, author, time FROM note ORDER BY id DESC LIMIT 1").fetchone()
    return Note(*row) if row else None


def notes(db: sqlite3.Connection) -> list[Note]:
    """Every comment on the folder's sessions, oldest first (the last is the session's comment)."""
    if not _has_table(db, "note"):
        return []
    return [Note(*row) for row in db.execute("SELECT text, author, time FROM note ORDER BY id").fetchall()]


def integrity(db: sqlite3.Connection) -> str:
    """SQLite's own integrity check: ``ok``, or what is wrong."""
    return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def backup(folder: Path, dest: Path) -> None:
    """A consistent copy of the folder's database at ``dest``, even while a recorder is attached
    (SQLite's online backup)."""
    src = sqlite3.connect(f"file:{path_of(folder)}?mode=ro", uri=True)
    dst = sqlite3.connect(dest)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


# -- writes ------------------------------------------------------------------------------------------


def mark_interrupted(db: sqlite3.Connection) -> int:
    """Sessions left 'running' by a process that died (the caller holds the folder's lock, or
    found it free) are 'interrupted'; returns how many."""
    try:
        return db.execute("UPDATE session SET status = 'interrupted' WHERE status = 'running'").rowcount
    except sqlite3.OperationalError:
        return 0  # a read-only connection or a full disk: readers still show it as interrupted


def last_session(db: sqlite3.Connection) -> SessionRecord | None:
    found = sessions(db)
    return found[-1] if found else None


def start_session(
    db: sqlite3.Connection,
    source: str,
    model_file: str,
    model_sha256: str,
    labels: Sequence[str],
    device: str,
    config: RecordedConfig,
    started: str | None = None,
) -> int:
    """A new running session; returns its id. ``started``: its recorded start (None: now)."""
    cur = db.execute(
        "INSERT INTO session (started, source, model_file, model_sha256, labels, device, config) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (started or now(), source, model_file, model_sha256, json.dumps(list(labels)), device, config.to_json()),
    )
    return int(cur.lastrowid or 0)


def resume_session(db: sqlite3.Connection, session_id: int) -> int:
    """Set an interrupted session running again; returns its last committed frame index (-1: none)."""
    last = db.execute("SELECT COALESCE(MAX(idx), -1) FROM frame WHERE session_id = ?", (session_id,)).fetchone()[0]
    db.execute("UPDATE session SET status = 'running', ended = NULL WHERE id = ?", (session_id,))
    return int(last)


def end_session(db: sqlite3.Connection, session_id: int, status: str) -> None:
    db.execute("UPDATE session SET ended = ?, status = ? WHERE id = ?", (now(), status, session_id))


def session_calls(db: sqlite3.Connection, session_id: int) -> list[tuple[str, str]]:
    """(model's call, flag) of a session's cells, oldest first."""
    return db.execute("SELECT label, flag FROM cell WHERE session_id = ? ORDER BY id", (session_id,)).fetchall()


def frame_states(db: sqlite3.Connection, session_id: int) -> list[dict[str, Any]]:
    """What each committed frame of a session taught its adaptive measures, oldest first."""
    return [
        json.loads(row[0])
        for row in db.execute(
            "SELECT state FROM frame WHERE session_id = ? AND state IS NOT NULL ORDER BY id", (session_id,)
        )
    ]


def add_frame(
    db: sqlite3.Connection,
    session_id: int,
    idx: int,
    source: str,
    n_cells: int,
    error: str | None,
    state: Mapping[str, Any] | None,
) -> int:
    """A frame row (inside the caller's transaction); returns its id."""
    cur = db.execute(
        "INSERT INTO frame (session_id, idx, source, time, n_cells, error, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (session_id, idx, source, now(), n_cells, error or None, json.dumps(dict(state)) if state else None),
    )
    return int(cur.lastrowid or 0)


def last_frame(db: sqlite3.Connection, session_id: int) -> tuple[int, int, str] | None:
    """(id, index, source) of a session's last committed frame."""
    row = db.execute(
        "SELECT id, idx, source FROM frame WHERE session_id = ? ORDER BY id DESC LIMIT 1", (session_id,)
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]), str(row[2]))


def grow_frame(db: sqlite3.Connection, frame_id: int, n_cells: int) -> None:
    db.execute("UPDATE frame SET n_cells = n_cells + ? WHERE id = ?", (n_cells, frame_id))


#: one cell as :func:`add_cells` takes it: frame index, box, call, confidence, scores, flag, track,
#: crop file, pooled features
CellRow = tuple[
    int, int, int, int, int, str, float, "Sequence[float] | np.ndarray", str, "int | None", str, "np.ndarray | None"
]


def add_cells(db: sqlite3.Connection, session_id: int, frame_id: int, source: str, rows: Sequence[CellRow]) -> None:
    """The cells of one frame (inside the caller's transaction)."""
    db.executemany(
        "INSERT INTO cell (session_id, frame_id, source, frame, x, y, w, h, label, confidence, "
        "probabilities, flag, track, crop, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                session_id,
                frame_id,
                source,
                frame,
                x,
                y,
                w,
                h,
                label,
                confidence,
                json.dumps([round(float(p), 5) for p in probs]),
                flag,
                track,
                crop,
                None if embedding is None else np.asarray(embedding, np.float16).tobytes(),
            )
            for frame, x, y, w, h, label, confidence, probs, flag, track, crop, embedding in rows
        ],
    )


def set_scale(db: sqlite3.Connection, session_id: int, scale: Mapping[str, Any]) -> None:
    """The field's measured scale, into the session's recorded config."""
    row = db.execute("SELECT config FROM session WHERE id = ?", (session_id,)).fetchone()
    config = RecordedConfig.from_json(row[0] if row else None)
    db.execute(
        "UPDATE session SET config = ? WHERE id = ?",
        (dataclasses.replace(config, scale=dict(scale)).to_json(), session_id),
    )


class StaleDecision(BmcError, ValueError):
    """A decision made on a page that no longer shows the cell as it is: someone decided it meanwhile."""

    def __init__(self, cell_id: int, label: str | None, reviewer: str, time: str):
        what = f"{label} by {reviewer} at {time[11:19]}" if label else f"its decision withdrawn by {reviewer}"
        super().__init__(f"cell {cell_id} was decided meanwhile ({what})")
        self.cell_id, self.label, self.reviewer, self.time = cell_id, label, reviewer, time


def add_reviews(
    db: sqlite3.Connection,
    rows: Sequence[tuple[int, str | None]],
    reviewer: str,
    seen: Mapping[int, int] | None = None,
) -> None:
    """Decisions ``(cell id, label or None for a withdrawal)``, appended in one transaction. ``seen``:
    for a cell, the latest review row the person saw (0: none); where another was added since, nothing
    is recorded (:class:`StaleDecision`), so a page left open never overwrites a newer decision."""
    with transaction(db):
        stamp = now()  # taken once the write lock is held: the trail's times follow its order
        for cid, saw in (seen or {}).items():
            row = latest_review(db, cid)
            if (row[0] if row else 0) != saw:
                raise StaleDecision(cid, *(row[1:] if row else (None, "someone", "")))
        db.executemany(
            "INSERT INTO review (cell_id, label, reviewer, time) VALUES (?, ?, ?, ?)",
            [(cid, label, reviewer, stamp) for cid, label in rows],
        )


def latest_review(db: sqlite3.Connection, cell_id: int) -> tuple[int, str | None, str, str] | None:
    """(row id, label or None for a withdrawal, reviewer, time) of a cell's latest review row."""
    row = db.execute(
        "SELECT id, label, reviewer, time FROM review WHERE cell_id = ? ORDER BY id DESC LIMIT 1", (cell_id,)
    ).fetchone()
    return (int(row[0]), row[1], str(row[2]), str(row[3])) if row else None


def has_cell(db: sqlite3.Connection, cell_id: int) -> bool:
    return db.execute("SELECT 1 FROM cell WHERE id = ?", (cell_id,)).fetchone() is not None


def add_note(db: sqlite3.Connection, text: str, author: str) -> None:
    db.execute("INSERT INTO note (text, author, time) VALUES (?, ?, ?)", (text, author, now()))
