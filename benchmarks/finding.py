"""White-cell finding against boxes in the three common formats (``bmc bench finding``).

* ``voc`` — Pascal VOC: one XML per image (``Annotations/<stem>.xml`` beside or under the boxes
  folder), objects named ``--label`` (BCCD: ``WBC``);
* ``csv`` — one row per box: ``image`` (file name), ``xmin, ymin, xmax, ymax`` in pixels, or as
  fractions of the width and height when every coordinate is within 0..1 (the Aslan release), and
  ``label``;
* ``yolo`` — one ``<stem>.txt`` per image: ``class cx cy w h``, normalised; ``--label`` is the class
  number.

A found cell is right when its centre lies in a box of the label: recall over the boxes, precision
over the cells found. With ``errors``, each field's misses and false finds are written out
(``errors.csv``) with a picture of them (``misses.png``, ``false_finds.png``), for a look.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import cv2
import numpy as np

from bmc.contract import read_image
from bmc.edge_app.cells import Box
from bmc.edge_app.detect import FieldScale, FinderConfig, find_cells, scaled
from bmc.edge_app.sources import IMAGE_SUFFIXES
from bmc.errors import BmcError


class BoxesError(BmcError, ValueError):
    pass


@dataclasses.dataclass
class FieldBoxes:
    image: Path
    boxes: list[Box]


def _images(source: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(source.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def read_boxes(source: str | Path, boxes: str | Path, fmt: str, label: str) -> list[FieldBoxes]:
    source, boxes = Path(source), Path(boxes)
    images = _images(source)
    if not images:
        raise BoxesError(f"{source}: no images")
    out: list[FieldBoxes] = []
    if fmt == "voc":
        from bmc.benchmarks.bccd import read_voc_boxes

        if not boxes.is_dir():
            raise BoxesError(f"{boxes}: the folder of VOC XML files")
        for path in images.values():
            xml = boxes / f"{path.stem}.xml"
            if xml.is_file():
                out.append(FieldBoxes(path, read_voc_boxes(xml, label)))
    elif fmt == "csv":
        try:
            rows = list(csv.DictReader(open(boxes, newline="", encoding="utf-8-sig")))
        except OSError as e:
            raise BoxesError(f"{boxes}: cannot read ({e})") from e
        need = {"image", "xmin", "ymin", "xmax", "ymax", "label"}
        if not rows or not need <= set(rows[0]):
            raise BoxesError(f"{boxes}: needs columns {', '.join(sorted(need))}")
        fractions = all(float(r[k]) <= 1.0 for r in rows for k in ("xmin", "ymin", "xmax", "ymax"))
        by_image: dict[str, list[Box]] = {name: [] for name in {r["image"] for r in rows}}
        for line, r in enumerate(rows, start=2):
            if r["image"] not in images:
                raise BoxesError(f"{boxes}:{line}: image {r['image']!r} is not in {source}")
            if r["label"].strip().lower() != label.lower():
                continue
            x0, y0, x1, y1 = (float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            if fractions:
                h, w = cv2.imread(str(images[r["image"]]), cv2.IMREAD_UNCHANGED).shape[:2]
                x0, x1, y0, y1 = x0 * w, x1 * w, y0 * h, y1 * h
            by_image[r["image"]].append(Box(int(x0), int(y0), int(round(x1 - x0)), int(round(y1 - y0))))
        out = [FieldBoxes(images[name], bs) for name, bs in sorted(by_image.items())]
    elif fmt == "yolo":
        for path in images.values():
            txt = boxes / f"{path.stem}.txt"
            if not txt.is_file():
                continue
            h, w = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape[:2]
            bs = []
            for line in txt.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 5 and parts[0] == label:
                    cx, cy, bw, bh = (float(v) for v in parts[1:5])
                    bs.append(
                        Box(int((cx - bw / 2) * w), int((cy - bh / 2) * h), int(round(bw * w)), int(round(bh * h)))
                    )
            out.append(FieldBoxes(path, bs))
    else:
        raise BoxesError(f"unknown box format {fmt!r} (voc, csv or yolo)")
    if not out:
        raise BoxesError(f"no boxes of {boxes} match an image of {source}")
    return out


def tint_red_cells(bgr: np.ndarray, strength: float) -> np.ndarray:
    """The field as a bluer stain would have coloured it (an alkaline buffer, an azure-rich Giemsa):
    every pixel loses yellow (LAB *b*) and some red (*a*) in proportion to how much redder than the
    background it is, so pink red cells turn lilac (0.5) or bluish-grey (1.0) and the purple
    nuclei turn bluer. A stress the finder's colour rule must survive; no such smear is at hand."""
    lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB).astype(np.float32)
    light = lab[..., 0] >= np.percentile(lab[..., 0], 90)
    pink = np.clip(lab[..., 1] - np.median(lab[..., 1][light]), 0, None)
    lab[..., 2] -= strength * pink
    lab[..., 1] -= 0.5 * strength * pink
    return cv2.cvtColor(np.clip(lab, 0, 255).astype(np.uint8), cv2.COLOR_LAB2BGR)


