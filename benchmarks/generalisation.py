"""Generalisation to another microscope: a model trained on CellaVision PBC images, scored on BCCD.

BCCD comes from another microscope, stain and camera (blurrier, bluer). Each field with exactly
one labelled white cell gives one test cell, cut from the field around its VOC box at the model's
trained cell scale (:func:`edge_app.cells.crop_cell`) — the way the edge app cuts the cells it
finds. Balanced accuracy is the headline: BCCD is 60% neutrophils.

    python -m benchmarks.generalisation MODEL [--bccd DIR] [--json OUT]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.bccd import single_cell_fields
from bmc.contract import preprocess, read_image
from edge_app.cells import crop_cell

DEFAULT_BCCD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bccd"


def bccd_cells(root, contract):
    """(model inputs, label names) of the single-white-cell BCCD fields at the trained scale."""
    xs, ys = [], []
    for f in single_cell_fields(root):
        crop = crop_cell(read_image(str(f.image)), f.wbc[0], contract)
        xs.append(preprocess(crop, contract, "BGR", crop=False))
        ys.append(f.labels[0])
    return np.stack(xs), ys


def score(model_path, bccd=DEFAULT_BCCD) -> dict:
    from train.evaluate import load_classifier
    from train.metrics import classification_metrics

    clf, contract = load_classifier(model_path)
    xs, names = bccd_cells(bccd, contract)
    index = {l: i for i, l in enumerate(contract.labels)}
    probs = np.concatenate([clf.predict(xs[i:i + 32]) for i in range(0, len(xs), 32)])
    m = classification_metrics(np.array([index[n] for n in names]), probs, list(contract.labels))
    m["model"] = str(model_path)
    m["data"] = f"{bccd} (single-WBC fields, cells cut at cell_fraction {contract.cell_fraction})"
    return m


def main(argv=None):
    import argparse

    from train.metrics import per_class_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--bccd", default=str(DEFAULT_BCCD))
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    m = score(a.model, a.bccd)
    print(per_class_table(m))
    if a.json:
        Path(a.json).write_text(json.dumps(m, indent=2))


if __name__ == "__main__":
    main()
