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
import json
import shutil
import sqlite3
from pathlib import Path

from bmc.edge_app import review, store
from bmc.edge_app.differential import ERYTHROID, MYELOID, count_interval
from bmc.edge_app.store import is_locked
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


def _img(out_dir: Path, rel: str, size: int = 72) -> str:
    path = session_file(out_dir, rel)
    if path is None:
        return f'<div class="missing" style="width:{size}px;height:{size}px">not in session</div>'
    try:
        data = base64.b64encode(path.read_bytes()).decode()
    except OSError:
        return f'<div class="missing" style="width:{size}px;height:{size}px">missing</div>'
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


def _build_report(out_dir: Path) -> Path:
    db = review.connect(out_dir)
    db.row_factory = sqlite3.Row
    sessions = db.execute("SELECT * FROM session ORDER BY id").fetchall()
    live = is_locked(out_dir)  # 'running' with no process recording: it was killed
    frames = db.execute("SELECT COUNT(*) n, SUM(error IS NOT NULL) bad FROM frame").fetchone()
    db.row_factory = None
    cells = review.cells(db)
    note = review.latest_note(db)
    db.close()
    labels = json.loads(sessions[-1]["labels"]) if sessions else []
    counted = review.differential(cells)
    labels += sorted(set(counted) - set(labels))  # classes a reviewer named that the model does not know
    pending = sorted((c for c in cells if c.status == "pending"), key=lambda c: not c.unknown)  # unknown first
    n_unknown = sum(c.unknown for c in pending)
    unknown_note = f"; {n_unknown} unlike any cell the model knows, first" if n_unknown else ""
    decided = [c for c in cells if c.status in ("reviewed", "rejected")]
    n = sum(counted.values())
    esc = html.escape

    def limits(k: int) -> str:
        lo, hi = count_interval(k, n) if n else (0.0, 1.0)
        return f"{100 * lo:.1f}–{100 * hi:.1f}%"

    learnt: dict = {}
    for srow in sessions:  # classes an adapted head learnt from this laboratory's reviewed cells
        try:
            learnt.update((json.loads(srow["config"] or "{}").get("head") or {}).get("new_labels") or {})
        except (ValueError, AttributeError):
            pass

    def name(l: str) -> str:
        note = learnt.get(l)
        return esc(l) + (
            f" <small>(learnt from {int(note['cells'])} cells reviewed at this laboratory)</small>"
            if isinstance(note, dict) and "cells" in note
            else ""
        )

    rows = "".join(
        f"<tr><td>{name(l)}</td><td>{counted.get(l, 0)}</td><td>{100 * counted.get(l, 0) / n if n else 0:.1f}%</td>"
        f"<td>{limits(counted.get(l, 0))}</td>"
        f"<td><div class='bar' style='width:{(300 * counted.get(l, 0) / n) if n else 0:.0f}px'></div></td></tr>"
        for l in labels
    )
    parents = _parents(sessions)
    levels = levels_html(counted, parents, n) if parents else ""
    m = sum(v for k, v in counted.items() if k.lower() in MYELOID)
    e = sum(v for k, v in counted.items() if k.lower() in ERYTHROID)
    ratio = (
        f"<p>Myeloid : erythroid ratio <b>{m / e:.2f}</b> ({m} : {e})</p>"
        if e
        else (
            f"<p>Myeloid : erythroid ratio not defined (no erythroid cells counted; {m} myeloid)</p>"
            if any(l.lower() in ERYTHROID for l in labels)
            else ""
        )
    )
    sess = "".join(
        f"<tr><td>{s['id']}</td><td>{esc(s['started'])}</td><td>{esc(s['ended'] or '—')}</td>"
        f"<td>{esc(s['status'] if s['status'] != 'running' or live else 'interrupted')}</td><td>{esc(s['source'])}</td><td>{esc(s['model_file'])}<br>"
        f"<code>{esc(s['model_sha256'][:16])}…</code>{_orientations(s)}</td><td>{esc(s['device'])}</td>"
        f"<td>{_scale(s)}</td></tr>"
        for s in sessions
    )
    waiting = "".join(
        f"<figure>{_img(out_dir, c.crop) if c.crop else ''}<figcaption>cell {c.id}<br>{esc(c.model_label)} "
        f"{c.confidence:.2f}<br>{esc(c.flag)}<br>{esc(c.source)} #{c.frame}</figcaption></figure>"
        for c in pending[:200]
    )
    reviewed = "".join(
        f"<figure>{_img(out_dir, c.crop) if c.crop else ''}<figcaption>cell {c.id}<br>model: "
        f"{esc(c.model_label)} {c.confidence:.2f}<br><b>{esc(c.reviewed_label)}</b><br>{esc(c.reviewer)}"
        f"</figcaption></figure>"
        for c in decided[:200]
    )
    changed = sum(c.reviewed_label != c.model_label for c in decided)
    if pending:
        advice = (
            f"Automated classification: <b class='warn'>{len(pending)}</b> cells wait for review "
            f"(<code>bmc edge review {esc(out_dir.name)}</code>) and are not counted yet"
            + (
                f"; <b class='warn'>{n_unknown}</b> of them are unlike any cell the model knows (a blast? "
                "a smudge?): they are counted in no class until a person names them"
                if n_unknown
                else ""
            )
            + "."
        )
    else:
        advice = "No cell waits for review."
    grids = ""
    for l in labels:
        members = [c for c in cells if c.final_label == l and c.crop]
        if not members:
            continue
        shown = sorted(members, key=lambda c: (c.status != "reviewed", c.confidence))[:THUMBS_PER_CLASS]
        grids += (
            f"<h3>{esc(l)} — {len(members)} cells (reviewed, then least confident first, {len(shown)} shown)"
            f"</h3><div class='grid'>"
            + "".join(
                f"<figure>{_img(out_dir, c.crop)}<figcaption>"
                f"{'reviewed' if c.status == 'reviewed' else f'{c.confidence:.2f}'}</figcaption></figure>"
                for c in shown
            )
            + "</div>"
        )
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bmc differential — {esc(out_dir.name)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} .bar{{background:#6a5acd;height:12px}}
.grid{{display:flex;flex-wrap:wrap;gap:8px}} figure{{margin:0;font-size:11px;text-align:center;width:96px}}
figcaption{{overflow-wrap:anywhere;line-height:1.2}}
.missing{{background:#eee;font-size:10px}} .warn{{color:#a40}}
</style></head><body>
<h1>Differential count</h1>
{f"<p>Comment: <b>{esc(note[0])}</b> ({esc(note[1])}, {esc(note[2][:16])})</p>" if note else ""}
<p><b>{n}</b> cells counted ({sum(c.status == "reviewed" for c in cells)} of them named by a reviewer),
{sum(c.status == "rejected" for c in cells)} rejected in review, {frames["n"] or 0} frames
({frames["bad"] or 0} unreadable). {advice}</p>
<table><tr><th>class</th><th>count</th><th>%</th><th>95% limits</th><th></th></tr>{rows}</table>
<p style="font-size:12px">95% limits: the exact binomial confidence interval of each share for a count
of {n} cells (the limits of Rümke's table): a differential of more cells narrows them.</p>
{levels}
{ratio}
<h2>Cells waiting for review ({len(pending)}{unknown_note})</h2><div class="grid">{waiting or "<p>none</p>"}</div>
<h2>Reviewed cells ({len(decided)}; the reviewer changed the model's call on {changed})</h2>
<div class="grid">{reviewed or "<p>none</p>"}</div>
<h2>Cells by class</h2>{grids or "<p>no cell crops saved</p>"}
<h2>Sessions</h2><table><tr><th>id</th><th>started</th><th>ended</th><th>status</th><th>source</th><th>model</th><th>device</th><th>scale</th></tr>{sess}</table>
<p style="font-size:11px;color:#666">Generated by bmc from session.sqlite; all data stays on this device.</p>
</body></html>
"""
    return write_atomic(out_dir / "report.html", doc)


def _scale(session) -> str:
    """The field's scale as the session measured it (red cells), or why there is none."""
    try:
        sc = json.loads(session["config"] or "{}").get("scale") or {}
    except (ValueError, AttributeError):
        sc = {}
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
    )


def folder_parents(out_dir: str | Path) -> dict[str, str]:
    """A stage model's hierarchy as the folder's newest session recorded it ({} for an 8-class model)."""
    db = review.connect(out_dir)
    try:
        db.row_factory = sqlite3.Row
        return _parents(db.execute("SELECT config FROM session ORDER BY id").fetchall())
    finally:
        db.close()


def _parents(sessions) -> dict[str, str]:
    """A stage model's hierarchy (stage → 8-class parent), from the newest session's contract."""
    return next((p for p in (store.parents_of(srow["config"]) for srow in reversed(sessions)) if p), {})


def levels_html(counted, parents: dict[str, str], n: int) -> str:
    """A stage model's second level: the 8-class differential (stages summed into their parents) and
    the granulocytic series promyelocyte → segmented, each share with its 95% limits."""
    esc = html.escape

    def row(label, k, total, of_all=None):
        lo, hi = count_interval(k, total) if total else (0.0, 1.0)
        extra = f"<td>{100 * k / of_all:.1f}%</td>" if of_all is not None else ""
        return (
            f"<tr><td>{esc(label)}</td><td>{k}</td><td>{100 * k / total if total else 0:.1f}%</td>"
            f"<td>{100 * lo:.1f}–{100 * hi:.1f}%</td>{extra}</tr>"
        )

    coarse = coarse_counts(counted, parents)
    series = series_counts(counted)
    s_total = sum(k for _, k in series)
    out = (
        "<h2>8-class differential</h2><p style='font-size:12px'>The stages summed into their classes "
        "(promyelocytes, myelocytes and metamyelocytes are immature granulocytes, <i>ig</i>; bands and "
        "segmented cells are neutrophils).</p><table><tr><th>class</th><th>count</th><th>%</th>"
        "<th>95% limits</th></tr>" + "".join(row(l, coarse[l], n) for l in sorted(coarse)) + "</table>"
    )
    out += (
        "<h2>Granulocytic series</h2><table><tr><th>stage</th><th>count</th><th>% of the series</th>"
        "<th>95% limits</th><th>% of all counted</th></tr>"
        + "".join(row(stage, k, s_total, n or 1) for stage, k in series)
        + "</table>"
        + f"<p style='font-size:12px'>{s_total} cells of the neutrophil series, youngest first.</p>"
    )
    return out


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


def _orientations(session) -> str:
    """How the session's cells were classified, from its recorded config (older sessions: not recorded)."""
    try:
        config = json.loads(session["config"] or "{}")
    except (ValueError, TypeError, IndexError, KeyError):
        return ""
    n = config.get("orientations")
    text = f"<br>each cell in {int(n)} orientation{'s' if int(n) != 1 else ''}, averaged" if n else ""
    head = config.get("head")
    if head:
        text += (
            f"<br>with the head adapted at this laboratory <code>{html.escape(head['file'])}</code> "
            f"(sha256 <code>{html.escape(head['sha256'][:12])}…</code>)"
        )
    if config.get("white_balance"):
        text += "<br>white-balanced onto the model's training lamp"
    return text
