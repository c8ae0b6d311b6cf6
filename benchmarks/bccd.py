"""The BCCD microscope-camera fields (Shenggan/BCCD_Dataset, MIT): boxes and white-cell labels.

``Annotations/*.xml`` are Pascal VOC files with ``WBC``, ``RBC`` and ``Platelets`` boxes;
``wbc_labels.csv`` (``,Image,Category``) gives the white-cell type of field ``Image``, a few with
two comma-separated types and some empty.
"""

from __future__ import annotations

import csv
import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

from bmc.edge_app.cells import Box

# BCCD's category names → the PBC / model labels
BCCD_TO_LABEL = {
    "NEUTROPHIL": "neutrophil",
    "EOSINOPHIL": "eosinophil",
    "LYMPHOCYTE": "lymphocyte",
    "MONOCYTE": "monocyte",
    "BASOPHIL": "basophil",
}


@dataclasses.dataclass(frozen=True)
class Field:
    image: Path
    wbc: tuple[Box, ...]
    labels: tuple[str, ...]  # model labels of the white cells, as listed in wbc_labels.csv


def read_voc_boxes(xml_path: Path, name: str = "WBC") -> list[Box]:
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.iter("object"):
        if obj.findtext("name", "").strip() != name:
            continue
        bb = obj.find("bndbox")
        x0, y0, x1, y1 = (int(float(bb.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append(Box(x0, y0, x1 - x0, y1 - y0))
    return boxes


def read_fields(root: str | Path) -> list[Field]:
    root = Path(root)
    labels: dict[int, tuple[str, ...]] = {}
    with open(root / "wbc_labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            cats = [c.strip() for c in (row.get("Category") or "").split(",") if c.strip()]
            labels[int(row["Image"])] = tuple(BCCD_TO_LABEL.get(c, c.lower()) for c in cats)
    fields = []
    for img in sorted((root / "JPEGImages").glob("BloodImage_*.jpg")):
        n = int(img.stem.split("_")[1])
        xml = root / "Annotations" / f"{img.stem}.xml"
        boxes = tuple(read_voc_boxes(xml)) if xml.exists() else ()
        fields.append(Field(img, boxes, labels.get(n, ())))
    return fields


def single_cell_fields(root: str | Path, classes=("neutrophil", "eosinophil", "lymphocyte", "monocyte")):
    """Fields with exactly one WBC box and one label among ``classes``: unambiguous ground truth."""
    return [f for f in read_fields(root) if len(f.wbc) == 1 and len(f.labels) == 1 and f.labels[0] in classes]
