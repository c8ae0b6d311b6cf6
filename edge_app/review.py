"""A person's review of the cells a session set aside, and the differential after review.

The edge app counts a cell on its own only when the model is sure of it
(:class:`bmc.edge_app.differential.ReviewPolicy`); the others are stored with a flag and wait for a
person, as a technician sets aside a cell they cannot name at once. ``bmc edge review DIR`` shows
them one at a time in a window (where OpenCV has one), or takes decisions from the command line
or a CSV file, and the report and ``cells.csv`` then count each cell by its final label.

Every decision is appended to the session database's ``review`` table with who made it and
when, committed at once: an audit trail, never rewritten. A later decision on a cell supersedes
an earlier one; an undo appends a withdrawal (``label`` NULL), which sends the cell back to the
model's call. The model's own answer stays in ``cell.label``.

A decision is one of the session's labels, ``rejected`` (not a countable cell: debris, a smudge,
two cells as one), or, asked for explicitly, a class the model does not know (a blast in a marrow
differential) — counted, and listed apart in the report.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import getpass
import json
import re
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np

from bmc.edge_app.differential import SPECIMENS, DifferentialCount, differential_of
from bmc.edge_app.unknown import FLAG as UNKNOWN
from bmc.errors import BmcError

REJECTED = "rejected"
_NEW_LABEL = re.compile(r"^[a-z][a-z0-9 _-]{0,39}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS review (
    id INTEGER PRIMARY KEY, cell_id INTEGER NOT NULL REFERENCES cell(id), label TEXT,
    reviewer TEXT NOT NULL, time TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS review_cell ON review(cell_id);
"""
# the latest review row of each cell
_LATEST = (
    "SELECT r.cell_id, r.label, r.reviewer, r.time FROM review r JOIN "
    "(SELECT cell_id, MAX(id) id FROM review GROUP BY cell_id) m ON r.id = m.id"
)


class ReviewError(BmcError, ValueError):
    """A decision that cannot be recorded (no such cell, unknown label, unreadable file)."""


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


def connect(out_dir: str | Path, write: bool = False) -> sqlite3.Connection:
    """The session database of ``out_dir``; with ``write``, its ``review`` table is created if
    missing (sessions recorded before review existed gain it on first use)."""
    path = Path(out_dir) / "session.sqlite"
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir}: no session.sqlite (is this a 'bmc edge run --out' folder?)")
    if write:
        db = sqlite3.connect(path, isolation_level=None, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")  # a running session may be writing frames meanwhile
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        from bmc.edge_app.folder_lock import is_locked, mark_interrupted

        if not is_locked(out_dir):  # 'running' with nobody recording: it was killed
            mark_interrupted(db)
    else:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    return db


def cells(db: sqlite3.Connection) -> list[ReviewedCell]:
    """Every recorded cell of the folder's sessions, oldest first, with its latest decision."""
    labels = {sid: tuple(json.loads(l)) for sid, l in db.execute("SELECT id, labels FROM session")}
    has_review = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='review'").fetchone()
    latest = {r[0]: r[1:] for r in db.execute(_LATEST)} if has_review else {}
    out = []
    for cid, sid, source, frame, x, y, w, h, label, conf, probs, flag, crop, track in db.execute(
        "SELECT id, session_id, source, frame, x, y, w, h, label, confidence, probabilities, flag, crop, track "
        "FROM cell ORDER BY id"
    ):
        rl, who, when = latest.get(cid, (None, "", ""))
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
            )
        )
    return out


def differential(all_cells: list[ReviewedCell]) -> Counter:
    """Counts by final label: the model's sure calls and the reviewed cells; nothing pending or rejected."""
    return Counter(c.final_label for c in all_cells if c.final_label)


def specimen_of(db: sqlite3.Connection) -> str:
    """What the folder's sessions counted (``blood`` or ``marrow``), as the latest session recorded
    it; a session recorded before the setting existed counted blood (the shipped models' specimen)."""
    row = db.execute("SELECT config FROM session ORDER BY id DESC LIMIT 1").fetchone()
    try:
        specimen = (json.loads(row[0] or "{}") if row else {}).get("specimen") or "blood"
    except ValueError:
        specimen = "blood"
    return specimen if specimen in SPECIMENS else "blood"


def calibration_statement(db: sqlite3.Connection) -> str:
    """How accurate the cells counted with no person are estimated to be at this microscope, as
    the latest session's model was calibrated (:mod:`bmc.edge_app.calibration`); '' when it was not."""
    row = db.execute("SELECT config FROM session ORDER BY id DESC LIMIT 1").fetchone()
    try:
        cal = (json.loads(row[0] or "{}") if row else {}).get("calibration") or {}
    except ValueError:
        return ""
    return str(cal.get("statement") or "")


