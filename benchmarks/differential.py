"""The differential a laboratory reads, against the true one (``bmc bench differential``).

One real session over the fields (or cell images) of a truth file (``file,label``, as ``bmc bench
truth`` writes: BCCD's single-white-cell fields, or the Munich cells), then the session's own
differential record (:func:`bmc.edge_app.review.session_differential`, what the report, the
screen and FHIR show) compared with the truth's, class by class, in percentage points:

* **alone** — as the device counts with no person: the cells it counted unaided;
* **after review** — a simulated reviewer decides every cell the session set aside, through the
  real audited review (:class:`bmc.edge_app.review.Reviewer`): the field's own white cell (the cell
  the field is scored on, :func:`bmc.benchmarks.detection.best_cells`) is named with its true class,
  any other cell set aside in the field is rejected (not the field's white cell: a lobe found
  apart, debris). Cells counted unaided stay as the device counted them.

Beside them: the share of cells set aside for review, and how many of the truth's white cells the
session counted in any class. The truth's differential is per 100 of its cells (all leukocytes
for BCCD), so both sides are blood differentials.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

from bmc.benchmarks.adapt import read_truth


def run(source, truth_file, model=None, mode: str = "field", orientations: int | None = None) -> dict:
    from bmc.benchmarks.detection import best_cells
    from bmc.edge_app import review, sessiondb
    from bmc.edge_app.classifier import DEFAULT_MODEL, DEFAULT_ORIENTATIONS, CellClassifier
    from bmc.edge_app.differential import differential_of
    from bmc.edge_app.session import EdgeSession, SessionConfig

    source = Path(source)
    truth = read_truth(truth_file, source)
    clf = CellClassifier(
        model or DEFAULT_MODEL, threads=os.cpu_count(), orientations=orientations or DEFAULT_ORIENTATIONS
    )
    true = differential_of(Counter(truth.values()), clf.labels)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "fields"
        src.mkdir()
        names = {}
        for k, rel in enumerate(sorted(truth)):
            link = src / f"{k:05d}_{Path(rel).name}"  # flat, unique, in the truth's order
            link.symlink_to((source / rel).resolve())
            names[link.name] = rel
        out = Path(tmp) / "s"
        EdgeSession(str(src), clf, out, SessionConfig(mode=mode, save_crops=False), echo=lambda m: None).run()
        db = sessiondb.connect(out)
        try:
            alone = review.session_differential(db)
            cells = sessiondb.cells(db)
        finally:
            db.close()
        field_cell = {source_name: cid for source_name, (_, cid, _) in best_cells(out / "session.sqlite").items()}
        decisions = []
        for c in cells:
            if c.status != "pending":
                continue
            rel = names.get(c.source)
            own = rel is not None and field_cell.get(c.source) == c.id
            decisions.append((c.id, truth[rel] if own else review.REJECTED))
        with review.Reviewer(out, "bench", allow_new_labels=True) as r:
            for cid, label in decisions:
                r.decide(cid, label)
        db = sessiondb.connect(out)
        try:
            reviewed = review.session_differential(db)
            final = {c.id: c.final_label for c in sessiondb.cells(db)}
        finally:
            db.close()
    classes = [r.label for r in true.rows]

    def gaps(record) -> dict[str, float]:
        return {c: (record.share(c).percent if record.share(c) else 0.0) - true.share(c).percent for c in classes}

    counted_alone = alone.counted
    return {
        "source": str(source),
        "truth": str(truth_file),
        "cells": len(truth),
        "model": Path(model or DEFAULT_MODEL).name,
        "orientations": clf.orientations,
        "true": true.to_dict(),
        "alone": alone.to_dict(),
        "after_review": reviewed.to_dict(),
        "gap_alone_pp": gaps(alone),
        "gap_after_review_pp": gaps(reviewed),
        "set_aside_share": alone.waiting / max(alone.waiting + counted_alone, 1),
        "fields_without_their_cell": len(truth) - sum(final.get(cid) is not None for cid in field_cell.values()),
        "worst_gap_after_review_pp": max((abs(v) for v in gaps(reviewed).values()), default=0.0),
    }


def markdown(r: dict) -> str:
    true = {x["label"]: x for x in r["true"]["rows"]}
    alone = {x["label"]: x for x in r["alone"]["rows"]}
    after = {x["label"]: x for x in r["after_review"]["rows"]}
    lines = [
        f"Differential of {r['cells']} cells of {r['source']} ({r['model']}, {r['orientations']} orientations): "
        f"{100 * r['set_aside_share']:.0f}% of the cells set aside for review; the device alone counted "
        f"{r['alone']['total']} leukocytes, after a *simulated* review (every cell set aside named from the "
        f"truth file, as a person would) {r['after_review']['total']}.",
        "",
        "| class | true % | device alone % | gap (pp) | after review % | gap (pp) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c, t in true.items():
        a, b = alone.get(c, {"percent": 0.0}), after.get(c, {"percent": 0.0})
        lines.append(
            f"| {c} | {t['percent']:.1f} | {a['percent']:.1f} | {r['gap_alone_pp'][c]:+.1f} | {b['percent']:.1f} | "
            f"{r['gap_after_review_pp'][c]:+.1f} |"
        )
    lines.append("")
    lines.append(f"Largest gap after review: {r['worst_gap_after_review_pp']:.1f} percentage points.")
    return "\n".join(lines)
