"""The sessions on the device, and one session: its differential after review, its comment, its
report and FHIR export, and the export to a USB stick."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from bmc.edge_app import report as report_mod
from bmc.edge_app import review, sessiondb
from bmc.edge_app.ui.web import Html, HttpError, Request, Response, Screen, hidden_csrf, html, quote, redirect

log = logging.getLogger("bmc.edge_app.ui.app")
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"


def sessions_page(app: Screen, req: Request) -> Response:
    from bmc.edge_app.service import session_dirs

    rows: list[tuple[str, Html]] = []  # (started, row): the newest session first, whatever its folder's name
    storage = Path(app.storage)
    for d in sorted(storage.iterdir()) if storage.is_dir() else []:
        left = [] if (d / sessiondb.DB_NAME).exists() or not d.is_dir() else sessiondb.outputs_in(d)
        if left:  # a session's files without its database: its record is lost, and a person should know
            why = f"no {sessiondb.DB_NAME} beside {', '.join(left)}: the session's record is lost or was moved"
            rows.append(
                ("", html("<tr><td>{name}</td><td colspan='5' class='warn'>{why}</td></tr>", name=d.name, why=why))
            )
    for d in session_dirs(app.storage):
        try:
            cells, meta = app.session_data(d)
        except sessiondb.UnreadableSession as e:
            rows.append(
                (
                    "",
                    html(
                        "<tr><td>{name}</td><td colspan='5' class='warn'>unreadable: {why}</td></tr>",
                        name=d.name,
                        why=e.why,
                    ),
                )
            )
            continue
        record, _ = app.summary(d, cells)
        rows.append(
            (
                meta[0].started if meta else "",
                html(
                    "<tr><td><a href='/s/{link}/'>{name}</a></td><td>{started}</td><td>{models}</td>"
                    "<td>{total} {denominator}</td><td>{waiting}</td><td>{status}</td></tr>",
                    link=quote(d.name),
                    name=d.name,
                    started=review.when(meta[0].started) if meta else "",
                    models=", ".join(sorted({m.model_file for m in meta})),
                    total=record.total,
                    denominator=record.denominator,
                    waiting=record.waiting,
                    status=meta[-1].status if meta else "",
                ),
            )
        )
    table = (
        html(
            "<table><tr><th>session</th><th>started</th><th>model</th><th>counted</th><th>waiting for review</th>"
            "<th>status</th></tr>{rows}</table>",
            rows=Html.join(row for _, row in sorted(rows, key=lambda r: r[0], reverse=True)),
        )
        if rows
        else html("<p>No session in {storage} yet.</p>", storage=str(app.storage))
    )
    return app.page("Sessions", table, req)


def session_page(app: Screen, req: Request, refused: tuple[str, str] | None = None) -> Response:
    """The session's page; ``refused``: (why, the text) of a comment not saved, shown at its form
    with the text kept for the person to edit."""
    folder = app.session_folder(req.params["session"])
    cells, meta = app.session_data(folder)
    record, notes = app.summary(folder, cells)
    note = notes[-1] if notes else None
    parents = report_mod.folder_parents(folder)
    levels = Html(report_mod.levels_html(record, parents)) if parents else Html("")  # a stage model: both levels
    name = quote(folder.name)
    dests = app.export_destinations()
    comment = html(
        "{shown}<form method='post' action='/s/{name}/note'>{csrf}"
        "{why}<label>Comment on this session (smear, stain, what to recount) <input name='text' maxlength='500' "
        "size='60' value='{typed}'></label> <button>Save</button><br><span class='small warn'>No patient names, "
        "numbers or dates of birth: the session is exported as it is.</span></form>",
        why=html("<p class='warn'>Not saved: {w}</p>", w=refused[0]) if refused else Html(""),
        typed=refused[1] if refused else "",
        shown=(
            html(
                "<p>Comment: <b>{text}</b> <span class='small'>({author}, {time})</span></p>{earlier}",
                text=note.text,
                author=note.author,
                time=review.when(note.time),
                earlier=_earlier_comments(notes[:-1]),
            )
            if note
            else Html("")
        ),
        name=name,
        csrf=hidden_csrf(req.csrf),
    )
    export = (
        html(
            "<form method='post' action='/s/{name}/export'>{csrf}<label>Export to <select name='to'>{options}"
            "</select></label> <button>Export</button></form>",
            name=name,
            csrf=hidden_csrf(req.csrf),
            options=Html.join(html("<option>{d}</option>", d=str(d)) for d in dests),
        )
        if dests
        else Html("<p class='small'>Export: no USB stick or disk is mounted.</p>")
    )
    statement = app.calibration(folder)
    from bmc.edge_app.folder_lock import is_locked

    recording = any(m.status == "running" for m in meta) and is_locked(folder)
    target = review.target_statement(meta, record, recording, sum(c.status == "rejected" for c in cells))
    body = html(
        "<p>{specimen} differential: <b>{total}</b> {denominator} counted, <b>{waiting}</b> waiting for review"
        "{unknown} (<a href='/s/{name}/review'>review them</a>) · <a href='/s/{name}/report'>report</a>"
        "</p><form method='post' action='/s/{name}/fhir' class='inline'>{csrf}<button>Download FHIR "
        "DiagnosticReport</button></form> <span class='small'>(for the laboratory information system; "
        "downloading issues it, and the folder records what went out)</span>{issued}{target}{table}{statement}"
        "<p class='small'>95% limits: the exact binomial interval of each share (Rümke's table).</p>"
        "{levels}{runs}{comment}{export}",
        specimen="Blood" if record.specimen == "blood" else "Marrow",
        total=record.total,
        denominator=record.denominator,
        waiting=record.waiting,
        unknown=(
            html(
                ", <b class='warn'>{k}</b> of them unlike any cell the model knows (first in review)", k=record.unknown
            )
            if record.unknown
            else Html("")
        ),
        name=name,
        csrf=hidden_csrf(req.csrf),
        table=Html(report_mod.differential_html(record)),
        statement=html("<p><b>{s}.</b></p>", s=statement) if statement else Html(""),
        target=(
            html("<p class='{cls}'><b>{t}.</b></p>", t=target, cls="warn" if target.startswith("Short") else "")
            if target
            else Html("")
        ),
        issued=_issued(folder),
        levels=levels,
        runs=Html.join(
            html(
                "<p class='small'>session started {started}, {status}, model {model}, source {source}</p>",
                started=review.when(m.started),
                status=m.status,
                model=m.model_file,
                source=m.source,
            )
            for m in meta
        ),
        comment=comment,
        export=export,
    )
    return app.page(f"Session {folder.name}", body, req)


def _earlier_comments(earlier: list[Any]) -> Html:
    """The comments the latest one followed, newest first, folded away."""
    if not earlier:
        return Html("")
    return html(
        "<details class='small'><summary>{n} earlier {word}</summary><ul>{items}</ul></details>",
        n=len(earlier),
        word="comment" if len(earlier) == 1 else "comments",
        items=Html.join(
            html("<li>{text} ({author}, {time})</li>", text=n.text, author=n.author, time=review.when(n.time))
            for n in reversed(earlier)
        ),
    )


def _issued(folder: Path) -> Html:
    """What went to the laboratory information system last: when, and as what."""
    from bmc.edge_app import fhir

    bundle = fhir.last_issued(folder)
    if bundle is None:
        return html("<p class='small'>No FHIR report issued yet.</p>")
    status = bundle["entry"][0]["resource"].get("status", "?")
    return html(
        "<p class='small'>Last FHIR report issued {time}, status <b>{status}</b> "
        "(<a href='/s/{name}/fhir'>as it went out</a>).</p>",
        time=review.when(bundle.get("timestamp")),
        status=status,
        name=quote(folder.name),
    )


def report(app: Screen, req: Request) -> Response:
    from bmc.edge_app.folder_lock import outputs

    folder = app.session_folder(req.params["session"])
    with outputs(folder):  # rebuilt and read in one turn: a decision's rewrite lands before or after
        return Response(report_mod.build_report(folder).read_bytes(), csp=REPORT_CSP)


def fhir_export(app: Screen, req: Request) -> Response:
    """The differential for a laboratory information system. A POST (the session page's button, with
    its form's token) issues it: the folder records the report as it went out. A GET issues nothing:
    it gives the report last issued, as it went out (a page open elsewhere, or a link followed,
    cannot put a report on the record)."""
    from bmc.edge_app import fhir

    folder = app.session_folder(req.params["session"])
    bundle: dict[str, Any] | None
    if req.method == "POST":
        bundle = fhir.diagnostic_report(folder, issue=True)  # it goes out
    else:
        bundle = fhir.last_issued(folder)
        if bundle is None:
            raise HttpError(
                "404 Not Found",
                f"no FHIR report of {folder.name} has been issued yet: press 'Download FHIR "
                "DiagnosticReport' on the session's page",
            )
    return Response(
        json.dumps(bundle, indent=2, ensure_ascii=False) + "\n",  # as the file is written
        ctype="application/fhir+json; charset=utf-8",
        headers=[("Content-Disposition", f'attachment; filename="{folder.name}.fhir.json"')],
    )


def note(app: Screen, req: Request) -> Response:
    folder = app.session_folder(req.params["session"])
    try:
        review.add_note(folder, req.form.get("text", ""), req.user)
    except review.ReviewError as e:  # the page again, the reason at the form, the text kept to edit
        page = session_page(app, req, (str(e), req.form.get("text", "")[:500]))
        page.status = "400 Bad Request"
        return page
    report_mod.write_session_files(folder, report=False)  # the comment is in the report and FHIR on disk too
    return redirect(f"/s/{quote(folder.name)}/")


def export(app: Screen, req: Request) -> Response:
    from bmc.edge_app.service import export as export_session

    folder = app.session_folder(req.params["session"])
    dests = {str(d): d for d in app.export_destinations()}
    to = req.form.get("to", "")
    if to not in dests:
        raise HttpError("400 Bad Request", "choose one of the mounted USB sticks or disks listed")
    try:
        target = export_session(folder, dests[to])
    except shutil.Error as e:  # copytree's list of every file that failed: the first says why
        failed = e.args[0] if e.args and isinstance(e.args[0], list) else []
        why = failed[0][2] if failed and len(failed[0]) == 3 else str(e)
        raise HttpError(
            "500 Internal Server Error",
            f"the export to {to} did not finish: {len(failed) or 'some'} files could not be copied ({why}); "
            "the session is not marked exported",
        ) from e
    except OSError as e:
        raise HttpError(
            "507 Insufficient Storage" if getattr(e, "errno", 0) == 28 else "500 Internal Server Error",
            f"the export to {to} did not finish: {e.strerror or e}; the session is not marked exported",
        ) from e
    log.info("session %s exported to %s by %s", folder.name, target, req.user)
    return redirect(f"/s/{quote(folder.name)}/?exported=1")
