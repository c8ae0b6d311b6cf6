"""A laboratory's own labelled cells, from the edge app's reviewed sessions, as training data.

A model trained on one laboratory's microscope is less sure of another's (``benchmarks/README.md``:
BCCD, Munich); what closes that gap is that laboratory's own labelled cells. The edge app already
cuts every cell at the model's trained scale and stores its crop, and ``bmc edge review`` records
a person's label for it. :func:`harvest` turns the reviewed cells of session folders into a data
set ``bmc train`` reads:

* only cells a person labelled (never the model's own calls: a model taught its own answers
  learns its own mistakes); ``rejected`` cells are left out. ``counted=True`` also takes the
  cells the device counted with no person, labelled by its own call: self-training, measured by
  ``bmc bench multisource --labels counted`` and not offered by ``bmc data harvest``;
* each crop is padded, with its own median colour, to the geometry of a training image — the
  model's ``crop_fraction`` centre square of the padded image is the crop itself, so a harvested
  cell spans the same fraction of the model input as a training cell and the trainer's cell-scale
  measurement stays one number;
* ``DEST/<label>/*.png`` (lossless: the stored JPEG is not compressed twice) and
  ``DEST/manifest.csv`` (``path,label,group``, group = the field, so that cells of one field never
  straddle train and test), optionally with every image of another data set (``with_data``: the
  PBC release) so that one manifest trains on both; ``DEST/harvest.json`` says where each came from.

Pure numpy + OpenCV + SQLite, like the edge app: it runs on the device.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from bmc.contract import Contract, read_image
from bmc.edge_app import sessiondb
from bmc.edge_app.sessiondb import RecordedConfig
from bmc.train.data import DataError, discover


def _contract_of(config: RecordedConfig | None, fallback: Contract | None, where: str) -> Contract:
    recorded = config.contract if config is not None else None
    if recorded:
        return Contract.from_dict(recorded)
    if fallback is None:
        raise DataError(
            f"{where}: the session does not record its model's contract (recorded by an "
            "older bmc); give the model it ran with (--model)"
        )
    return fallback


def training_image(crop: np.ndarray, crop_fraction: float) -> np.ndarray:
    """``crop`` centred in a square ``1 / crop_fraction`` times its side, filled with its median colour."""
    h, w = crop.shape[:2]
    full = int(round(max(h, w) / crop_fraction))
    top, left = (full - h) // 2, (full - w) // 2
    fill = [float(v) for v in np.median(crop.reshape(-1, crop.shape[2]), axis=0)]
    return cv2.copyMakeBorder(crop, top, full - h - top, left, full - w - left, cv2.BORDER_CONSTANT, value=fill)


def harvest(
    sessions,
    dest,
    with_data=None,
    label_from: str = "folder",
    fallback: Contract | None = None,
    counted: bool = False,
) -> dict:
    """Write the reviewed cells of ``sessions`` (session folders) to ``dest`` (and, with ``counted``,
    those the device counted unaided, as it called them); returns a summary."""
    wanted = ("reviewed", "counted") if counted else ("reviewed",)
    dest = Path(dest)
    todo, sources = [], []  # every session is read and checked before anything is written
    for sdir in map(Path, sessions):
        db = sessiondb.connect(sdir)
        try:
            configs = {s.id: s.config for s in sessiondb.sessions(db)}
            picked = [c for c in sessiondb.cells(db) if c.status in wanted]
        finally:
            db.close()
        n_counted = sum(c.status == "counted" for c in picked)
        sources.append(
            {"folder": str(sdir.resolve()), "reviewed_cells": len(picked) - n_counted, "counted_cells": n_counted}
        )
        todo += [
            (sdir, c, _contract_of(configs.get(c.session_id), fallback, f"{sdir} session {c.session_id}"))
            for c in picked
        ]
    rows, skipped, reviewers = [], [], Counter()
    for sdir, c, contract in todo:
        if not c.crop:
            skipped.append({"cell": f"{sdir}#{c.id}", "why": "no crop stored (session run with --no-crops)"})
            continue
        try:
            crop = read_image(str(sdir / c.crop))
        except ValueError as e:
            skipped.append({"cell": f"{sdir}#{c.id}", "why": str(e)})
            continue
        label = c.final_label
        assert label is not None  # reviewed or counted: never pending nor rejected
        name = f"{label}/{sdir.name}_s{c.session_id}_c{c.id}.png"
        (dest / label).mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(dest / name), training_image(crop, contract.crop_fraction)):
            raise OSError(f"{dest / name}: could not be written")
        rows.append((name, label, f"{sdir.name}:s{c.session_id}:{c.source}"))
        reviewers[c.reviewer or "(the device, unaided)"] += 1
    if not rows:
        raise DataError(
            ("no reviewed or counted cell" if counted else "no reviewed cell")
            + " with a crop in "
            + ", ".join(map(str, sessions))
            + (": no cell was counted unaided nor reviewed" if counted else ": label cells first (bmc edge review)")
        )
    extra = discover(with_data, label_from) if with_data else []
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group"])
        w.writerows(rows)
        w.writerows((str(Path(s.path).resolve()), s.label, s.group) for s in extra)
    summary = {
        "sessions": sources,
        "cells": len(rows),
        "by_label": dict(Counter(r[1] for r in rows)),
        "reviewers": dict(reviewers),
        "with_data": str(Path(with_data).resolve()) if with_data else None,
        "with_data_images": len(extra),
        "skipped": skipped,
    }
    (dest / "harvest.json").write_text(json.dumps(summary, indent=2))
    return summary
