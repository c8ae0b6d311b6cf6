"""White-cell finding against boxes in the three common formats (``bmc bench finding``).

* ``voc`` — Pascal VOC: one XML per image (``Annotations/<stem>.xml`` beside or under the boxes
  folder), objects named ``--label`` (BCCD: ``WBC``);
* ``csv`` — one row per box: ``image`` (file name), ``xmin, ymin, xmax, ymax`` in pixels, or as
  fractions of the width and height when every coordinate is within 0..1 (the Aslan release), and
  ``label``;
* ``yolo`` — one ``<stem>.txt`` per image: ``class cx cy w h``, normalised; ``--label`` is the class
  number.

A found cell stands for the box its centre lies in, one cell a box (:func:`match_cells`): recall
over the boxes, precision over the cells found, and the errors a differential count cannot absorb
— *extra detections* (a second cell found in a box already matched: one neutrophil's lobes
counted as two cells) and *merged cells* (a box left unmatched inside another's found cell: two
cells counted as one), each per white-cell box. With ``errors``, each field's misses, merges,
false finds and extra detections are written out (``errors.csv``) with pictures of them
(``misses.png``, ``false_finds.png``, ``extra.png``), for a look.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import cv2
import numpy as np

from bmc.contract import read_image
from bmc.edge_app.cells import Box
from bmc.edge_app.detect import FinderConfig, RedCells, find_cells, scaled
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


def match_cells(cells, boxes: list[Box]) -> tuple[dict[int, int], list[int], list[int], list[int]]:
    """One-to-one matching of found cells to white-cell boxes, as a differential counts them: a
    cell may stand for the box its centre lies in, nearest centres first, one cell a box.

    Returns (``{cell: box}`` matched, the extra cells — centre in a box that another cell already
    stands for: one cell found twice —, the false finds — centre in no box —, the merged boxes —
    unmatched boxes whose centre lies in a matched cell's box: two cells found as one)."""
    pairs = []
    for ci, c in enumerate(cells):
        cx, cy = c.centre
        for bi, b in enumerate(boxes):
            if b.x <= cx <= b.x + b.w and b.y <= cy <= b.y + b.h:
                bx, by = b.centre
                pairs.append(((cx - bx) ** 2 + (cy - by) ** 2, ci, bi))
    matched: dict[int, int] = {}
    taken: set[int] = set()
    for _, ci, bi in sorted(pairs):
        if ci not in matched and bi not in taken:
            matched[ci] = bi
            taken.add(bi)
    inside = {ci for _, ci, _ in pairs}
    extra = [ci for ci in range(len(cells)) if ci in inside and ci not in matched]
    false = [ci for ci in range(len(cells)) if ci not in inside]
    merged = []
    for bi, b in enumerate(boxes):
        if bi in taken:
            continue
        bx, by = b.centre
        for ci in matched:
            cb = cells[ci].box
            if cb.x <= bx <= cb.x + cb.w and cb.y <= by <= cb.y + cb.h:
                merged.append(bi)
                break
    return matched, extra, false, merged


def finding(
    fields: list[FieldBoxes],
    cfg: FinderConfig = FinderConfig(),
    errors: str | Path | None = None,
    tint: float = 0.0,
    per_session: int = 0,
) -> dict:
    """The finder on ``fields`` against their white-cell boxes, run as one session runs them (the
    red cells measured on the first fields and now and then, :class:`bmc.edge_app.detect.RedCells`,
    the finder's sizes following them), scored one to one (:func:`match_cells`): recall over the
    boxes, precision over the cells found, and the two errors a differential cannot absorb — a
    cell found as two or more (extra detections) and two cells found as one (merged cells), each
    per white-cell box. ``tint`` > 0: each field through :func:`tint_red_cells` first.
    ``per_session`` > 0: the fields run as sessions of that many fields each, every one measuring
    the red cells afresh, as a laboratory that records a session per smear (1: each field alone;
    a session's first fields know the least of the scale)."""
    tp = fn = fp = n_extra = n_merged = found = 0
    misses, false_finds, extras, rows = [], [], [], []
    scale = RedCells()
    used = cfg
    for i, f in enumerate(fields):
        if i == 0 or (per_session and i % per_session == 0):  # a session starts: nothing measured yet
            scale, used = RedCells(), cfg
            # as a session over files does: its first fields' red cells measured before it searches any
            ahead = fields[i : i + per_session] if per_session else fields
            firsts = [read_image(str(g.image)) for g in ahead[: scale.first]]
            if scale.seed([tint_red_cells(x, tint) for x in firsts] if tint else firsts):
                used = scaled(cfg, scale.diameter)
        frame = read_image(str(f.image))
        if tint:
            frame = tint_red_cells(frame, tint)
        if scale.observe(frame):
            used = scaled(cfg, scale.diameter)
        cells = find_cells(frame, used, scale.red_colour)
        matched, extra, false, merged = match_cells(cells, f.boxes)
        found += len(cells)
        tp += len(matched)
        fn += len(f.boxes) - len(matched)
        fp += len(false)
        n_extra += len(extra)
        n_merged += len(merged)
        for kind, items, where in (
            ("false find", false, false_finds),
            ("extra detection", extra, extras),
        ):
            for ci in items:
                b = cells[ci].box
                where.append((frame, b))
                rows.append((f.image.name, kind, b.x, b.y, b.w, b.h))
        hit = set(matched.values())
        for bi, b in enumerate(f.boxes):
            if bi not in hit:
                misses.append((frame, b))
                rows.append((f.image.name, "merged" if bi in merged else "missed", b.x, b.y, b.w, b.h))
    if errors:
        out = Path(errors)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "errors.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "error", "x", "y", "w", "h"])
            w.writerows(rows)
        for name, items in (("misses.png", misses), ("false_finds.png", false_finds), ("extra.png", extras)):
            cv2.imwrite(str(out / name), _grid(items))
    boxes = tp + fn
    return {
        "fields": len(fields),
        "boxes": boxes,
        "found": found,
        "recall": tp / max(boxes, 1),
        "precision": tp / max(found, 1),
        "missed": fn,
        "false_finds": fp,
        "extra_detections": n_extra,
        "extra_per_box": n_extra / max(boxes, 1),
        "merged_cells": n_merged,
        "merged_per_box": n_merged / max(boxes, 1),
        "scale": scale.to_dict(),
        "tint": tint,
        "per_session": per_session,
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
