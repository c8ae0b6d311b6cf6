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
import datetime
import getpass
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from bmc.edge_app import sessiondb
from bmc.edge_app.differential import SPECIMENS, DifferentialCount, differential_of
from bmc.edge_app.sessiondb import REJECTED, ReviewedCell
from bmc.edge_app.sources.base import IMAGE_SUFFIXES
from bmc.edge_app.unknown import FLAG as UNKNOWN
from bmc.errors import BmcError

_NEW_LABEL = re.compile(r"^[a-z][a-z0-9 _-]{0,39}$")


class ReviewError(BmcError, ValueError):
    """A decision that cannot be recorded (no such cell, unknown label, unreadable file)."""


class StaleReview(ReviewError):
    """A decision from a page that showed the cell before someone else decided it."""


def where(c: ReviewedCell) -> str:
    """Where a cell was met, as a technician finds it again (:func:`where_in`)."""
    return where_in(c.source, c.frame)


def where_in(source: str, frame: int) -> str:
    """A frame as a technician finds it again: an image file by its name (its index in the folder
    is no number of the file's), a video's or a camera's frame by its source and number."""
    still = Path(source).suffix.lower() in IMAGE_SUFFIXES
    return source if still else f"{source}, frame {frame}"


def counts_after_review(all_cells: list[ReviewedCell]) -> Counter[str]:
    """Counts by final label: the model's sure calls and the reviewed cells; nothing pending or rejected."""
    return Counter(c.final_label for c in all_cells if c.final_label)


def specimen_of(db: sqlite3.Connection) -> str:
    """What the folder's sessions counted (``blood`` or ``marrow``), as the latest session recorded
    it; a session recorded before the setting existed counted blood (the shipped models' specimen)."""
    last = sessiondb.last_session(db)
    specimen = last.config.specimen if last else "blood"
    return specimen if specimen in SPECIMENS else "blood"


def calibration_record(db: sqlite3.Connection) -> dict[str, Any] | None:
    """The latest session's calibration as its model's card recorded it (``LabCalibration.to_dict``:
    the accuracy, its interval, the cells it rests on), or None when it was not calibrated."""
    last = sessiondb.last_session(db)
    cal = last.config.calibration if last else None
    return dict(cal) if isinstance(cal, dict) else None


def calibration_statement(db: sqlite3.Connection) -> str:
    """How accurate the cells counted with no person are estimated to be at this microscope, as
    the latest session's model was calibrated (:mod:`bmc.edge_app.calibration`); '' when it was not."""
    last = sessiondb.last_session(db)
    return last.config.calibration_statement if last else ""


def session_differential(db: sqlite3.Connection, all_cells: list[ReviewedCell] | None = None) -> DifferentialCount:
    """The folder's differential after review, the one record the report, the screen and FHIR render:
    every cell by its final class, the latest session's classes listed (zeros too), the cells still
    waiting for review in no class."""
    all_cells = sessiondb.cells(db) if all_cells is None else all_cells
    last = sessiondb.last_session(db)
    labels = list(last.labels) if last else []
    pending = [c for c in all_cells if c.status == "pending"]
    return differential_of(
        counts_after_review(all_cells), labels, specimen_of(db), len(pending), sum(c.unknown for c in pending)
    )


def when(iso: str | None, seconds: bool = False) -> str:
    """A recorded time as a person at the device reads it: in the device's time zone, named
    ("2026-12-04 05:34 CET"); the record itself stays in UTC. '' for none; as written if unreadable."""
    if not iso:
        return ""
    try:
        t = datetime.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z" if seconds else "%Y-%m-%d %H:%M %Z")


_HOW_IT_ENDED = {
    "stopped": "the session was stopped",
    sessiondb.SHORT: "the source ran out of fields",
    "interrupted": "the session was interrupted",
    "disk-full": "the disk was full",
}


