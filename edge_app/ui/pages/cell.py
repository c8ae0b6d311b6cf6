"""One cell: its crop, the model's scores, where the model looked, and a decision on it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from bmc.edge_app import review, sessiondb
from bmc.edge_app.ui.pages.review import key_layout
from bmc.edge_app.ui.web import Html, HttpError, Request, Response, Screen, hidden_csrf, html, quote

if TYPE_CHECKING:
    from bmc.edge_app.classifier import CellClassifier


def crop_path(folder: Path, cell_id: str) -> Path:
    """The crop file of a cell of ``folder``, checked to lie inside it, or 404."""
    from bmc.edge_app.report import session_file

    try:
        cid = int(cell_id)
    except ValueError:
        raise HttpError("404 Not Found", "no such cell") from None
    db = sessiondb.connect(folder)
    try:
        crop = sessiondb.crop_of(db, cid)
    finally:
        db.close()
    path = session_file(folder, crop) if crop else None
    if path is None or not path.is_file() or path.suffix.lower() != ".jpg":
        raise HttpError("404 Not Found", "no crop for this cell")
    return path


def crop(app: Screen, req: Request) -> Response:
    folder = app.session_folder(req.params["session"])
    return Response(crop_path(folder, req.query.get("id", "")).read_bytes(), ctype="image/jpeg")


def _model_input(folder: Path, cell_id: str, clf: CellClassifier) -> np.ndarray:
    from bmc.contract import preprocess, read_image

    return preprocess(read_image(str(crop_path(folder, cell_id))), clf.contract, "BGR", crop=False)


def cell_page(app: Screen, req: Request) -> Response:
    from bmc.edge_app.activation_maps import MapError

    folder = app.session_folder(req.params["session"])
    cell_id = req.params["cell"]
    cells, _ = app.session_data(folder)
    cell = next((c for c in cells if str(c.id) == cell_id), None)
    if cell is None:
        raise HttpError("404 Not Found", "no such cell")
    name = quote(folder.name)
    probs = Html.join(
        html("<tr><td>{l}</td><td class='num'>{p:.3f}</td></tr>", l=l, p=p)
        for l, p in sorted(zip(cell.labels, cell.probabilities), key=lambda t: -t[1])
    )
    maps = Html("")
    if cell.crop:
        try:
            clf, _ = app.map_maker()
            top = [l for l, _ in cell.top(2) if l in clf.labels]
            figures = Html.join(
                html(
                    "<figure><img src='/s/{name}/cell/{id}/map?label={q}' width='224' height='224' "
                    "alt='where the model looked for {l}'><figcaption>{l}</figcaption></figure>",
                    name=name,
                    id=cell.id,
                    q=quote(l),
                    l=l,
                )
                for l in top
            )
            maps = html(
                "<h2>Where the model looked</h2><div class='grid'>{figures}</div><p class='small'>Class "
                "activation maps of {model}: red, the parts of the cell that pushed most towards that class.</p>",
                figures=figures,
                model=clf.path.name,
            )
        except (MapError, ValueError, OSError) as e:
            maps = html("<p class='small'>No activation map: {e}</p>", e=str(e))
    img = (
        html("<img src='/s/{name}/crop?id={id}' width='224' height='224' alt='cell {id}'>", name=name, id=cell.id)
        if cell.crop
        else Html("")
    )
    decided = (
        html("<p>Decided: <b>{label}</b> by {who}</p>", label=cell.reviewed_label, who=cell.reviewer)
        if cell.reviewed_label
        else Html("")
    )
    # a count can be corrected after it was saved: any cell, counted or decided, is decided (again) here,
    # as the audited review row; the earlier decision stays in the trail
    change = html(
        "<form method='post' action='/s/{name}/decide'>{csrf}<input type='hidden' name='cell' value='{id}'>"
        "<input type='hidden' name='seen' value='{seen}'><input type='hidden' name='back' value='cell'>"
        "<p>{ask}: {buttons}<button name='label' value='rejected'>not a cell</button></p></form>",
        name=name,
        csrf=hidden_csrf(req.csrf),
        id=cell.id,
        seen=cell.review_id,
        ask="Change the decision" if cell.reviewed_label else "Name this cell",
        # in the review grid's order (the commonest classes first), so a class sits where it sits there
        buttons=Html.join(
            html("<button name='label' value='{l}'>{l}</button>", l=l) for l in key_layout(app.keys, cell.labels)
        ),
    )
    body = html(
        "<p>Session <a href='/s/{name}/'>{session}</a>: {where}; the model's call <b>{call}</b> "
        "{conf:.2f} {flag}</p>{decided}"
        "<div class='grid'>{img}<table><tr><th>class</th><th>probability</th></tr>{probs}</table></div>"
        "{change}{maps}<p><a href='/s/{name}/review'>back to review</a></p>",
        session=folder.name,
        where=review.where(cell),
        call=cell.model_label,
        conf=cell.confidence,
        flag=cell.flag,
        decided=decided,
        img=img,
        probs=probs,
        change=change,
        maps=maps,
        name=name,
    )
    return app.page(f"Cell {cell.id} of {folder.name}", body, req)


def cell_map(app: Screen, req: Request) -> Response:
    """Where the model looked for one class in one cell, over its crop (JPEG)."""
    from bmc.edge_app.activation_maps import MapError, overlay

    folder = app.session_folder(req.params["session"])
    try:
        clf, maps = app.map_maker()
        x = _model_input(folder, req.params["cell"], clf)
        picture = overlay(x, maps(x, req.query.get("label", "")))
    except (MapError, ValueError) as e:
        raise HttpError("404 Not Found", str(e)) from e
    ok, buf = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return Response(buf.tobytes(), ctype="image/jpeg")