def finding(
    fields: list[FieldBoxes], cfg: FinderConfig = FinderConfig(), errors: str | Path | None = None, tint: float = 0.0
) -> dict:
    """Recall and precision of the finder on ``fields``, run as one session runs them: the red cells
    measured on the first fields and now and then (:class:`bmc.edge_app.detect.FieldScale`), the finder's
    sizes following them. ``tint`` > 0: each field through :func:`tint_red_cells` first."""
    tp = fn = fp = 0
    misses, false_finds, rows = [], [], []
    scale = FieldScale()
    used = cfg
    for f in fields:
        frame = read_image(str(f.image))
        if tint:
            frame = tint_red_cells(frame, tint)
        if scale.observe(frame):
            used = scaled(cfg, scale.diameter)
        cells = find_cells(frame, used, scale.red_colour)
        hit = [False] * len(f.boxes)
        for c in cells:
            cx, cy = c.centre
            inside = [i for i, b in enumerate(f.boxes) if b.x <= cx <= b.x + b.w and b.y <= cy <= b.y + b.h]
            for i in inside:
                hit[i] = True
            if not inside:
                fp += 1
                false_finds.append((frame, c.box))
                rows.append((f.image.name, "false find", c.box.x, c.box.y, c.box.w, c.box.h))
        for b, h in zip(f.boxes, hit):
            if not h:
                misses.append((frame, b))
                rows.append((f.image.name, "missed", b.x, b.y, b.w, b.h))
        tp += sum(hit)
        fn += len(hit) - sum(hit)
    if errors:
        out = Path(errors)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "errors.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "error", "x", "y", "w", "h"])
            w.writerows(rows)
        for name, items in (("misses.png", misses), ("false_finds.png", false_finds)):
            cv2.imwrite(str(out / name), _grid(items))
    return {
        "fields": len(fields),
        "boxes": tp + fn,
        "found": tp + fp,
        "recall": tp / max(tp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "missed": fn,
        "false_finds": fp,
        "scale": scale.to_dict(),
        "tint": tint,
    }


def _grid(items, side: int = 128, per_row: int = 8, limit: int = 48) -> np.ndarray:
    """Up to ``limit`` boxes cut from their fields (with a margin), side by side."""
    tiles = []
    for frame, b in items[:limit]:
        m = max(b.w, b.h) // 2
        x0, y0 = max(0, b.x - m), max(0, b.y - m)
        crop = frame[y0 : b.y + b.h + m, x0 : b.x + b.w + m]
        tile = (
            cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
            if crop.size
            else np.zeros((side, side, 3), np.uint8)
        )
        cv2.rectangle(tile, (0, 0), (side - 1, side - 1), (0, 0, 255), 1)
        tiles.append(tile)
    if not tiles:
        return np.full((side, side, 3), 255, np.uint8)
    while len(tiles) % per_row:
        tiles.append(np.full((side, side, 3), 255, np.uint8))
    rows = [np.hstack(tiles[i : i + per_row]) for i in range(0, len(tiles), per_row)]
    return np.vstack(rows)