def session_differential(db: sqlite3.Connection, all_cells: list[ReviewedCell] | None = None) -> DifferentialCount:
    """The folder's differential after review, the one record the report, the screen and FHIR render:
    every cell by its final class, the latest session's classes listed (zeros too), the cells still
    waiting for review in no class."""
    all_cells = cells(db) if all_cells is None else all_cells
    row = db.execute("SELECT labels FROM session ORDER BY id DESC LIMIT 1").fetchone()
    labels = json.loads(row[0]) if row else []
    pending = [c for c in all_cells if c.status == "pending"]
    return differential_of(
        differential(all_cells), labels, specimen_of(db), len(pending), sum(c.unknown for c in pending)
    )


def queue(all_cells: list[ReviewedCell], include_counted: bool = False) -> list[ReviewedCell]:
    """The cells a reviewer goes through: those waiting (in the order recorded), then, with
    ``include_counted``, the model's sure calls not yet checked, least confident first. Cells the
    unknown-cell check set aside come first of all."""
    waiting = [c for c in all_cells if c.status == "pending"]
    waiting.sort(key=lambda c: not c.unknown)  # unknown cells first (a blast must not wait behind doubts)
    if include_counted:
        waiting += sorted((c for c in all_cells if c.status == "counted"), key=lambda c: c.confidence)
    return waiting


def teaching_queue(all_cells: list[ReviewedCell], per_class: int | None = None) -> list[ReviewedCell]:
    """The cells to review for adapting the model (``bmc edge adapt``), those that teach its head
    most first: cells not yet decided, grouped by the model's call, each group least sure first (the
    smallest margin between the top two classes), then dealt out one class at a time, so that the
    first decisions already cover every class the session found."""
    by_class: dict[str, list[ReviewedCell]] = {}
    for c in all_cells:
        if c.status in ("pending", "counted"):
            by_class.setdefault(c.model_label, []).append(c)
    for members in by_class.values():
        members.sort(key=lambda c: _margin(c.probabilities))
        del members[per_class or len(members) :]
    out = []
    for k in range(max((len(v) for v in by_class.values()), default=0)):
        out += [v[k] for _, v in sorted(by_class.items()) if k < len(v)]
    return out


def calibration_queue(db: sqlite3.Connection, all_cells: list[ReviewedCell]) -> list[ReviewedCell]:
    """The cells to review for calibrating the gates at this microscope: every cell of each session
    in its fixed random order (:func:`bmc.edge_app.calibration.calibration_order`), those not
    decided yet, whatever the model said of them. Reviewed from the top, they extend the random
    sample the calibration rests on; skipping one ends the sample there."""
    from bmc.edge_app.calibration import calibration_order, session_seed

    folder = Path(db.execute("PRAGMA database_list").fetchone()[2]).parent.name
    by_id = {c.id: c for c in all_cells}
    out = []
    for sid, started in db.execute("SELECT id, started FROM session ORDER BY id"):
        ids = [c.id for c in all_cells if c.session_id == sid]
        out += [
            by_id[i] for i in calibration_order(ids, session_seed(folder, sid, started)) if not by_id[i].reviewed_label
        ]
    return out


DECISION_COLUMNS = ("id", "label", "model_label", "confidence", "flag", "source", "frame", "crop")


def write_decisions_template(
    out_dir: str | Path,
    stream,
    for_adapt: bool = False,
    per_class: int | None = None,
    include_counted: bool = False,
    for_calibration: int | None = None,
) -> int:
    """The cells to review as a decisions file with its label column empty (``bmc edge review
    --list``), read-only: the review queue, the teaching queue ``for_adapt``, or the first
    ``for_calibration`` cells of the calibration queue. Returns how many."""
    import csv

    db = connect(out_dir)
    try:
        if for_calibration:
            todo = calibration_queue(db, cells(db))[:for_calibration]
        else:
            todo = teaching_queue(cells(db), per_class) if for_adapt else queue(cells(db), include_counted)
    finally:
        db.close()
    out = csv.writer(stream)
    out.writerow(DECISION_COLUMNS)
    out.writerows([c.id, "", c.model_label, f"{c.confidence:.3f}", c.flag, c.source, c.frame, c.crop] for c in todo)
    return len(todo)


def _margin(probs) -> float:
    top = sorted(probs)[-2:]
    return top[-1] - top[0] if len(top) == 2 else 1.0


