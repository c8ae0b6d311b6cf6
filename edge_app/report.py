"""``bmc edge report DIR``: one self-contained HTML file per session folder.

Counts, percentages and derived ratios after review (:mod:`bmc.edge_app.review`), the cells still
waiting for review and those a person decided, and a thumbnail grid per class — images inlined
as base64, no script, no external link: it opens in any browser on a machine with no network,
and can be printed or copied to a USB stick as it is.
"""

from __future__ import annotations

import base64
import errno
import html
import shutil
import sqlite3
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bmc.edge_app import review, sessiondb, store
from bmc.edge_app.differential import NRBC, ClassShare, DifferentialCount, count_interval, differential_of, display
from bmc.edge_app.folder_lock import is_locked, outputs
from bmc.edge_app.sessiondb import ReviewedCell, SessionRecord
from bmc.errors import BmcError
from bmc.stages import coarse_counts, series_counts

THUMBS_PER_CLASS = 48


def session_file(out_dir: Path, rel: str) -> Path | None:
    """``rel`` (a path the session database holds) as a file inside ``out_dir``, or None when it
    leads outside the folder (absolute, ``..``, a symlink out): a report embeds only the session's
    own files, whatever its database says."""
    if not rel:
        return None
    root = out_dir.resolve()
    try:
        path = (root / rel).resolve()
    except (OSError, RuntimeError):
        return None
    return path if path.is_relative_to(root) and path != root else None


# A thumbnail shown at ``size`` CSS pixels is embedded at twice that (sharp on a high-density
# screen and in print), not as the stored crop (420 px at the shipped scale: the report of one
# BCCD session fell from 3.3 MB to about 1 MB).
THUMB_SCALE = 2
THUMB_QUALITY = 85


def _img(out_dir: Path, rel: str, size: int = 72) -> str:
    missing = '<div class="missing" style="width:{0}px;height:{0}px">{1}</div>'
    path = session_file(out_dir, rel)
    if path is None:
        return missing.format(size, "not in session")
    try:
        raw = np.frombuffer(path.read_bytes(), np.uint8)
    except OSError:
        return missing.format(size, "missing")
    image = cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    if image is None:
        return missing.format(size, "unreadable")
    side = size * THUMB_SCALE
    h, w = image.shape[:2]
    if max(h, w) > side:
        f = side / max(h, w)
        image = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, THUMB_QUALITY])
    if not ok:
        return missing.format(size, "unreadable")
    data = base64.b64encode(buf.tobytes()).decode()
    return f'<img src="data:image/jpeg;base64,{data}" width="{size}" height="{size}" alt="">'


def build_report(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    try:
        return _build_report(out_dir)
    except sqlite3.OperationalError as e:
        full = shutil.disk_usage(out_dir).free < (1 << 20)
        raise ReportError(
            f"{out_dir / 'session.sqlite'}: cannot be read ({e})"
            + ("; the disk is full: free some space and run 'bmc edge report' again" if full else "")
        ) from e


def write_session_files(out_dir: str | Path, report: bool = True) -> list[Path]:
    """Every file a session folder derives from its database, rewritten together so that none is
    left stale beside another: ``cells.csv``, ``differential.csv``, ``report.html`` (with
    ``report``, or where one is already there) and ``differential.fhir.json`` where one is there.
    Each is written atomically, and the whole under the folder's outputs lock
    (:func:`bmc.edge_app.folder_lock.outputs`): of two rewrites at once (two decisions), the one
    written last has read the database last. Called when a session closes and after every decision."""
    out_dir = Path(out_dir)
    with outputs(out_dir):
        return _write_session_files(out_dir, report)


def _write_session_files(out_dir: Path, report: bool) -> list[Path]:
    from bmc.edge_app import fhir

    steps = [("cells.csv", store.write_csv), ("differential.csv", write_differential_csv)]
    if report or (out_dir / "report.html").exists():
        steps.append(("report.html", build_report))
    if (out_dir / "differential.fhir.json").exists():
        steps.append(("differential.fhir.json", fhir.write))
    written = []
    for name, write in steps:
        try:
            written.append(write(out_dir))
        except OSError as e:
            if isinstance(e, ReportError) or e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ReportError(
                f"{out_dir / name}: the disk is full; the report was not written (the session database is intact)"
            ) from e
    return written


def write_differential_csv(out_dir: str | Path) -> Path:
    """``differential.csv``: the folder's differential record, a row per class in clinical order
    (count, percent of the denominator, exact 95% limits), then the erythroblasts per 100 leukocytes
    of a blood count, the platelets and the cells waiting for review — for a spreadsheet."""
    import csv
    import io

    out_dir = Path(out_dir)
    db = sessiondb.connect(out_dir)
    try:
        record = review.session_differential(db)
    finally:
        db.close()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["specimen", "class", "count", "percent", "low", "high", "of"])
    for r in record.rows:
        w.writerow(
            [record.specimen, r.label, r.count, f"{r.percent:.1f}", f"{r.low:.1f}", f"{r.high:.1f}", record.denominator]
        )
    if record.nrbc is not None:
        w.writerow(
            [record.specimen, NRBC, record.nrbc.count, f"{record.nrbc.percent:.1f}", "", "", "per 100 leukocytes"]
        )
    w.writerow([record.specimen, "platelet", record.platelets, "", "", "", "apart"])
    w.writerow([record.specimen, "waiting for review", record.waiting, "", "", "", "not counted"])
    return write_atomic(out_dir / "differential.csv", buf.getvalue())


