"""The review grid (click a class or press its key), a person's decision and its undo."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from bmc.edge_app import report as report_mod
from bmc.edge_app import review, sessiondb
from bmc.edge_app.sessiondb import ReviewedCell
from bmc.edge_app.ui.web import Html, HttpError, Request, Response, Screen, hidden_csrf, html, quote, redirect

# the classes by how often a differential meets them (a blood smear: neutrophils, then lymphocytes,
# monocytes, eosinophils, bands, basophils; the rarer stages after), for the review keys 1-9
BY_FREQUENCY = [
    "neutrophil",
    "segmented",
    "lymphocyte",
    "monocyte",
    "eosinophil",
    "band",
    "basophil",
    "ig",
    "metamyelocyte",
    "myelocyte",
    "promyelocyte",
    "erythroblast",
    "platelet",
]


def _by_frequency(label: str) -> tuple[int, str]:
    return (BY_FREQUENCY.index(label) if label in BY_FREQUENCY else len(BY_FREQUENCY), label)


def key_layout(keys: Mapping[str, str], labels: Iterable[str]) -> dict[str, str]:
    """Each class's review key: the configured one (``keys``), else the next free digit 1-9 (a class
    left without a key is still a click away), the commonest classes on the first digits."""
    labels = list(labels)
    out = {l: keys[l] for l in labels if l in keys}
    free = [str(d) for d in range(1, 10) if str(d) not in out.values()]
    for l in sorted(labels, key=_by_frequency):
        if l not in out and free:
            out[l] = free.pop(0)
    # the buttons in the classes' order (the commonest first), whichever keys they have: a class keeps
    # its place in the row when the laboratory gives it a letter
    return dict(sorted(out.items(), key=lambda kv: _by_frequency(kv[0])))


def _card(app: Screen, c: ReviewedCell, decided: bool, name: str, csrf: str, back: str = "") -> Html:
    """A cell of the review grid; ``back``: where its decision returns to ('adapt': the teaching
    queue), carried in the form (the screen sends no Referer)."""
    top = Html.join(html("<li>{l} {p:.2f}</li>", l=l, p=p) for l, p in c.top(3))
    if decided:
        state = html(
            "<p class='decided'>{label} by {who}</p><form method='post' action='/s/{name}/undo'>{csrf}"
            "<input type='hidden' name='cell' value='{id}'><input type='hidden' name='seen' value='{seen}'>"
            "<input type='hidden' name='back' value='{back}'><button data-key='b'>b undo</button></form>",
            label=c.reviewed_label or "",
            who=c.reviewer,
            name=name,
            csrf=hidden_csrf(csrf),
            id=c.id,
            seen=c.review_id,
            back=back,
        )
    else:
        buttons = Html.join(
            html("<button name='label' value='{l}' data-key='{k}'>{k} {l}</button>", l=l, k=k)
            for l, k in key_layout(app.keys, c.labels).items()
        )
        state = html(
            "<form method='post' action='/s/{name}/decide'>{csrf}<input type='hidden' name='cell' value='{id}'>"
            "<input type='hidden' name='seen' value='{seen}'><input type='hidden' name='back' value='{back}'>"
            "{buttons}<button name='label' value='{call}' data-key='Enter'>Enter: {call}</button>"
            "<button name='label' value='rejected' data-key='x'>x not a cell</button></form>",
            name=name,
            csrf=hidden_csrf(csrf),
            id=c.id,
            seen=c.review_id,
            buttons=buttons,
            call=c.model_label,
            back=back,
        )
    img = (
        html("<img src='/s/{name}/crop?id={id}' alt='cell {id}' width='160' height='160'>", name=name, id=c.id)
        if c.crop
        else Html("<div class='nocrop'>no crop saved</div>")
    )
    return html(
        "<div class='cell' tabindex='0' id='cell-{id}' data-cell='{id}'>{img}<p>"
        "<a href='/s/{name}/cell/{id}'>cell {id}</a> · <span title='{detail}'>{flag}</span></p><ol>{top}</ol>"
        "{state}</div>",
        id=c.id,
        img=img,
        name=name,
        flag=review.in_words(c.flag),
        detail=c.flag or "counted by the model",
        top=top,
        state=state,
    )


def review_page(app: Screen, req: Request) -> Response:
    folder = app.session_folder(req.params["session"])
    teach = req.query.get("for", "") == "adapt"
    page_arg = req.query.get("page", "1")
    page = int(page_arg) if page_arg.isdigit() else 1
    cells, _ = app.session_data(folder)
    # for adaptation: the cells that teach the head most, ten of each class the session found
    todo = review.teaching_queue(cells, 10) if teach else review.queue(cells)
    # the newest decision first: the one `b` takes back
    done = sorted((c for c in cells if c.status in ("reviewed", "rejected")), key=lambda c: c.reviewed_at)[::-1]
    name = quote(folder.name)
    size = app.REVIEW_PAGE
    pages = max(1, -(-len(todo) // size))
    page = min(max(page, 1), pages)
    shown = todo[(page - 1) * size : page * size]
    switch = (
        html("<a href='/s/{name}/review'>the cells set aside</a>", name=name)
        if teach
        else html("<a href='/s/{name}/review?for=adapt'>the cells that teach adaptation most</a>", name=name)
    )
    query = "for=adapt&" if teach else ""
    showing = (
        html(
            " Showing {first}–{last} of {n}{previous}{following}.",
            first=(page - 1) * size + 1,
            last=(page - 1) * size + len(shown),
            n=len(todo),
            previous=(
                html(" · <a href='/s/{name}/review?{q}page={p}'>previous</a>", name=name, q=query, p=page - 1)
                if page > 1
                else Html("")
            ),
            following=(
                html(
                    " · <a href='/s/{name}/review?{q}page={p}'>next {size}</a>",
                    name=name,
                    q=query,
                    p=page + 1,
                    size=size,
                )
                if page < pages
                else Html("")
            ),
        )
        if pages > 1
        else Html("")
    )
    body = html(
        "<p>{n} cells {what} (show {switch}).{showing} Click a class, or select a cell and press its key, Enter "
        "(the model's call), x (not a cell) or b / Backspace (undo the latest decision). A class key decides only a "
        "cell in view: one scrolled away is first brought into view. Each decision is recorded under your name."
        "</p><div class='grid' id='todo'>{todo}</div>"
        "<h2>Decided ({done}{latest})</h2><div class='grid' id='done'>{decided}</div>",
        n=len(todo),
        what="to name for adaptation" if teach else "wait for review",
        switch=switch,
        showing=showing,
        todo=Html.join(_card(app, c, False, name, req.csrf, "adapt" if teach else "") for c in shown),
        done=len(done),
        latest=", the latest 100 shown" if len(done) > 100 else "",
        decided=Html.join(_card(app, c, True, name, req.csrf, "adapt" if teach else "") for c in done[:100]),
    )
    return app.page(f"Review — {folder.name}", body, req)


def for_screen(message: str, folder: Path) -> str:
    """A review error as the screen says it: no server path, no command-line flag."""
    return message.replace(f" in {sessiondb.path_of(folder)}", " in this session").replace(
        "; a class the model does not know needs --new-label (lower case, up to 40 characters)", ""
    )


def decide(app: Screen, req: Request) -> Response:
    """A decision (``/decide``) or its withdrawal (``/undo``) on one cell, under the signed-in name."""
    folder = app.session_folder(req.params["session"])
    undo = req.path.rstrip("/").endswith("/undo")
    try:
        cell = int(req.form.get("cell", ""))
        # the decision the page showed (its review row; 0: none): a page left open while someone else
        # decided the cell records nothing. A client that sends none decides whatever is there
        seen = int(req.form["seen"]) if req.form.get("seen", "") != "" else None
    except ValueError:
        raise HttpError("400 Bad Request", "no cell given, or not as a number") from None
    try:
        with review.Reviewer(folder, req.user, allow_new_labels=False) as r:
            if undo:
                r.undo(cell, seen)
                label = None
            else:
                label = r.decide(cell, req.form.get("label", ""), seen)
    except review.StaleReview as e:
        raise HttpError(
            "409 Conflict",
            for_screen(str(e), folder),
            link=(
                (f"/s/{quote(folder.name)}/cell/{cell}", "back to the cell, as it is now")
                if req.form.get("back") == "cell"
                else (f"/s/{quote(folder.name)}/review", "back to review, as it is now")
            ),
        ) from e
    except review.ReviewError as e:
        raise HttpError("400 Bad Request", for_screen(str(e), folder)) from e
    report_mod.write_session_files(folder, report=False)  # the report too, where one was written
    if req.wants_json:
        return Response(json.dumps({"cell": cell, "label": label, "by": req.user}), ctype="application/json")
    back = req.form.get("back", "")  # where the form came from (the screen sends no Referer)
    if back == "cell":  # decided on the cell's own page: back to it
        return redirect(f"/s/{quote(folder.name)}/cell/{cell}")
    return redirect(f"/s/{quote(folder.name)}/review{'?for=adapt' if back == 'adapt' else ''}")
