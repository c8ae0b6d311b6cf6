"""Generalisation to another microscope: a model trained on CellaVision PBC images, scored on BCCD.

BCCD comes from another microscope, stain and camera (blurrier, bluer). Each field with exactly
one labelled white cell gives one test cell: the edge app's cell finder runs on the field, the
cell it finds inside the VOC box (the box itself where it finds none) is cut at the model's
trained scale with the session's median cell diameter (:class:`edge_app.cells.SessionScale`) —
the way the edge app cuts the cells it finds. Balanced accuracy is the headline: BCCD is 60%
neutrophils.

    python -m benchmarks.generalisation MODEL [--bccd DIR] [--json OUT]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.bccd import single_cell_fields
from bmc.contract import preprocess, read_image
from edge_app.cells import SessionScale, crop_cell
from edge_app.detect import find_cells

DEFAULT_BCCD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bccd"


def bccd_cells(root, contract):
    """(model inputs, label names) of the single-white-cell BCCD fields at the trained scale."""
    scale = SessionScale()
    picked = []
    for f in single_cell_fields(root):
        frame = read_image(str(f.image))
        voc = f.wbc[0]
        inside = [c for c in find_cells(frame) if voc.x <= c.centre[0] <= voc.x + voc.w
                  and voc.y <= c.centre[1] <= voc.y + voc.h]
        box = max(inside, key=lambda c: c.nucleus_area).box if inside else voc
        scale.observe([c.box.diameter for c in inside])
        picked.append((frame, box, f.labels[0]))
    xs = [preprocess(crop_cell(frame, scale.box_for(box), contract), contract, "BGR", crop=False)
          for frame, box, _ in picked]
    return np.stack(xs), [label for _, _, label in picked]


def score(model_path, bccd=DEFAULT_BCCD, orientations: int = 1, scale: float = 1.0) -> dict:
    """Metrics of the model on the BCCD white cells. ``scale`` != 1 cuts every cell ``scale`` times
    the measured scale (a diagnostic: is the cell scale what separates the two microscopes?)."""
    from edge_app.model import predict_oriented
    from train.evaluate import load_classifier
    from train.metrics import classification_metrics

    import dataclasses

    clf, contract = load_classifier(model_path)
    cut = contract if scale == 1.0 else dataclasses.replace(contract, cell_fraction=contract.cell_fraction / scale)
    xs, names = bccd_cells(bccd, cut)
    index = {l: i for i, l in enumerate(contract.labels)}
    probs = np.concatenate([predict_oriented(clf.predict, xs[i:i + 32], orientations)
                            for i in range(0, len(xs), 32)])
    m = classification_metrics(np.array([index[n] for n in names]), probs, list(contract.labels))
    m["model"] = str(model_path)
    m["orientations"] = orientations
    m["scale"] = scale
    m["data"] = f"{bccd} (single-WBC fields, session-scale crops, cell_fraction {contract.cell_fraction})"
    return m


def main(argv=None):
    import argparse

    from train.metrics import per_class_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--bccd", default=str(DEFAULT_BCCD))
    ap.add_argument("--json")
    ap.add_argument("--orientations", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0)
    a = ap.parse_args(argv)
    m = score(a.model, a.bccd, a.orientations, a.scale)
    print(per_class_table(m))
    if a.json:
        Path(a.json).write_text(json.dumps(m, indent=2))


if __name__ == "__main__":
    main()
