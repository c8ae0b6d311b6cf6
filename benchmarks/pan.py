"""A smear surveyed by moving the stage (``bmc bench pan``): the same white cells, with the same
calls, as the still fields.

A technician moves the stage and the camera sees the field slide past. Here ``fields`` BCCD
fields with one white cell each are laid side by side into one strip and a 640x480 window pans
across it at ``speed`` pixels a frame, written as a video (:func:`make_pan_video`). The session
runs on the video as on a camera (tracking, each moving cell judged on its views wholly inside
the frame); each white cell's box in the strip is matched to the cells the session recorded
(their recorded frame and box put back into the strip's coordinates), and its call is compared
with the call the same session settings give the field as a still image.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np

from bmc.benchmarks.bccd import single_cell_fields
from bmc.edge_app.cells import Box


def pan_fields(bccd, n: int = 6) -> list:
    """The first ``n`` BCCD fields with one labelled white cell wholly inside the field (clear of
    its edges: a cell the still field shows whole, which the pan must show whole too)."""
    picked = []
    for f in single_cell_fields(bccd):
        b = f.wbc[0]
        if b.x > 2 and b.y > 2 and b.x + b.w < 638 and b.y + b.h < 478:
            picked.append(f)
        if len(picked) == n:
            break
    return picked


def make_pan_video(fields, speed: int, path: str | Path, height: int = 480, width: int = 640) -> int:
    """The strip of ``fields`` side by side, panned across by a ``width`` x ``height`` window at
    ``speed`` pixels a frame from its left end to its right, as an MJPG video; returns the frames."""
    strip = np.hstack([cv2.resize(cv2.imread(str(f.image)), (width, height)) for f in fields])
    xs = list(range(0, strip.shape[1] - width + 1, speed))
    if xs[-1] != strip.shape[1] - width:
        xs.append(strip.shape[1] - width)
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (width, height))
    for x in xs:
        out.write(strip[:, x : x + width])
    out.release()
    return len(xs)


def _cells(db_path: Path) -> list[tuple]:
    from bmc.edge_app import sessiondb

    db = sessiondb.connect(db_path.parent)
    try:
        return [(c.source, c.frame, *c.box, c.model_label, c.flag) for c in sessiondb.cells(db)]
    finally:
        db.close()


def _inside(cx: float, cy: float, b: Box) -> bool:
    return b.x <= cx <= b.x + b.w and b.y <= cy <= b.y + b.h


def run(bccd, speeds=(4, 12, 30), n_fields: int = 6, model: str | None = None, orientations: int | None = None) -> dict:
    from bmc.edge_app.classifier import DEFAULT_MODEL, DEFAULT_ORIENTATIONS, CellClassifier
    from bmc.edge_app.session import EdgeSession, SessionConfig

    fields = pan_fields(bccd, n_fields)
    clf = CellClassifier(model or DEFAULT_MODEL, orientations=orientations or DEFAULT_ORIENTATIONS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stills = tmp / "stills"
        stills.mkdir()
        for f in fields:
            (stills / f.image.name).symlink_to(f.image.resolve())
        EdgeSession(str(stills), clf, tmp / "still", SessionConfig(save_crops=False), echo=lambda m: None).run()
        still_call = {}
        for source, _, x, y, w, h, label, flag in _cells(tmp / "still" / "session.sqlite"):
            f = next(f for f in fields if f.image.name == source)
            if _inside(x + w / 2, y + h / 2, f.wbc[0]):
                still_call[source] = (label, bool(flag))
        rows = []
        for speed in speeds:
            video = tmp / f"pan{speed}.avi"
            frames = make_pan_video(fields, speed, video)
            r = EdgeSession(
                str(video), clf, tmp / f"s{speed}", SessionConfig(save_crops=False), echo=lambda m: None
            ).run()
            recorded = _cells(tmp / f"s{speed}" / "session.sqlite")
            offset = {i: min(i * speed, (len(fields) - 1) * 640) for i in range(frames)}
            found = same = counted = extra = whole = 0
            for k, f in enumerate(fields):
                b = f.wbc[0]
                box = Box(b.x + 640 * k, b.y, b.w, b.h)
                hits = [c for c in recorded if _inside(c[2] + c[4] / 2 + offset[c[1]], c[3] + c[5] / 2, box)]
                if not hits:
                    continue
                found += 1
                extra += len(hits) - 1
                _, _, x, y, w, h, _, _ = hits[0]
                whole += x > 2 and y > 2 and x + w < 638 and y + h < 478  # judged on a whole view, not cut off
                call = (hits[0][6], bool(hits[0][7]))
                same += call == still_call.get(f.image.name)
                counted += not call[1]
            rows.append(
                {
                    "speed_px": speed,
                    "frames": frames,
                    "white_cells": len(fields),
                    "found": found,
                    "judged_on_a_whole_view": whole,
                    "same_call_as_still": same,
                    "counted_unaided": counted,
                    "extra_detections": extra,
                    "never_wholly_in_view": r.partial_cells,
                    "cells_recorded": len(recorded),
                }
            )
    return {
        "fields": [f.image.name for f in fields],
        "still": {k: {"label": v[0], "set_aside": v[1]} for k, v in still_call.items()},
        "rows": rows,
    }


def markdown(r: dict) -> str:
    lines = [
        f"Pan over {len(r['fields'])} BCCD fields side by side ({', '.join(r['fields'])}):",
        "",
        "| px/frame | frames | white cells | found | judged on a whole view | same call as the still field | "
        "counted unaided | extra detections | never wholly in view |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['speed_px']} | {x['frames']} | {x['white_cells']} | {x['found']} | {x['judged_on_a_whole_view']} | "
            f"{x['same_call_as_still']} | "
            f"{x['counted_unaided']} | {x['extra_detections']} | {x['never_wholly_in_view']} |"
        )
    return "\n".join(lines)