NOTE_SCHEMA = """
CREATE TABLE IF NOT EXISTS note (
    id INTEGER PRIMARY KEY, text TEXT NOT NULL, author TEXT NOT NULL, time TEXT NOT NULL
);
"""
_IDENTIFIER = re.compile(r"\d{6,}|[\w.+-]+@[\w-]+\.\w+|\b\d{1,2}[./-]\d{1,2}[./-](19|20)\d{2}\b")


def add_note(out_dir: str | Path, text: str, author: str) -> str:
    """A free-text comment on the session (stain quality, smear, what to recount), appended with
    who wrote it and when; the latest is the session's comment. Text that looks like a patient
    identifier (a long number, an e-mail, a date of birth) is refused: the session travels in exports."""
    text = " ".join(text.split())
    if not text:
        raise ReviewError("the comment is empty")
    if len(text) > 500:
        raise ReviewError(f"the comment has {len(text)} characters; keep it under 500")
    if _IDENTIFIER.search(text):
        raise ReviewError(
            "the comment looks like it holds a patient identifier (a long number, an e-mail address "
            "or a date of birth); sessions travel in exports: leave identifiers out"
        )
    db = connect(out_dir, write=True)
    try:
        db.executescript(NOTE_SCHEMA)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        db.execute("INSERT INTO note (text, author, time) VALUES (?, ?, ?)", (text, author, now))
    finally:
        db.close()
    return text


