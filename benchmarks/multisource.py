"""A second microscope as a second training domain (``bmc bench multisource``): the data a
laboratory's own reviewed cells make, beside the training laboratory's split.

The fields of a truth file are drawn in two halves with ``seed``. Over the first half a real session
runs (crops saved), each field's scored cell is reviewed with its true class, as a technician would
with ``bmc edge review``, and ``bmc data harvest`` turns the reviewed cells into training images.
The split written beside them is the model's own split (``--split``, e.g. the PBC split the shipped
model was trained on) with those cells added to its training part, ``repeat`` times each (a few
hundred cells beside seven thousand would hardly move the model; each copy is augmented afresh). The
second half's truth is written for scoring: cells of those fields were never trained on.

Then, for instance (the commands it prints)::

    bmc train OUT --split OUT/split.json --init-from edge_app/models/bmc_pbc8_lite0_fp16.tflite ...
    bmc bench autonomy --source FIELDS --truth OUT/held_out_truth.csv --model MODEL
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from bmc.benchmarks.adapt import link_truth_fields


def prepare(
    source,
    truth_file,
    split_file,
    out,
    seed: int = 1,
    repeat: int = 5,
    model=None,
    log=print,
    labels: str = "truth",
    orientations: int = 1,
    balance: bool = False,
) -> dict:
    """``labels="truth"``: each taught field's white cell reviewed with its true class.
    ``labels="counted"``: nobody reviews; every cell the device counted unaided on the taught fields
    is harvested as it called it (self-training; the truth file is used for the split and scoring
    only). The two differ in which cells are harvested, not only in their labels: ``truth`` takes each
    field's scored white cell, whether the device counted it or set it aside; ``counted`` takes every
    cell the device counted unaided (platelets and second cells of a field too) and none it set aside.
    ``balance``: each class's cells copied in inverse proportion to its count (``repeat`` times the
    mean class size over its own, rounded, within 1 to ``4 * repeat``), so that among the second
    microscope's images the commonest class weighs less than it does in a smear (mostly neutrophils)."""
    from bmc.benchmarks.autonomy import cells_of, link_fields
    from bmc.edge_app import review
    from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier
    from bmc.edge_app.session import EdgeSession, SessionConfig
    from bmc.train.data import Sample, load_split, save_split
    from bmc.train.harvest import harvest

    source, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bmc-multisource-", dir=out))
    try:
        flat = tmp / "all"
        truth, rel_of = link_truth_fields(source, truth_file, flat)
        names = sorted(truth)
        order = [names[i] for i in np.random.default_rng(2000 + seed).permutation(len(names))]
        taught, held = sorted(order[: len(order) // 2]), sorted(order[len(order) // 2 :])
        session = out / "session"
        if session.exists():
            shutil.rmtree(session)
        if labels not in ("truth", "counted"):
            raise ValueError(f"labels must be 'truth' or 'counted', not {labels!r}")
        clf = CellClassifier(model or DEFAULT_MODEL, orientations=orientations)
        EdgeSession(
            str(link_fields(flat, taught, tmp / "taught")), clf, session, SessionConfig(), echo=lambda m: None
        ).run()
        if labels == "truth":
            cells = cells_of(session / "session.sqlite")
            with review.Reviewer(session, "bench (true class)") as r:
                for f in taught:
                    if f in cells:
                        r.decide(cells[f][1], truth[f])
            log(f"{len(taught)} fields run and their white cell reviewed with its true class")
        else:
            log(f"{len(taught)} fields run; the cells counted unaided keep the device's call")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cells_dir = out / "cells"
    if cells_dir.exists():
        shutil.rmtree(cells_dir)
    summary = harvest([session], cells_dir, counted=labels == "counted")
    rows = list(csv.DictReader(open(cells_dir / "manifest.csv", newline="")))
    parts = load_split(split_file)
    added = [Sample(str((cells_dir / r["path"]).resolve()), r["label"], r["group"]) for r in rows]
    copies = _copies([s.label for s in added], repeat, balance)
    parts["train"] = list(parts["train"]) + [s for s in added for _ in range(copies[s.label])]
    save_split(parts, out / "split.json")
    with open(out / "held_out_truth.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label"])
        w.writerows((rel_of[f], truth[f]) for f in held)
    info = {
        "source": str(source),
        "seed": seed,
        "taught_fields": len(taught),
        "held_out_fields": len(held),
        "labels": labels,
        "orientations": orientations,
        "harvested": summary["by_label"],
        "repeat": repeat,
        "copies": copies,
        "split": str(out / "split.json"),
        "held_out_truth": str(out / "held_out_truth.csv"),
    }
    (out / "multisource.json").write_text(json.dumps(info, indent=2))
    return info


def _copies(labels: list[str], repeat: int, balance: bool) -> dict[str, int]:
    """Copies of each class's cells in the training part: ``repeat`` each, or balanced."""
    n = Counter(labels)
    if not balance:
        return {c: repeat for c in n}
    mean = len(labels) / len(n)
    return {c: int(min(4 * repeat, max(1, round(repeat * mean / k)))) for c, k in n.items()}
