"""The differential as an HL7 FHIR R4 ``DiagnosticReport`` for a laboratory information system.

One ``Bundle`` (type ``collection``) holds the report and one ``Observation`` per counted class:
its share of the leukocytes counted, as the laboratory's manual differential reports it (LOINC
"…/100 leukocytes in Blood by Manual count": a person reviews what the device sets aside, as a
technician does at a manual count). Every Observation also carries the raw count, the number of
leukocytes behind the share and its exact 95% binomial limits (Rümke, a ``valueRange`` component),
and bmc's own code for the class, every class of the differential listed (zeros too), in clinical
order. Erythroblasts are reported per 100 leukocytes beside the differential, as nucleated red
cells are; platelets are not leukocytes and are reported as a count only. A marrow count
(myelogram) is per 100 nucleated cells, erythroid precursors included, with bmc's codes alone (the
LOINC codes here are blood's). A class without a LOINC code here (``ig``, a class a laboratory
added) keeps bmc's code and its name. Where the laboratory calibrated the model, one more
Observation states how accurate the cells counted without a person are estimated to be at this
microscope, its 95% interval and the randomly chosen reviewed cells it rests on.

Nothing identifies a patient: the device never knows who the smear belongs to. The LIS adds the
subject when it files the report. The report is ``preliminary`` while cells wait for review (or
unknown cells wait for a name), ``final`` once every cell is decided. A folder has one report: its
id and ``identifier`` (fixed by the folder's first session) and each class's Observation id are the
same on every export, so a LIS files a later export over the earlier one; once the report went out
final, one that has changed since (a decision that moved a cell, a comment, a new session) is
``corrected`` (its differential changed) or ``amended`` (its comment or statement did) and says
which report it replaces: the folder records each report it issues, as it went out
(``session.sqlite``, table ``export``). While cells wait again, or a session still records, the
export is that report, unchanged: never unfinished numbers over a released result.

Numpy-free and standard-library only: the device writes it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from bmc.edge_app import review, sessiondb
from bmc.edge_app.differential import NRBC
from bmc.edge_app.differential import display as display_name
from bmc.edge_app.folder_lock import is_locked, outputs
from bmc.stages import PARENT

log = logging.getLogger(__name__)

LOINC = "http://loinc.org"
BMC_CODES = "urn:bmc-edge:cell-class"  # the kit's own codes: its class names
UCUM = "http://unitsofmeasure.org"
IDENTIFIER_SYSTEM = "urn:bmc-edge:differential"  # a folder's report, whichever export carries it
FINAL = ("final", "corrected", "amended")  # a report in one of these went out for the LIS to act on

#: class → (LOINC code, display): "/100 leukocytes in Blood by Manual count", each code's long
#: common name as LOINC publishes it (loinc.org; the manual differential panel 24318-8 lists them)
LOINC_MANUAL = {
    "neutrophil": ("23761-0", "Neutrophils/100 leukocytes in Blood by Manual count"),  # (26508-2 is bands)
    "segmented": ("769-0", "Neutrophils.segmented/100 leukocytes in Blood by Manual count"),
    "band": ("764-1", "Neutrophils.band form/100 leukocytes in Blood by Manual count"),
    "metamyelocyte": ("740-1", "Metamyelocytes/100 leukocytes in Blood by Manual count"),
    "myelocyte": ("749-2", "Myelocytes/100 leukocytes in Blood by Manual count"),
    "promyelocyte": ("783-1", "Promyelocytes/100 leukocytes in Blood by Manual count"),
    "lymphocyte": ("737-7", "Lymphocytes/100 leukocytes in Blood by Manual count"),
    "monocyte": ("744-3", "Monocytes/100 leukocytes in Blood by Manual count"),
    "eosinophil": ("714-6", "Eosinophils/100 leukocytes in Blood by Manual count"),
    "basophil": ("707-0", "Basophils/100 leukocytes in Blood by Manual count"),
    "erythroblast": ("18309-5", "Nucleated erythrocytes/100 leukocytes in Blood by Manual count"),
}
PANEL = ("24318-8", "Manual differential panel - Blood")


def _coding(label: str, specimen: str = "blood") -> dict[str, Any]:
    codings = []
    if label in LOINC_MANUAL and specimen == "blood":  # the LOINC codes are blood's: a myelogram keeps bmc's
        code, display = LOINC_MANUAL[label]
        codings.append({"system": LOINC, "code": code, "display": display})
    codings.append({"system": BMC_CODES, "code": label, "display": display_name(label)})
    return {"coding": codings, "text": label}


def _count(k: int, what: str = "cells counted", code: str = "count") -> dict[str, Any]:
    return {
        "code": {
            "coding": [{"system": BMC_CODES, "code": code, "display": what}],
            "text": what,
        },
        "valueQuantity": {"value": k, "unit": "cells", "system": UCUM, "code": "{cells}"},
    }


def _percent(value: float) -> dict[str, Any]:
    return {"value": round(value, 1), "unit": "%", "system": UCUM, "code": "%"}


def _limits(low: float, high: float, what: str = "exact 95% limits") -> dict[str, Any]:
    """A component holding a 95% interval as a Range of percentages, for a LIS to read."""
    return {
        "code": {"coding": [{"system": BMC_CODES, "code": "95-limits", "display": what}], "text": what},
        "valueRange": {"low": _percent(low), "high": _percent(high)},
    }


def _calibration(cal: dict[str, Any] | None) -> tuple[float, float, float, int, int] | None:
    """(accuracy %, low %, high %, cells right, cells passed) of a recorded calibration, or None
    where it states no accuracy (no cell passed its gates, or a record without one)."""
    try:
        lo, hi = cal["interval"]  # type: ignore[index]
        right, passed = int(cal["correct"]), int(cal["passed"])  # type: ignore[index]
        return 100.0 * right / passed, 100.0 * float(lo), 100.0 * float(hi), right, passed
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def diagnostic_report(out_dir: str | Path, now: datetime.datetime | None = None, issue: bool = False) -> dict[str, Any]:
    """The FHIR R4 Bundle of the session folder's differential (all its sessions, after review):
    the folder's :class:`~bmc.edge_app.differential.DifferentialCount`, as the report shows it.
    ``issue``: it goes out (the file written, the screen's download), and the folder records it, so
    that a later report that differs from one that went out final is its correction. Issuing takes
    the folder's outputs lock (:func:`bmc.edge_app.folder_lock.outputs`): what went out before is
    read and the new report recorded in one turn, so that two downloads at once issue one report."""
    out_dir = Path(out_dir)
    with outputs(out_dir) if issue else contextlib.nullcontext():
        return _report(out_dir, now, issue)


def _report(out_dir: Path, now: datetime.datetime | None, issue: bool) -> dict[str, Any]:
    db = sessiondb.connect(out_dir)
    try:
        with sessiondb.snapshot(db):
            sessions = sessiondb.sessions(db)
            cells = sessiondb.cells(db)
            note = sessiondb.latest_note(db)
            record = review.session_differential(db, cells)
            statement = review.calibration_statement(db)
            calibration = _calibration(review.calibration_record(db))
            issued_before = sessiondb.exports(db)
    finally:
        db.close()
    # one report per folder, whatever rewrites it: the same id and identifier on every export, so a
    # LIS sees a later one replace the earlier
    report_id = folder_identity(sessions)
    counts = _digest(record.to_dict())
    recording = any(s.status == "running" for s in sessions) and is_locked(out_dir)
    target = review.target_statement(sessions, record, recording, sum(c.status == "rejected" for c in cells))
    # who decided cells at the device (named one set aside, confirmed or rejected one): said in the conclusion
    deciders = sorted({c.reviewer for c in cells if c.reviewed_label and c.reviewer})
    # (the target sentence in the digest only where there is one: a folder issued before it existed and
    # with no target reads as before)
    content = _digest(
        [record.to_dict(), statement, note.text if note else None, [s.id for s in sessions]]
        + ([target] if target else [])
    )
    went_out = [e for e in issued_before if e.status in FINAL]
    last = went_out[-1] if went_out else None
    if record.waiting or recording:
        status = "preliminary"
    elif last is None:
        status = "final"
    elif counts != last.counts:
        status = "corrected"  # the differential itself changed after it went out
    elif content != last.content:
        status = "amended"  # its comment, its statement or its sessions did
    else:
        status = last.status
    latest = issued_before[-1] if issued_before else None
    if latest is not None and (latest.status, latest.counts, latest.content) == (status, counts, content):
        return dict(json.loads(latest.document))  # nothing changed: the report as it went out, byte for byte
    if status == "preliminary" and last is not None:
        # cells wait again after a report went out: that one stands, unchanged, until every cell is decided
        return dict(json.loads(last.document))
    now = now or datetime.datetime.now(datetime.timezone.utc)
    issued = now.isoformat(timespec="seconds")
    started = sessions[0].started if sessions else issued
    ended = (sessions[-1].ended or issued) if sessions else issued
    effective = {"start": _instant(started), "end": _instant(ended)}
    entries, refs = [], []
    of = "leukocytes" if record.specimen == "blood" else "nucleated cells"

    def observation(
        label: str,
        k: int,
        value: dict[str, Any] | None,
        notes: list[str],
        limits: tuple[float, float] | None = None,
        code: dict[str, Any] | None = None,
        count_what: tuple[str, str] = ("cells counted", "count"),
    ) -> None:
        oid = str(uuid.uuid5(uuid.UUID(report_id), label))  # the same class, the same Observation
        obs = {
            "resourceType": "Observation",
            "id": oid,
            "status": status,
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "laboratory",
                            "display": "Laboratory",
                        }
                    ]
                }
            ],
            "code": code or _coding(label, record.specimen),
            "effectivePeriod": effective,
            "issued": issued,
            "method": {
                "text": "digital morphology at the microscope (bmc); cells it sets aside are counted only once a "
                "person names them"
            },
            "component": [_count(k, *count_what)] + ([_limits(*limits)] if limits else []),
        }
        if value is not None:
            obs["valueQuantity"] = value
        if label in PARENT:
            notes.append(f"a maturation stage of '{PARENT[label]}'")
        if notes:
            obs["note"] = [{"text": t} for t in notes]
        entries.append({"fullUrl": f"urn:uuid:{oid}", "resource": obs})
        refs.append({"reference": f"urn:uuid:{oid}"})

    for r in record.rows:
        value = _percent(r.percent) if record.total else None
        notes = [f"{r.count} of {record.total} {of} counted; exact 95% limits {r.limits()}"] if record.total else []
        shown = (r.low, r.high) if record.total and r.low is not None and r.high is not None else None
        observation(r.label, r.count, value, notes, shown)
    if record.nrbc is not None:
        value = (
            {"value": round(record.nrbc.percent, 1), "unit": "/100 leukocytes", "system": UCUM, "code": "/100{WBCs}"}
            if record.total
            else None
        )
        notes = [
            f"{NRBC}: {record.nrbc.count} nucleated red cells ({record.nrbc.label}s) per {record.total} leukocytes, "
            "beside the differential"
        ]
        observation(record.nrbc.label, record.nrbc.count, value, notes)
    if record.platelets:
        observation("platelet", record.platelets, None, ["a count only: platelets are in no denominator"])
    if calibration is not None:  # how far the cells counted with no person can be trusted, for the LIS to read
        accuracy, lo, hi, right, passed = calibration
        what = "estimated accuracy of the cells counted without a person at this microscope"
        observation(
            "unaided-accuracy",
            passed,
            _percent(accuracy),
            [statement, f"{right} of {passed} randomly chosen reviewed cells that passed the gates were right"],
            (lo, hi),
            {"coding": [{"system": BMC_CODES, "code": "unaided-accuracy", "display": what}], "text": what},
            ("randomly chosen reviewed cells the estimate rests on", "calibration-cells"),
        )
    conclusion = (
        f"{'Blood' if record.specimen == 'blood' else 'Marrow'} differential of {record.total} {of}"
        + (f" (myeloid : erythroid {record.me_ratio:.2f})" if record.me_ratio is not None else "")
        + (
            f"; {record.waiting} {'cell waits' if record.waiting == 1 else 'cells wait'} for review and "
            f"{'is' if record.waiting == 1 else 'are'} not counted"
            if record.waiting
            else ""
        )
        + (f", {record.unknown} of them unlike any cell the model knows" if record.unknown else "")
        + (f". {target}" if target else "")
        + (f". Cells decided at the device by {', '.join(deciders)}" if deciders else "")
        + (f". {statement}" if statement else "")
        + (f". Comment: {note.text}" if note else "")
        + "."
    )
    models = sorted({_model_of(s) for s in sessions})
    # what this report says of the one that went out before it, the same on every export of it
    differs = [e for e in went_out if (e.counts, e.content) != (counts, content)]
    if status in ("corrected", "amended") and differs:
        was = differs[-1]
        conclusion += f" Replaces the {was.status} report issued {_instant(was.time)}: " + (
            "its differential corrected after review."
            if status == "corrected"
            else "its comment, statement or sessions amended."
        )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": f"urn:uuid:{report_id}"}],
        "status": status,
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "HM", "display": "Hematology"}
                ]
            }
        ],
        "code": (
            {"coding": [{"system": LOINC, "code": PANEL[0], "display": PANEL[1]}], "text": "Differential count"}
            if record.specimen == "blood"
            else {
                "coding": [{"system": BMC_CODES, "code": "myelogram", "display": "Marrow differential"}],
                "text": "Marrow differential (per 100 nucleated cells)",
            }
        ),
        "effectivePeriod": effective,
        "issued": issued,
        "result": refs,
        "conclusion": conclusion,
    }
    if models:
        report["conclusion"] += " Classified by " + ", ".join(models) + "; decision support, not a diagnosis."
    bundle = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "collection",
        "timestamp": issued,
        "entry": [{"fullUrl": f"urn:uuid:{report_id}", "resource": report}, *entries],
    }
    if issue:
        document = json.dumps(bundle, ensure_ascii=False)
        export = sessiondb.Export(now.isoformat(timespec="milliseconds"), status, counts, content, document)
        _record(out_dir, export)
    return bundle


def _model_of(s: sessiondb.SessionRecord) -> str:
    """The model a session counted with: its file and, for an adapted model, the head that named
    the cells (the base file alone is the shipped model's, byte for byte)."""
    said = f"{s.model_file} (sha256 {s.model_sha256[:12]})"
    head = s.config.head
    if head and head.get("file"):
        said += f" with head {head['file']} (sha256 {str(head.get('sha256', ''))[:12]})"
    return said


def last_issued(out_dir: str | Path) -> dict[str, Any] | None:
    """The report the folder last issued, as it went out; None where none was."""
    db = sessiondb.connect(out_dir)
    try:
        issued = sessiondb.exports(db)
    finally:
        db.close()
    return dict(json.loads(issued[-1].document)) if issued else None


def _digest(what: Any) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _record(out_dir: Path, e: sessiondb.Export) -> None:
    """The issued report into the folder's record (one that says what the latest one said is that
    one, returned before it is built); a folder that cannot be written (a copy on a read-only stick)
    still gives its report."""
    try:
        db = sessiondb.connect(out_dir, write=True)
    except (OSError, sqlite3.OperationalError) as err:
        log.warning("%s: the issued report was not recorded (%s)", out_dir, err)
        return
    try:
        sessiondb.add_export(db, e)
    except sqlite3.OperationalError as err:
        log.warning("%s: the issued report was not recorded (%s)", out_dir, err)
    finally:
        db.close()


def folder_identity(sessions: list[sessiondb.SessionRecord]) -> str:
    """The folder's report's id: a UUID fixed by its first session (when and where it started, on
    which device), the same in every copy of the folder and on every export."""
    first = sessions[0] if sessions else None
    key = f"{first.started}|{first.device}|{first.source}|{first.model_sha256}" if first else "empty"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{IDENTIFIER_SYSTEM}:{key}"))


def _instant(text: str) -> str:
    """A stored timestamp as a FHIR dateTime (with its zone; UTC where the record has none)."""
    t = datetime.datetime.fromisoformat(text)
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.isoformat(timespec="seconds")


def write(out_dir: str | Path) -> Path:
    """``differential.fhir.json`` in the session folder (written atomically)."""
    from bmc.edge_app.store import write_atomic

    path = Path(out_dir) / "differential.fhir.json"
    with outputs(out_dir):  # the file written is the report recorded last
        text = json.dumps(diagnostic_report(out_dir, issue=True), indent=2, ensure_ascii=False) + "\n"
        return write_atomic(path, text)
