"""Cell finding and field-level classification on the BCCD microscope-camera fields.

* Finding: a found cell is a true positive when its centre lies in a VOC ``WBC`` box; recall over
  the 372 boxes, precision over the cells found.
* Field classification: on the fields with one labelled white cell (neutrophil, eosinophil,
  lymphocyte, monocyte), the field's most confident white cell is the field's answer, through the
  real edge session (finder, session scale, crop, classifier); balanced accuracy over the four.
  Beside it, what a differential takes in without a person: the share of answers the app sets
  aside for review, and the balanced accuracy of those it counts on its own.
  As the issue puts it, cells labelled platelet or erythroblast are set aside: they are not white
  cells (a field whose found cells are all set aside answers with its most confident cell, which
  is then wrong).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from bmc.benchmarks.bccd import read_fields, single_cell_fields
from bmc.edge_app import sessiondb
from bmc.edge_app.detect import FinderConfig

NOT_WHITE = ("platelet", "erythroblast")  # found and classified, but not a white cell


def finding(bccd, cfg: FinderConfig = FinderConfig()) -> dict:
    from bmc.benchmarks.finding import FieldBoxes
    from bmc.benchmarks.finding import finding as match

    r = match([FieldBoxes(f.image, list(f.wbc)) for f in read_fields(bccd)], cfg)
    return {
        "boxes": r["boxes"],
        "found": r["found"],
        "recall": r["recall"],
        "precision": r["precision"],
        "false_positives": r["false_finds"],
        "missed": r["missed"],
    }


def best_cells(db_path: Path) -> dict[str, tuple[str, int, bool]]:
    """``{field: (label, cell id, set aside)}``: the cell each field is scored on, its most confident
    white cell (a white cell before a platelet or erythroblast, then the most confident)."""
    db = sessiondb.connect(db_path.parent)
    try:
        found = sessiondb.cells(db)
    finally:
        db.close()
    best: dict[str, tuple] = {}
    for c in found:
        key = (c.model_label not in NOT_WHITE, c.confidence)
        if c.source not in best or key > best[c.source][1]:
            best[c.source] = (c.model_label, key, c.id, bool(c.flag))
    return {s: (label, cid, flag) for s, (label, _, cid, flag) in best.items()}


def field_classification(
    bccd, model: str | None = None, orientations: int | None = None, white_balance: bool = False
) -> dict:
    from bmc.edge_app.classifier import DEFAULT_MODEL, DEFAULT_ORIENTATIONS, CellClassifier
    from bmc.edge_app.session import EdgeSession, SessionConfig
    from bmc.train.metrics import confusion

    fields = single_cell_fields(bccd)
    clf = CellClassifier(
        model or DEFAULT_MODEL, threads=os.cpu_count(), orientations=orientations or DEFAULT_ORIENTATIONS
    )
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "fields"
        src.mkdir()
        for f in fields:
            (src / f.image.name).symlink_to(f.image.resolve())
        EdgeSession(
            str(src),
            clf,
            Path(tmp) / "s",
            SessionConfig(save_crops=False, white_balance=white_balance),
            echo=lambda m: None,
        ).run()
        best = {
            f: (label, None, flag) for f, (label, _, flag) in best_cells(Path(tmp) / "s" / "session.sqlite").items()
        }
    truth = [f.labels[0] for f in fields]
    pred = [best.get(f.image.name, ("none", 0))[0] for f in fields]
    classes = ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    recall = {c: float(np.mean([p == c for t, p in zip(truth, pred) if t == c])) for c in classes}
    # what reaches the differential unreviewed: the fields whose answer the app counts on its own
    sure = [(t, p) for f, t, p in zip(fields, truth, pred) if f.image.name in best and not best[f.image.name][2]]
    sure_recall = {
        c: float(np.mean([p == c for t, p in sure if t == c])) if any(t == c for t, _ in sure) else 0.0 for c in classes
    }
    return {
        "fields": len(fields),
        "no_cell_found": sum(p == "none" for p in pred),
        "set_aside": 1 - len(sure) / max(len(fields), 1),
        "counted_accuracy": float(np.mean([t == p for t, p in sure])) if sure else 0.0,
        "counted_balanced_accuracy": float(np.mean(list(sure_recall.values()))),
        "counted_recall": sure_recall,
        "accuracy": float(np.mean([t == p for t, p in zip(truth, pred)])),
        "balanced_accuracy": float(np.mean([recall[c] for c in classes if c in truth])),
        "recall": recall,
        "model": clf.path.name,
        "orientations": clf.orientations,
        "white_balance": bool(white_balance and clf.contract.lamp is not None),
        "confusion_labels": classes + sorted(set(pred) - set(classes)),
        "confusion_matrix": confusion(truth, pred, classes + sorted(set(pred) - set(classes))).tolist(),
    }