def target_statement(
    sessions: Sequence[sessiondb.SessionRecord], record: DifferentialCount, recording: bool, rejected: int = 0
) -> str:
    """The count against the size the laboratory asked for (the latest session's ``--target``), as
    the report, the screen and FHIR state it; '' where no target was set. ``recording``: a session
    is being recorded into the folder now (its lock is held: a 'running' row alone may be a crash).
    A count short of its target says so, and why where the record knows it."""
    last = sessions[-1] if sessions else None
    target = last.config.target if last else None
    if not last or not target:
        return ""
    n = record.total
    of = record.denominator if target > 1 else record.denominator.removesuffix("s")
    if recording:
        return f"Counting toward a target of {target} {of}: {n} so far"
    if n >= target:
        return f"Target of {target} {of} reached" + (f" ({n} counted)" if n > target else "")
    how = _HOW_IT_ENDED.get(last.status, "")
    if not how and last.status == "running":
        how = "the session ended without closing (a crash or a power cut)"
    if not how and rejected:
        how = f"{rejected} {'cell' if rejected == 1 else 'cells'} rejected at review"
    return f"Short of its target: {n} of {target} {of} counted" + (f" ({how})" if how else "")


def in_words(flag: str) -> str:
    """Why a cell waits, as a technician reads it (the recorded flag, with its figures, is the
    card's tooltip and the cell page's)."""
    if not flag:
        return "counted"
    if flag.startswith(UNKNOWN):
        return "unlike the cells it learnt"
    if flag.startswith("low confidence"):
        return "the model is unsure" + flag[len("low confidence") :].replace(" ", " (", 1) + ")"
    if flag.startswith("top two within"):
        return "two classes nearly tie"
    return flag


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

    folder = sessiondb.folder_of(db).name
    by_id = {c.id: c for c in all_cells}
    out = []
    for s in sessiondb.sessions(db):
        ids = [c.id for c in all_cells if c.session_id == s.id]
        out += [
            by_id[i]
            for i in calibration_order(ids, session_seed(folder, s.id, s.started))
            if not by_id[i].reviewed_label
        ]
    return out


DECISION_COLUMNS = ("id", "label", "model_label", "confidence", "flag", "source", "frame", "crop")


def write_decisions_template(
    out_dir: str | Path,
    stream: TextIO,
    for_adapt: bool = False,
    per_class: int | None = None,
    include_counted: bool = False,
    for_calibration: int | None = None,
) -> int:
    """The cells to review as a decisions file with its label column empty (``bmc edge review
    --list``), read-only: the review queue, the teaching queue ``for_adapt``, or the first
    ``for_calibration`` cells of the calibration queue. Returns how many."""
    import csv

    db = sessiondb.connect(out_dir)
    try:
        found = sessiondb.cells(db)
        if for_calibration:
            todo = calibration_queue(db, found)[:for_calibration]
        else:
            todo = teaching_queue(found, per_class) if for_adapt else queue(found, include_counted)
    finally:
        db.close()
    out = csv.writer(stream)
    out.writerow(DECISION_COLUMNS)
    out.writerows([c.id, "", c.model_label, f"{c.confidence:.3f}", c.flag, c.source, c.frame, c.crop] for c in todo)
    return len(todo)


def _margin(probs: Sequence[float]) -> float:
    top = sorted(probs)[-2:]
    return top[-1] - top[0] if len(top) == 2 else 1.0


_IDENTIFIER = re.compile(
    r"\d{6,}|[\w.+-]+@[\w-]+\.\w+"  # a record number, an e-mail address
    r"|\b\d{1,2}[./-]\d{1,2}[./-](19|20)\d{2}\b|\b(19|20)\d{2}[./-]\d{1,2}[./-]\d{1,2}\b"  # a date, either way round
    r"|\b(dob|d\.o\.b\.?|date of birth|mrn)\b",
    re.IGNORECASE,
)


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
    db = sessiondb.connect(out_dir, write=True)
    try:
        sessiondb.add_note(db, text, author)
    finally:
        db.close()
    return text