def latest_note(db: sqlite3.Connection) -> tuple[str, str, str] | None:
    """(text, author, time) of the session's comment, or None."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='note'").fetchone():
        return None
    return db.execute("SELECT text, author, time FROM note ORDER BY id DESC LIMIT 1").fetchone()


class Reviewer:
    """Records one person's decisions in a session folder's database, one commit per decision."""

    def __init__(self, out_dir: str | Path, name: str | None = None, allow_new_labels: bool = False):
        self.out_dir = Path(out_dir)
        self.name = (name or current_user()).strip() or "unknown"
        self.allow_new = allow_new_labels
        self.db = connect(out_dir, write=True)

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def cells(self) -> list[ReviewedCell]:
        return cells(self.db)

    def check(self, cell_id: int, label: str, where: str = "") -> str:
        """The decision as it will be stored, or :class:`ReviewError` saying what is wrong."""
        at = f"{where}: " if where else ""
        row = self.db.execute(
            "SELECT c.id, s.labels FROM cell c JOIN session s ON s.id = c.session_id WHERE c.id = ?", (cell_id,)
        ).fetchone()
        if row is None:
            raise ReviewError(f"{at}no cell {cell_id} in {self.out_dir / 'session.sqlite'}")
        known = json.loads(row[1])
        spelled = {l.lower(): l for l in known}  # the model's own spelling, whatever the case typed
        label = label.strip().lower()
        if label == REJECTED or label in spelled:
            return spelled.get(label, label)
        if self.allow_new and _NEW_LABEL.match(label):
            return label
        hint = (
            "; a class the model does not know needs --new-label (lower case, up to 40 characters)"
            if not self.allow_new
            else " (a new class name is lower case, up to 40 characters)"
        )
        raise ReviewError(
            f"{at}{label!r} is not a label of cell {cell_id}'s model ({', '.join(known)}) nor {REJECTED!r}{hint}"
        )

    def decide(self, cell_id: int, label: str) -> str:
        label = self.check(cell_id, label)
        self._insert([(cell_id, label)])
        return label

    def undo(self, cell_id: int) -> None:
        """Withdraw the latest decision on ``cell_id``: the cell goes back to the model's call."""
        if self.db.execute("SELECT 1 FROM cell WHERE id = ?", (cell_id,)).fetchone() is None:
            raise ReviewError(f"no cell {cell_id} in {self.out_dir / 'session.sqlite'}")
        self._insert([(cell_id, None)])

    def apply(self, path: str | Path) -> int:
        """Decisions from a CSV with columns ``id,label`` (what ``bmc edge review --list`` writes, its
        labels filled in; rows left blank are skipped): all checked first, then written in one
        transaction, so a bad line records nothing."""
        path = Path(path)
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:  # a spreadsheet's BOM is not a column name
                head = fh.readline()
                fh.seek(0)
                # what spreadsheets write in locales whose decimal mark is a comma
                delimiter = ";" if head.count(";") > head.count(",") else ","
                reader = csv.DictReader(fh, delimiter=delimiter)
                cols = [c.strip() for c in reader.fieldnames or []]
                reader.fieldnames = cols
                twice = sorted({c for c in cols if cols.count(c) > 1})
                if twice:
                    raise ReviewError(f"{path}: column(s) {', '.join(map(repr, twice))} appear more than once")
                if "id" not in cols or "label" not in cols:
                    raise ReviewError(f"{path}: needs columns 'id' and 'label'; has {cols}")
                if "counted_as" in cols:  # its label column is the model's call, not a person's
                    raise ReviewError(
                        f"{path} is a session's cells.csv, whose labels are the model's calls; "
                        "decisions go in the file that --list writes, its labels filled in"
                    )
                rows = []
                seen: dict[int, int] = {}
                for line, r in enumerate(reader, start=2):
                    if not (r.get("label") or "").strip():
                        continue  # a cell left undecided
                    try:
                        cid = int(r["id"])
                    except (TypeError, ValueError):
                        raise ReviewError(f"{path}:{line}: cell id {r['id']!r} is not a number") from None
                    if cid in seen:
                        raise ReviewError(
                            f"{path}:{line}: cell {cid} is decided a second time "
                            f"(first on line {seen[cid]}); keep one decision per cell"
                        )
                    seen[cid] = line
                    rows.append((cid, self.check(cid, r["label"], f"{path}:{line}")))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise ReviewError(f"{path}: cannot read the decisions ({e})") from e
        self._insert(rows)
        return len(rows)

    def _insert(self, rows: list[tuple[int, str | None]]) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(
                "INSERT INTO review (cell_id, label, reviewer, time) VALUES (?, ?, ?, ?)",
                [(cid, label, self.name, now) for cid, label in rows],
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise


def current_user() -> str:
    """The login name a decision is recorded under when no name is given."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# -- the review window ----------------------------------------------------------------------------

KEYS_HELP = "1-9: class   Enter: model's call   x: not a cell   n: skip   b: undo   q: quit"


def _panel(cell: ReviewedCell, image, position: str, labels: tuple[str, ...]):
    """The window's picture: the crop enlarged, the model's top three, and the keys."""
    import cv2

    side = 320
    crop = (
        cv2.resize(image, (side, side), interpolation=cv2.INTER_CUBIC)
        if image is not None
        else np.full((side, side, 3), 200, np.uint8)
    )
    panel = np.full((side, 360, 3), 250, np.uint8)
    lines = [position, f"cell {cell.id}: {cell.source} #{cell.frame}", f"flag: {cell.flag or 'none'}", ""]
    lines += [f"{l} {p:.2f}" for l, p in cell.top(3)] + [""]
    lines += [f"{k + 1} {l}" for k, l in enumerate(labels[:9])]
    for k, text in enumerate(lines):
        cv2.putText(panel, text, (10, 22 + 17 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (30, 30, 30), 1, cv2.LINE_AA)
    out = np.hstack([crop, panel])
    foot = np.full((24, out.shape[1], 3), 235, np.uint8)
    cv2.putText(foot, KEYS_HELP, (8, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (30, 30, 30), 1, cv2.LINE_AA)
    return np.vstack([out, foot])


def review_window(
    reviewer: Reviewer, include_counted: bool = False, show=None, wait_key=None, echo=print, order=None
) -> int:
    """Go through the queue in a window; returns the number of decisions recorded.

    ``show(image)`` and ``wait_key() -> int`` default to an OpenCV window; they are parameters so
    that the loop can be driven without a screen."""
    import cv2

    if show is None:

        def show(img):
            cv2.imshow("bmc review", img)

    if wait_key is None:

        def wait_key():
            return cv2.waitKey(0)

    todo = order(reviewer.cells()) if order else queue(reviewer.cells(), include_counted)
    done: list[int] = []
    k = 0
    while 0 <= k < len(todo):
        cell = todo[k]
        image = cv2.imread(str(reviewer.out_dir / cell.crop)) if cell.crop else None
        show(_panel(cell, image, f"{k + 1} of {len(todo)} to review", cell.labels))
        key = wait_key() & 0xFF
        label = None
        if key in (ord("q"), 27):
            break
        if ord("1") <= key <= ord("9") and key - ord("1") < len(cell.labels):
            label = cell.labels[key - ord("1")]
        elif key in (13, 10):
            label = cell.model_label
        elif key == ord("x"):
            label = REJECTED
        elif key in (ord("b"), 8):
            if done:  # withdraw the last decision and show that cell again
                last = done.pop()
                reviewer.undo(last)
                echo(f"cell {last}: decision withdrawn")
                k = next(i for i, c in enumerate(todo) if c.id == last)
            else:
                k = max(0, k - 1)
            continue
        elif key in (ord("n"), ord(" ")):
            k += 1
            continue
        else:
            continue  # an unassigned key: ask again
        reviewer.decide(cell.id, label)
        done.append(cell.id)
        echo(f"cell {cell.id}: {label} (model: {cell.model_label} {cell.confidence:.2f})")
        k += 1
    return len(done)
