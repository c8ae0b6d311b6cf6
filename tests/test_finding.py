"""``bmc bench finding``: the cell finder against white-cell boxes in VOC, CSV and YOLO form, on
the real BCCD and Aslan fields."""

from __future__ import annotations

import csv

import cv2

from benchmarks import finding
from benchmarks.bccd import read_voc_boxes

from conftest import bmc


def test_the_three_formats_give_the_same_figures_for_the_same_boxes(bccd, tmp_path):
    src = tmp_path / "fields"
    src.mkdir()
    yolo = tmp_path / "yolo"
    yolo.mkdir()
    rows = [["image", "xmin", "ymin", "xmax", "ymax", "label"]]
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:40]:
        (src / f.name).symlink_to(f)
        h, w = cv2.imread(str(f)).shape[:2]
        lines = []
        for b in read_voc_boxes(bccd / "Annotations" / f"{f.stem}.xml"):
            lines.append(f"0 {(b.x + b.w / 2) / w:.6f} {(b.y + b.h / 2) / h:.6f} {b.w / w:.6f} {b.h / h:.6f}")
            rows.append([f.name, b.x, b.y, b.x + b.w, b.y + b.h, "WBC"])
        (yolo / f"{f.stem}.txt").write_text("\n".join(lines) + "\n")
    with open(tmp_path / "boxes.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    voc = finding.finding(finding.read_boxes(src, bccd / "Annotations", "voc", "WBC"))
    as_csv = finding.finding(finding.read_boxes(src, tmp_path / "boxes.csv", "csv", "WBC"))
    as_yolo = finding.finding(finding.read_boxes(src, yolo, "yolo", "0"))
    assert voc["boxes"] >= 40 and voc == as_csv == as_yolo


def test_aslan_fractions_and_the_errors_for_a_look(tmp_path):
    from conftest import DATA

    aslan = DATA / "aslan"
    out = tmp_path / "errors"
    p = bmc("bench", "finding", "--source", aslan / "images", "--boxes", aslan / "annotations.csv", "--format", "csv",
            "--label", "wbc", "--errors", out)
    assert "cell finding on 100 fields" in p.stdout and "103 boxes" in p.stdout
    errors = list(csv.DictReader(open(out / "errors.csv")))
    missed = int(p.stdout.split(" missed")[0].rsplit(" ", 1)[1])
    assert sum(r["error"] == "missed" for r in errors) == missed
    for name in ("misses.png", "false_finds.png"):
        assert cv2.imread(str(out / name)) is not None


def test_boxes_that_do_not_fit_are_a_clear_error(bccd, tmp_path):
    (tmp_path / "b.csv").write_text("image,x,y\nBloodImage_00000.jpg,1,2\n")
    p = bmc("bench", "finding", "--source", bccd / "JPEGImages", "--boxes", tmp_path / "b.csv", "--format", "csv",
            check=False)
    assert p.returncode == 2 and "needs columns" in p.stderr
    (tmp_path / "c.csv").write_text("image,xmin,ymin,xmax,ymax,label\nnot_here.jpg,1,2,30,40,WBC\n")
    p = bmc("bench", "finding", "--source", bccd / "JPEGImages", "--boxes", tmp_path / "c.csv", "--format", "csv",
            check=False)
    assert p.returncode == 2 and "c.csv:2: image 'not_here.jpg' is not in" in p.stderr