class Reviewer:
    """Records one person's decisions in a session folder's database, one commit per decision."""

    def __init__(
        self, out_dir: str | Path, name: str | None = None, allow_new_labels: bool = False, check: bool = False
    ):
        """``check``: SQLite's quick check of the database first (``bmc edge review``; the screen's
        pages have read the whole folder before a decision reaches it)."""
        self.out_dir = Path(out_dir)
        self.name = (name or current_user()).strip() or "unknown"
        self.allow_new = allow_new_labels
        self.left_blank = 0  # rows of the latest apply() with no label
        self.db = sessiondb.connect(out_dir, write=True)
        if check:
            try:
                sessiondb.check_intact(self.db, out_dir)
            except BaseException:
                self.db.close()
                raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Reviewer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cells(self) -> list[ReviewedCell]:
        return sessiondb.cells(self.db)

    def check(self, cell_id: int, label: str, where: str = "") -> str:
        """The decision as it will be stored, or :class:`ReviewError` saying what is wrong."""
        at = f"{where}: " if where else ""
        known = sessiondb.labels_of_cell(self.db, cell_id)
        if known is None:
            raise ReviewError(f"{at}no cell {cell_id} in {self.out_dir / 'session.sqlite'}")
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

    def decide(self, cell_id: int, label: str, seen: int | None = None) -> str:
        """Record ``label`` for the cell. ``seen``: the cell's latest review row on the page the person
        decided from (0: undecided there); where someone decided it since, nothing is recorded
        (:class:`StaleReview`)."""
        label = self.check(cell_id, label)
        self._insert([(cell_id, label)], None if seen is None else {cell_id: seen})
        return label

    def undo(self, cell_id: int, seen: int | None = None) -> None:
        """Withdraw the latest decision on ``cell_id``: the cell goes back to the model's call.
        ``seen``: the decision the person means (its review row); another since, nothing is withdrawn."""
        if not sessiondb.has_cell(self.db, cell_id):
            raise ReviewError(f"no cell {cell_id} in {self.out_dir / 'session.sqlite'}")
        latest = sessiondb.latest_review(self.db, cell_id)
        if latest is None or latest[1] is None:
            if seen:  # the page showed a decision that someone withdrew since
                self._insert([], {cell_id: seen})
            raise ReviewError(f"cell {cell_id} has no decision to withdraw")
        self._insert([(cell_id, None)], None if seen is None else {cell_id: seen})

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
                rows: list[tuple[int, str | None]] = []
                seen: dict[int, int] = {}
                self.left_blank = 0
                for line, r in enumerate(reader, start=2):
                    if not (r.get("label") or "").strip():
                        self.left_blank += 1  # a cell left undecided
                        continue
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

    def _insert(self, rows: list[tuple[int, str | None]], seen: dict[int, int] | None = None) -> None:
        try:
            sessiondb.add_reviews(self.db, rows, self.name, seen)
        except sessiondb.StaleDecision as e:
            raise StaleReview(f"{e}: nothing was recorded; decide again on the page as it is now") from e


def current_user() -> str:
    """The login name a decision is recorded under when no name is given."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# -- the review window ----------------------------------------------------------------------------

KEYS_HELP = "1-9: class   Enter: model's call   x: not a cell   n: skip   b: undo   q: quit"


def _panel(cell: ReviewedCell, image: np.ndarray | None, position: str, labels: tuple[str, ...]) -> np.ndarray:
    """The window's picture: the crop enlarged, the model's top three, and the keys."""
    import cv2

    side = 320
    crop = (
        cv2.resize(image, (side, side), interpolation=cv2.INTER_CUBIC)
        if image is not None
        else np.full((side, side, 3), 200, np.uint8)
    )
    panel = np.full((side, 360, 3), 250, np.uint8)
    lines = [position, f"cell {cell.id}: {where(cell)}", f"flag: {in_words(cell.flag)}", ""]
    lines += [f"{l} {p:.2f}" for l, p in cell.top(3)] + [""]
    lines += [f"{k + 1} {l}" for k, l in enumerate(labels[:9])]
    for k, text in enumerate(lines):
        cv2.putText(panel, text, (10, 22 + 17 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (30, 30, 30), 1, cv2.LINE_AA)
    out = np.hstack([crop, panel])
    foot = np.full((24, out.shape[1], 3), 235, np.uint8)
    cv2.putText(foot, KEYS_HELP, (8, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (30, 30, 30), 1, cv2.LINE_AA)
    return np.vstack([out, foot])


def review_window(
    reviewer: Reviewer,
    include_counted: bool = False,
    show: Callable[[np.ndarray], None] | None = None,
    wait_key: Callable[[], int] | None = None,
    echo: Callable[[str], None] = print,
    order: Callable[[list[ReviewedCell]], list[ReviewedCell]] | None = None,
) -> int:
    """Go through the queue in a window; returns the number of decisions recorded.

    ``show(image)`` and ``wait_key() -> int`` default to an OpenCV window; they are parameters so
    that the loop can be driven without a screen."""
    import cv2

    if show is None:

        def show(img: np.ndarray) -> None:
            cv2.imshow("bmc review", img)

    if wait_key is None:

        def wait_key() -> int:
            return int(cv2.waitKey(0))

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
