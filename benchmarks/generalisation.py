"""Generalisation to another microscope: a model trained on CellaVision PBC images, scored on BCCD.

BCCD comes from another microscope, stain and camera (blurrier, bluer). Each field with exactly
one labelled white cell gives one test cell: the edge app's cell finder runs on the field, the
cell it finds inside the VOC box (the box itself where it finds none) is cut at the model's
trained scale with the session's median cell diameter (:class:`bmc.edge_app.cells.CutDiameter`) —
the way the edge app cuts the cells it finds. Balanced accuracy is the headline: BCCD is 60%
neutrophils.

``--matek DIR`` scores the Munich bone-marrow cells instead (Matek et al. 2021, the seed's data
set; another laboratory, scanner and a marrow rather than a blood smear): the cells whose class
code has a PBC counterpart, each found in its 250 px crop and cut at the trained scale with the
set's median cell diameter. The public samples are few (about 30 such cells): a sanity check of
the domain the product is for, not a benchmark to compare models on.

    python -m bmc.benchmarks.generalisation MODEL [--bccd DIR | --matek DIR] [--json OUT]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bmc.benchmarks.bccd import single_cell_fields
from bmc.benchmarks.stain_calibration import CALIBRATIONS, calibrator, pooled_stats, reference_stats
from bmc.contract import normalise_stain, preprocess, read_image
from bmc.edge_app.cells import Box, CutDiameter, crop_cell
from bmc.edge_app.detect import find_cells
from bmc.train.data import DataError

# the project's data beside the repository, as the README lays it out: relative to where the user
# runs the command (a repository checkout's root), never to where the package is installed
DEFAULT_DATA = Path(os.environ.get("BMC_DATA", Path("..") / "shared" / "data"))
DEFAULT_BCCD = DEFAULT_DATA / "bccd"
DEFAULT_PBC = DEFAULT_DATA / "pbc"


def data_folder(path, option: str) -> Path:
    """``path`` as a folder that exists, or a one-line error that says where it was looked for and
    which option names another (a default is relative to the working folder)."""
    p = Path(path)
    if not p.is_dir():
        where = f" (from {Path.cwd()})" if not p.is_absolute() else ""
        raise DataError(f"{p}{where}: no such data folder; give {option} FOLDER")
    return p


# Matek / Kaggle bone-marrow class codes → PBC labels (codes without a PBC class are left out:
# blasts, plasma cells, proerythroblasts, artefacts, ...). PBC's "neutrophil" holds bands and
# segmented cells; its "ig" promyelocytes, myelocytes and metamyelocytes.
MATEK_TO_LABEL = {
    "NGS": "neutrophil",
    "NGB": "neutrophil",
    "EOS": "eosinophil",
    "BAS": "basophil",
    "LYT": "lymphocyte",
    "MON": "monocyte",
    "EBO": "erythroblast",
    "PMO": "ig",
    "MYB": "ig",
    "MMZ": "ig",
}
# the same codes for a stage model (bmc_pbc11_stages): the granulocytic series keeps its stages
MATEK_TO_STAGE = {
    **MATEK_TO_LABEL,
    "NGS": "segmented",
    "NGB": "band",
    "PMO": "promyelocyte",
    "MYB": "myelocyte",
    "MMZ": "metamyelocyte",
}
# Munich codes no model of the kit can name (the cells it should set aside as unknown)
MATEK_UNKNOWN = {
    "BLA": "blast",
    "ART": "artefact",
    "PLM": "plasma cell",
    "PEB": "proerythroblast",
    "NIF": "not identifiable",
    "ABE": "abnormal eosinophil",
    "FGC": "faggot cell",
    "HAC": "hairy cell",
    "KSC": "smudge cell",
    "LYI": "immature lymphocyte",
    "OTH": "other",
}


def matek_map(labels) -> dict[str, str]:
    """Munich code → the model's label, for the codes the model can name."""
    table = MATEK_TO_STAGE if "band" in labels else MATEK_TO_LABEL
    return {code: label for code, label in table.items() if label in labels}


def bccd_cells(root, contract):
    """(model inputs, label names) of the single-white-cell BCCD fields at the trained scale."""
    scale = CutDiameter()
    picked = []
    for f in single_cell_fields(root):
        frame = read_image(str(f.image))
        voc = f.wbc[0]
        inside = [
            c
            for c in find_cells(frame)
            if voc.x <= c.centre[0] <= voc.x + voc.w and voc.y <= c.centre[1] <= voc.y + voc.h
        ]
        box = max(inside, key=lambda c: c.nucleus_area).box if inside else voc
        scale.observe([c.box.diameter for c in inside])
        picked.append((frame, box, f.labels[0]))
    xs = [
        preprocess(crop_cell(frame, scale.box_for(box), contract), contract, "BGR", crop=False)
        for frame, box, _ in picked
    ]
    return np.stack(xs), [label for _, _, label in picked]