_PAGE = string.Template(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bmc differential — $name</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;color:#222} table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left} .bar{background:#6a5acd;height:12px}
.grid{display:flex;flex-wrap:wrap;gap:8px} figure{margin:0;font-size:11px;text-align:center;width:96px}
figcaption{overflow-wrap:anywhere;line-height:1.2} table.sessions td{overflow-wrap:anywhere;max-width:22em}
.missing{background:#eee;font-size:10px} .warn{color:#a40}
</style></head><body>
<h1>Differential count</h1>
$comment
<p>$specimen differential: <b>$n</b> $denominator counted ($named by a reviewer),
$rejected rejected in review, $frames frames
($bad unreadable$unreadable). $advice</p>
$target
$table
$calibration
<p style="font-size:12px">95% limits: the exact binomial confidence interval of each share for a count
of $n $denominator (the limits of Rümke's table): a differential of more cells narrows them.</p>
$levels
<h2>Cells waiting for review ($pending$unknown_note)</h2><div class="grid">$waiting</div>
<h2>Reviewed cells ($decided; the reviewer changed the model's call on $changed)</h2>
<div class="grid">$reviewed</div>
<h2>Cells by class</h2>$grids
<h2>Sessions</h2>
<table class="sessions">
<tr><th>id</th><th>started</th><th>ended</th><th>status</th><th>source</th><th>model</th><th>device</th><th>scale</th></tr>$sessions</table>
<p style="font-size:11px;color:#666">Generated by bmc from session.sqlite; all data stays on this device.</p>
</body></html>
"""
)


def _build_report(out_dir: Path) -> Path:
    db = sessiondb.connect(out_dir)
    sessions = sessiondb.sessions(db)
    n_frames, bad_frames = sessiondb.frame_counts(db)
    unreadable = sessiondb.unreadable_frames(db) if bad_frames else []
    cells = sessiondb.cells(db)
    notes = sessiondb.notes(db)
    record = review.session_differential(db, cells)
    statement = review.calibration_statement(db)
    db.close()
    labels = [r.label for r in record.rows]
    pending = sorted((c for c in cells if c.status == "pending"), key=lambda c: not c.unknown)  # unknown first
    n_unknown = sum(c.unknown for c in pending)
    decided = [c for c in cells if c.status in ("reviewed", "rejected")]
    parents = _parents(sessions)
    esc = html.escape
    doc = _PAGE.substitute(
        name=esc(out_dir.name),
        comment=_comments_html(notes),
        specimen="Blood" if record.specimen == "blood" else "Marrow",
        n=record.total,
        denominator=record.denominator,
        named=_cells(sum(c.status == "reviewed" for c in cells)) + " named",
        rejected=sum(c.status == "rejected" for c in cells),
        frames=n_frames,
        bad=bad_frames,
        unreadable=_unreadable(unreadable),
        advice=_advice(out_dir, len(pending), n_unknown),
        table=differential_html(record, _learnt(sessions), bars=True),
        calibration=f"<p><b>{html.escape(statement)}.</b></p>" if statement else "",
        target=_target_html(
            review.target_statement(
                sessions,
                record,
                any(s.status == "running" for s in sessions) and is_locked(out_dir),
                sum(c.status == "rejected" for c in cells),
            )
        ),
        levels=levels_html(record, parents) if parents else "",
        pending=len(pending),
        unknown_note=f"; {n_unknown} unlike any cell the model knows, first" if n_unknown else "",
        waiting=_figures(out_dir, pending, _waiting_caption) or "<p>none</p>",
        decided=len(decided),
        changed=sum(c.reviewed_label != c.model_label for c in decided),
        reviewed=_figures(out_dir, decided, _decided_caption) or "<p>none</p>",
        grids=_class_grids(out_dir, cells, labels + ([] if record.nrbc is None else [record.nrbc.label]))
        or "<p>no cell crops saved</p>",
        sessions=_session_rows(sessions, is_locked(out_dir)),
    )
    return write_atomic(out_dir / "report.html", doc)


def _cells(n: int) -> str:
    return f"{n} cell" if n == 1 else f"{n} cells"


def _comments_html(notes: list[Any]) -> str:
    """The session's comment (the latest), then the earlier ones, newest first."""
    if not notes:
        return ""
    esc = html.escape
    last, earlier = notes[-1], notes[:-1]
    out = f"<p>Comment: <b>{esc(last.text)}</b> ({esc(last.author)}, {esc(review.when(last.time))})</p>"
    if earlier:
        out += (
            "<p style='font-size:12px'>Earlier comments: "
            + "; ".join(f"{esc(n.text)} ({esc(n.author)}, {esc(review.when(n.time))})" for n in reversed(earlier))
            + "</p>"
        )
    return out


def _target_html(sentence: str) -> str:
    """The count against its target: in the warning colour where it fell short."""
    if not sentence:
        return ""
    cls = ' class="warn"' if sentence.startswith("Short") else ""
    return f"<p{cls}><b>{html.escape(sentence)}.</b></p>"


MAX_LISTED_UNREADABLE = 200  # a camera that fails for an hour: the rest are in the database


def _unreadable(frames: list[tuple[str, int, str]]) -> str:
    """The unreadable frames, each named with why ('' for none): a file by its name, a video's or a
    camera's frame by its source and index."""
    if not frames:
        return ""

    def reason(src: str, why: str) -> str:  # the file named once: a reason that begins with its path drops it
        head, _, rest = (why or "unreadable").partition(": ")
        return rest if rest and head.endswith(src) else why or "unreadable"

    names = [
        f"{html.escape(review.where_in(src, idx))} ({html.escape(reason(src, why))})"
        for src, idx, why in frames[:MAX_LISTED_UNREADABLE]
    ]
    more = len(frames) - MAX_LISTED_UNREADABLE
    return ": " + "; ".join(names) + (f"; and {more} more, not listed" if more > 0 else "")


def _learnt(sessions: list[SessionRecord]) -> dict[str, Any]:
    """The classes an adapted head learnt from this laboratory's reviewed cells ({label: note})."""
    learnt: dict[str, Any] = {}
    for srow in sessions:
        learnt.update(srow.config.new_labels)
    return learnt


def differential_html(record: DifferentialCount, learnt: dict[str, Any] | None = None, bars: bool = False) -> str:
    """A :class:`DifferentialCount` as HTML, the one rendering the report and the screen share:
    every class with its count, share and 95% limits, in clinical order (zeros too); then the
    nucleated red cells per 100 leukocytes beside a blood count, the M:E ratio of a marrow count,
    and the platelets apart."""
    learnt = learnt or {}
    esc = html.escape

    def name(l: str) -> str:
        note = learnt.get(l)
        return esc(display(l)) + (
            f" <small>(learnt from {int(note['cells'])} cells reviewed at this laboratory)</small>"
            if isinstance(note, dict) and "cells" in note
            else ""
        )

    def bar(r: ClassShare) -> str:
        return f"<td><div class='bar' style='width:{3 * r.percent:.0f}px'></div></td>" if bars else ""

    rows = "".join(
        f"<tr><td>{name(r.label)}</td><td class='num'>{r.count}</td><td class='num'>{r.percent:.1f}%</td>"
        f"<td class='num'>{r.limits()}</td>{bar(r)}</tr>"
        for r in record.rows
    )
    out = (
        f"<table class='differential'><tr><th>class</th><th>count</th><th>% of {record.denominator}</th>"
        f"<th>95% limits</th>{'<th></th>' if bars else ''}</tr>{rows}</table>"
    )
    rounded = record.rounding_note()
    if rounded:
        out += f"<p style='font-size:12px'>{esc(rounded)}</p>"
    if record.nrbc is not None:
        out += (
            f"<p>{NRBC}, nucleated red cells ({esc(record.nrbc.label)}): <b>{record.nrbc.count}</b>, "
            f"{record.nrbc.percent:.1f} per 100 leukocytes (beside the differential, not in it)</p>"
        )
    if record.specimen == "marrow":
        out += (
            f"<p>Myeloid : erythroid ratio <b>{record.me_ratio:.2f}</b></p>"
            if record.me_ratio is not None
            else "<p>Myeloid : erythroid ratio not defined (no erythroid cells counted)</p>"
        )
    out += (
        f"<p>Platelets seen: {record.platelets} (counted apart, in no denominator; the finder looks for "
        "nucleated cells, so this is not a platelet count)</p>"
    )
    return out


def _advice(out_dir: Path, pending: int, n_unknown: int) -> str:
    if not pending:
        return "No cell waits for review."
    return (
        f"Automated classification: <b class='warn'>{pending}</b> {'cell waits' if pending == 1 else 'cells wait'} "
        f"for review (<code>bmc edge review {html.escape(str(out_dir.resolve()))}</code>) and "
        f"{'is' if pending == 1 else 'are'} not counted yet"
        + (
            f"; <b class='warn'>{n_unknown}</b> of them {'is' if n_unknown == 1 else 'are'} unlike any cell the "
            f"model knows (a blast? a smudge?): {'it is' if n_unknown == 1 else 'they are'} counted in no class "
            f"until a person names {'it' if n_unknown == 1 else 'them'}"
            if n_unknown
            else ""
        )
        + "."
    )


def _waiting_caption(c: ReviewedCell) -> str:
    esc = html.escape
    why = f"<span title='{esc(c.flag)}'>{esc(review.in_words(c.flag))}</span>"
    return f"cell {c.id}<br>{esc(c.model_label)} {c.confidence:.2f}<br>{why}<br>{esc(review.where(c))}"


def _decided_caption(c: ReviewedCell) -> str:
    esc = html.escape
    return (
        f"cell {c.id}<br>model: {esc(c.model_label)} {c.confidence:.2f}<br><b>{esc(c.reviewed_label or '')}</b>"
        f"<br>{esc(c.reviewer)}"
    )


def _figures(out_dir: Path, cells: list[ReviewedCell], caption: Callable[[ReviewedCell], str], limit: int = 200) -> str:
    """Each cell's crop (where saved) with its caption, for the first ``limit`` cells."""
    return "".join(
        f"<figure>{_img(out_dir, c.crop) if c.crop else ''}<figcaption>{caption(c)}</figcaption></figure>"
        for c in cells[:limit]
    )


def _class_grids(out_dir: Path, cells: list[ReviewedCell], labels: list[str]) -> str:
    """A thumbnail grid per class: reviewed cells first, then the least confident."""
    grids = ""
    for l in labels:
        members = [c for c in cells if c.final_label == l and c.crop]
        if not members:
            continue
        shown = sorted(members, key=lambda c: (c.status != "reviewed", c.confidence))[:THUMBS_PER_CLASS]
        grids += (
            f"<h3>{html.escape(l)} — {len(members)} {'cell' if len(members) == 1 else 'cells'} (reviewed, then "
            f"least confident first, {len(shown)} "
            "shown)</h3><div class='grid'>"
            + "".join(
                f"<figure>{_img(out_dir, c.crop)}<figcaption>"
                f"{'reviewed' if c.status == 'reviewed' else f'{c.confidence:.2f}'}</figcaption></figure>"
                for c in shown
            )
            + "</div>"
        )
    return grids


def _session_rows(sessions: list[SessionRecord], live: bool) -> str:
    """One row per session: when, how it ended ('running' with no process recording: killed), the
    source, the model that counted, the device and the measured scale."""
    esc = html.escape
    return "".join(
        f"<tr><td>{s.id}</td><td>{esc(review.when(s.started, seconds=True))}</td><td>{esc(review.when(s.ended, seconds=True) or '—')}</td>"
        f"<td>{esc(s.status if s.status != 'running' or live else 'interrupted')}</td>"
        f"<td>{esc(s.source)}</td><td>{esc(s.model_file)}<br>"
        f"<code>{esc(s.model_sha256[:16])}…</code>{_orientations(s)}</td><td>{esc(s.device)}</td>"
        f"<td>{_scale(s)}</td></tr>"
        for s in sessions
    )


def _scale(session: SessionRecord) -> str:
    """The field's scale as the session measured it (red cells), or why there is none."""
    sc = session.config.scale or {}
    if not sc.get("red_cell_px"):
        return "—"
    colour = sc.get("red_cell_lab_ab")
    return (
        f"red cells {sc['red_cell_px']:.0f} px across → {sc['um_per_px']:.3f} µm/pixel "
        f"<small>({sc['measured_frames']} frames; a red cell taken as {sc['red_cell_um']} µm"
        + (
            f"; their colour a* {colour[0]:.0f}, b* {colour[1]:.0f}, which the finder does not take for a nucleus"
            if colour
            else ""
        )
        + ")</small>"
        + (
            f"; cells cut at {sc['cell_cut_px']:.0f} px"
            + (
                ""
                if sc.get("fixed")
                else f" <small>(to cut every session of this microscope at this scale from its first field on: "
                f"<code>[finder] red_cell_px = {sc['red_cell_px']:.0f}</code> and <code>[session] cell_diameter_px = "
                f"{sc['cell_cut_px']:.0f}</code> in bmc.toml)</small>"
            )
            if sc.get("cell_cut_px")
            else ""
        )
    )


def folder_parents(out_dir: str | Path) -> dict[str, str]:
    """A stage model's hierarchy as the folder's newest session recorded it ({} for an 8-class model)."""
    db = sessiondb.connect(out_dir)
    try:
        return _parents(sessiondb.sessions(db))
    finally:
        db.close()


def _parents(sessions: list[SessionRecord]) -> dict[str, str]:
    """A stage model's hierarchy (stage → 8-class parent), from the newest session's contract."""
    return next((p for p in (srow.config.parents for srow in reversed(sessions)) if p), {})


def levels_html(record: DifferentialCount, parents: dict[str, str]) -> str:
    """A stage model's second level: the 8-class differential (stages summed into their parents),
    computed and rendered as the first is, and the granulocytic series promyelocyte → segmented,
    each share with its 95% limits."""
    counted = {r.label: r.count for r in record.rows}
    if record.nrbc is not None:
        counted[record.nrbc.label] = record.nrbc.count
    counted["platelet"] = record.platelets
    classes = {parents.get(l, l) for l in counted}
    coarse = differential_of(coarse_counts(counted, parents), classes, record.specimen, record.waiting, record.unknown)
    series = series_counts(counted)
    s_total = sum(k for _, k in series)
    n = record.total

    def row(label: str, k: int) -> str:
        lo, hi = count_interval(k, s_total) if s_total else (0.0, 1.0)
        return (
            f"<tr><td>{html.escape(label)}</td><td>{k}</td><td>{100 * k / s_total if s_total else 0:.1f}%</td>"
            f"<td>{100 * lo:.1f}–{100 * hi:.1f}%</td><td>{100 * k / n if n else 0:.1f}%</td></tr>"
        )

    return (
        "<h2>8-class differential</h2><p style='font-size:12px'>The stages summed into their classes "
        "(promyelocytes, myelocytes and metamyelocytes are immature granulocytes, <i>ig</i>; bands and "
        "segmented cells are neutrophils).</p>"
        + differential_html(coarse)
        + "<h2>Granulocytic series</h2><table><tr><th>stage</th><th>count</th><th>% of the series</th>"
        f"<th>95% limits</th><th>% of {record.denominator}</th></tr>"
        + "".join(row(stage, k) for stage, k in series)
        + "</table>"
        + f"<p style='font-size:12px'>{s_total} cells of the neutrophil series, youngest first.</p>"
    )


def write_atomic(path: Path, text: str) -> Path:
    """:func:`bmc.edge_app.store.write_atomic`, a full disk said as one line naming the report."""
    try:
        return store.write_atomic(path, text)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ReportError(
                f"{path}: the disk is full; the report was not written (the session database is intact)"
            ) from e
        raise


class ReportError(BmcError, OSError):
    """A report that could not be written; the message names the file and why."""


def _orientations(session: SessionRecord) -> str:
    """How the session's cells were classified, from its recorded config (older sessions: not recorded)."""
    config = session.config
    n = config.orientations
    text = f"<br>each cell in {int(n)} orientation{'s' if int(n) != 1 else ''}, averaged" if n else ""
    head = config.head
    if head:
        text += (
            f"<br>with the head adapted at this laboratory <code>{html.escape(head['file'])}</code> "
            f"(sha256 <code>{html.escape(head['sha256'][:12])}…</code>)"
        )
    if config.white_balance:
        text += "<br>white-balanced onto the model's training lamp"
    return text
