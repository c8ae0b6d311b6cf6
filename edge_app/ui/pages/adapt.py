"""Adapting the model to this microscope from the cells people reviewed, and which model counts."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from bmc.card import read_card
from bmc.edge_app import sessiondb
from bmc.edge_app.ui.web import Html, HttpError, Request, Response, Screen, hidden_csrf, html, quote, redirect

if TYPE_CHECKING:
    from bmc.edge_app.adapt import Result as AdaptResult

log = logging.getLogger("bmc.edge_app.ui.app")


RESULT_SUFFIX = ".adapted.html"  # beside a written model: what its adaptation said, for the page after it


def adapt_page(app: Screen, req: Request, result: Html = Html("")) -> Response:
    from bmc.edge_app.active import active_model, adapted_models, models_dir
    from bmc.edge_app.service import session_dirs

    written = req.query.get("written", "")
    if not result and re.fullmatch(r"[A-Za-z0-9_-]{1,80}", written):
        # what the adaptation that wrote it said (the form's answer, after its redirect: a reload shows
        # it again and adapts nothing)
        said = models_dir(app.storage) / f"{written}{RESULT_SUFFIX}"
        if said.is_file():
            result = Html(said.read_text(encoding="utf-8"))
    rows = []
    for d in reversed(session_dirs(app.storage)):
        try:
            cells, _ = app.session_data(d)
        except sessiondb.UnreadableSession:
            continue  # the sessions page names it and why
        n = sum(c.status == "reviewed" for c in cells)
        rows.append(
            html(
                "<tr><td><input type='checkbox' name='session' value='{name}' {state}></td><td>{name}</td>"
                "<td class='num'>{n}</td></tr>",
                name=d.name,
                state="checked" if n else "disabled",
                n=n,
            )
        )
    active = active_model(app.storage)
    models = []
    for m in adapted_models(app.storage):
        try:
            card = read_card(m)
            a = card.get("adaptation", {})
            cv = a.get("cross_validation", {})
            learnt = (
                # the head was refused: the shipped head counts, with the gates the random sample set
                "the shipped head unchanged (the adapted head was refused), with this laboratory's gates"
                if a.get("head_kept")
                else f"balanced accuracy {cv['shipped']['balanced_accuracy']:.3f} → "
                f"{cv['adapted']['balanced_accuracy']:.3f}"
            )
            cal = card.get("calibration") or {}
            stated = f"; {cal['statement']}" if cal.get("statement") else ""
            what = (
                f"{a.get('date', '?')[:16]}, {a.get('cells', '?')} cells by {', '.join(a.get('reviewers', []))}; "
                f"{learnt}{stated}"
            )
        except (OSError, ValueError, KeyError, TypeError):
            what = "unreadable card"
        is_active = active is not None and active.name == m.name
        button = (
            Html("<b>active</b>")
            if is_active
            else html(
                "<form method='post' action='/adapt/activate' class='inline'>{csrf}<button name='model' "
                "value='{m}'>Make active</button></form>",
                csrf=hidden_csrf(req.csrf),
                m=m.name,
            )
        )
        models.append(
            html("<tr><td>{stem}</td><td>{what}</td><td>{button}</td></tr>", stem=m.stem, what=what, button=button)
        )
    shipped = (
        Html("<b>active</b>")
        if active is None
        else html(
            "<form method='post' action='/adapt/activate' class='inline'>{csrf}<button name='model' value=''>"
            "Go back to the shipped model</button></form>",
            csrf=hidden_csrf(req.csrf),
        )
    )
    body = html(
        "{result}<h2>Adapt to this microscope</h2><p>The model learns a new last layer from the cells people "
        "reviewed, checked by cross-validation against the shipped one; it is refused unless better. "
        "Review 5-10 cells of each class first, and 60 in their random order (they set what the device counts "
        "alone, and state its error; with them, a refused layer still leaves the shipped one with this "
        "laboratory's gates). Models are written to {where}.</p>"
        "<form method='post' action='/adapt'>{csrf}"
        "<table><tr><th></th><th>session</th><th>cells named by a reviewer</th></tr>{rows}"
        "</table><label>Name of the new model <input name='name' required pattern='[A-Za-z0-9_-]{{1,40}}' "
        "maxlength='40' value='lab'></label> <button>Adapt</button></form>"
        "<h2>Models</h2><table><tr><th>model</th><th>made from, and what it learnt</th><th></th></tr>"
        "<tr><td>shipped</td><td>{base}, as it ships</td><td>{shipped}</td></tr>{models}"
        "</table><p class='small'>The service counts with the active model from its next session on.</p>",
        result=result,
        where=str(models_dir(app.storage)),
        csrf=hidden_csrf(req.csrf),
        rows=Html.join(rows),
        base=app.base_model().path.name,
        shipped=shipped,
        models=Html.join(models),
    )
    return app.page("Adaptation", body, req)


def _table(r: AdaptResult) -> Html:
    cv = r.cross_validation
    rows = Html.join(
        html(
            "<tr><td>{l}</td><td class='num'>{n}</td><td class='num'>{a:.2f}</td><td class='num'>{b:.2f}</td></tr>",
            l=l,
            n=r.cells_per_class.get(l, 0),
            a=cv["shipped"]["recall"][l],
            b=cv["adapted"]["recall"][l],
        )
        for l in r.labels
        if l in cv["shipped"]["recall"]
    )
    return html(
        "<table><tr><th>class</th><th>reviewed cells</th><th>shipped</th><th>adapted</th></tr>{rows}"
        "<tr><td>balanced accuracy</td><td></td><td class='num'>{a:.3f}</td><td class='num'>{b:.3f}</td></tr></table>"
        "<p class='small'>Recall of each class on reviewed cells neither head was fitted on (the adapted head's: "
        "the mean over {reps} draws of the folds). Accuracy on the training cells never fitted (does it forget what "
        "it knew?): {ga:.3f} shipped, {gb:.3f} adapted.</p>",
        reps=cv.get("repeats", 1),
        rows=rows,
        a=cv["shipped"]["balanced_accuracy"],
        b=cv["adapted"]["balanced_accuracy"],
        ga=r.guard["shipped_accuracy"],
        gb=r.guard["adapted_accuracy"],
    )


def run_adapt(app: Screen, req: Request) -> Response:
    from bmc.edge_app import adapt
    from bmc.edge_app.active import models_dir

    name = (req.form.get("name") or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name):
        raise HttpError("400 Bad Request", "a model name is 1-40 letters, digits, - or _")
    chosen = [app.session_folder(n) for n in req.many("session")]
    if not chosen:
        raise HttpError("400 Bad Request", "choose at least one session with reviewed cells")
    clf = app.base_model()
    try:
        guard, reviewed, r = adapt.prepare(chosen, clf)
    except adapt.AdaptError as e:
        return adapt_page(app, req, html("<p class='warn'>Not adapted: {e}</p>", e=str(e)))
    table = _table(r)
    advice = html("<p>More reviewed cells would help: {a}</p>", a="; ".join(r.advice)) if r.advice else Html("")
    written = adapt.model_to_write(r, reviewed, guard, clf)
    kept = written if written is not None and written.kept_shipped else None
    if written is None:
        return adapt_page(
            app,
            req,
            html(
                "<p class='warn'>Refused, nothing written: {why}</p>{table}{advice}",
                why="; ".join(r.reasons),
                table=table,
                advice=advice,
            ),
        )
    try:
        path = adapt.write_model(written, reviewed, clf, guard, models_dir(app.storage), name)
    except adapt.AdaptError as e:
        return adapt_page(app, req, html("<p class='warn'>{e}</p>", e=str(e)))
    if kept is not None:
        log.info("shipped head with the laboratory's gates %s written by %s", path, req.user)
        said = html(
            "<p class='warn'>The adapted head was refused: {why}</p><p><b>{stem}</b> written instead ({where}): the "
            "shipped head unchanged, with the gates this laboratory's reviewed cells set. Make it active below "
            "to count with it.</p>",
            why="; ".join(r.reasons),
            stem=path.stem,
            where=str(path),
        )
    else:
        log.info("adapted model %s written by %s", path, req.user)
        said = html(
            "<p><b>{stem}</b> written ({where}): better than the shipped model on held-out reviewed cells. "
            "Make it active below to count with it.</p>",
            stem=path.stem,
            where=str(path),
        )
    from bmc.edge_app.store import write_atomic

    page = html("{said}<p>{gates}</p>{table}{advice}", said=said, gates=written.gates(), table=table, advice=advice)
    write_atomic(path.with_name(f"{path.stem}{RESULT_SUFFIX}"), str(page))
    return redirect(f"/adapt?written={quote(path.stem)}")


def activate(app: Screen, req: Request) -> Response:
    from bmc.edge_app.active import ActiveModelError, set_active

    name = req.form.get("model", "")
    try:
        set_active(app.storage, name or None, req.user)
    except ActiveModelError as e:
        raise HttpError("400 Bad Request", str(e)) from e
    log.info("active model set to %s by %s", name or "the shipped one", req.user)
    return redirect("/adapt")