def matek_cells(root, contract, codes: dict[str, str] | None = None):
    """(model inputs, label names) of the Munich cells with a PBC class, at the trained scale.

    Each crop is one centred cell: the cell finder's box near the centre where it finds one (its
    rule is relative to the field, and a cell that fills the crop can hide from it), else the
    centre; all cut at the set's median diameter of the cells found. ``codes``: code → name to
    return (default: the codes the contract's labels can name, as those labels)."""
    root = Path(root)
    scale = CutDiameter()
    picked = []
    for code, label in (codes or matek_map(contract.labels)).items():
        for path in sorted((root / code).rglob("*.jpg")) if (root / code).is_dir() else []:
            img = read_image(str(path))
            h, w = img.shape[:2]
            near = [
                c for c in find_cells(img) if abs(c.centre[0] - w / 2) < 0.2 * w and abs(c.centre[1] - h / 2) < 0.2 * h
            ]
            if near:
                scale.observe([max(near, key=lambda c: c.nucleus_area).box.diameter])
            picked.append((img, Box(w // 2, h // 2, 0, 0), label))
    if not picked or scale.diameter is None:
        raise DataError(f"{root}: no Matek cell with a PBC class found (expected CODE/*.jpg folders)")
    xs = [
        preprocess(crop_cell(img, scale.box_for(box), contract), contract, "BGR", crop=False) for img, box, _ in picked
    ]
    return np.stack(xs), [label for _, _, label in picked]


def score(
    model_path,
    bccd=DEFAULT_BCCD,
    orientations: int = 1,
    scale: float = 1.0,
    matek=None,
    calibrate: str = "none",
    reference=DEFAULT_PBC,
) -> dict:
    """Metrics of the model on the BCCD white cells. ``scale`` != 1 cuts every cell ``scale`` times
    the measured scale (a diagnostic: is the cell scale what separates the two microscopes?);
    ``calibrate`` maps the set's stain (BCCD's or Munich's) onto the training stain of ``reference`` first
    (:mod:`bmc.benchmarks.stain_calibration`, another diagnostic)."""
    import dataclasses

    from bmc.edge_app.classifier import predict_oriented
    from bmc.train.evaluate import load_classifier
    from bmc.train.metrics import classification_metrics

    if matek:
        matek = data_folder(matek, "--matek")
    else:
        bccd = data_folder(bccd, "--bccd")
    if calibrate != "none":
        reference = data_folder(reference, "--reference")
    clf, contract = load_classifier(model_path)
    cut = contract if scale == 1.0 else dataclasses.replace(contract, cell_fraction=contract.cell_fraction / scale)
    if calibrate != "none":
        # the session's stain, pooled over all its images: BCCD's fields, or every Munich cell image
        fields = sorted(Path(matek).rglob("*.jpg")) if matek else sorted((Path(bccd) / "JPEGImages").glob("*.jpg"))
        fix = calibrator(pooled_stats(fields), reference_stats(reference), calibrate)
        raw_cut = dataclasses.replace(cut, stain_norm="none")
        raw, names = matek_cells(matek, raw_cut) if matek else bccd_cells(bccd, raw_cut)
        xs = np.stack([normalise_stain(fix(x.astype(np.uint8)), contract.stain_norm) for x in raw]).astype(np.float32)
    else:
        xs, names = matek_cells(matek, cut) if matek else bccd_cells(bccd, cut)
    index = {l: i for i, l in enumerate(contract.labels)}
    probs = np.concatenate([predict_oriented(clf.predict, xs[i : i + 32], orientations) for i in range(0, len(xs), 32)])
    m = classification_metrics(np.array([index[n] for n in names]), probs, list(contract.labels)).to_dict()
    m["model"] = str(model_path)
    m["orientations"] = orientations
    m["scale"] = scale
    m["calibrate"] = calibrate
    m["data"] = (
        f"{matek} (cells with a PBC class, set-scale crops"
        if matek
        else f"{bccd} (single-WBC fields, session-scale crops"
    ) + f", cell_fraction {contract.cell_fraction})"
    return m


def main(argv=None):
    import argparse

    from bmc.train.metrics import Metrics, per_class_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--bccd", default=str(DEFAULT_BCCD))
    ap.add_argument("--matek")
    ap.add_argument("--calibrate", default="none", choices=CALIBRATIONS)
    ap.add_argument("--json")
    ap.add_argument("--orientations", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0)
    a = ap.parse_args(argv)
    m = score(a.model, a.bccd, a.orientations, a.scale, a.matek, a.calibrate)
    print(per_class_table(Metrics.from_dict(m)))
    if a.json:
        Path(a.json).write_text(json.dumps(m, indent=2))


if __name__ == "__main__":
    main()
