import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest

from bmc.train.data import DataError, check, discover, load_split, save_split, split


def test_pbc_class_folders(pbc):
    samples = discover(pbc)
    counts = Counter(s.label for s in samples)
    assert sum(counts.values()) == 10007
    assert counts["neutrophil"] == 1949 and counts["basophil"] == 713 and len(counts) == 8


def test_labels_from_file_name_prefix_give_maturation_stages(pbc):
    counts = Counter(s.label for s in discover(pbc / ".." / "pbc", label_from="prefix") if "/ig/" in s.path)
    assert counts == {"PMY": 346, "MY": 666, "MMY": 594, "IG": 88}


def test_munich_layout_flat_and_numbered_subfolders(matek, tmp_path):
    flat = Counter(s.label for s in discover(matek))
    assert flat["ART"] == 100 and flat["BLA"] == 7 and sum(flat.values()) == 143
    nested = tmp_path / "bm"
    for f in sorted(matek.glob("*/*.jpg")):
        code = f.parent.name
        d = nested / code / "0001-1000"
        d.mkdir(parents=True, exist_ok=True)
        (d / f.name).symlink_to(f)
    assert Counter(s.label for s in discover(nested)) == flat


def test_manifest_with_groups(pbc, tmp_path):
    rows = list(csv.DictReader(open(pbc / "manifest.csv")))[:60]
    man = tmp_path / "m.csv"
    with open(man, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group"])
        for i, r in enumerate(rows):
            w.writerow([str(pbc.parent / r["path"]), r["fine_label"], f"patient{i % 6}"])
    samples = discover(None, manifest=man)
    assert len(samples) == 60 and {s.group for s in samples} == {f"patient{i}" for i in range(6)}


def test_split_is_stratified_deterministic_and_keeps_duplicates_together(pbc):
    samples = discover(pbc)
    a = split(samples, seed=7)
    b = split(samples, seed=7)
    assert a == b
    assert {s.path for s in a["test"]} != {s.path for s in split(samples, seed=8)["test"]}
    for part, frac in zip(("train", "val", "test"), (0.7, 0.15, 0.15)):
        counts = Counter(s.label for s in a[part])
        for label, n in Counter(s.label for s in samples).items():
            assert abs(counts[label] / n - frac) < 0.02, (part, label)
    where = {s.path: part for part, items in a.items() for s in items}
    assert len(where) == len(samples)
    # byte-identical images listed in the manifest never straddle splits
    by_hash = {}
    for r in csv.DictReader(open(pbc / "manifest.csv")):
        by_hash.setdefault(r["sha256"], []).append(str(pbc.parent / r["path"]))
    dups = [v for v in by_hash.values() if len(v) > 1]
    assert dups, "the PBC release is known to contain duplicates"
    for group in dups:
        assert len({where[p] for p in group}) == 1, group


def test_split_round_trips(tmp_path, matek):
    s = split([x for x in discover(matek) if x.label in ("ART", "BLA", "NGB")], seed=1)
    save_split(s, tmp_path / "split.json")
    assert load_split(tmp_path / "split.json") == s


def test_class_too_small_is_named(matek):
    with pytest.raises(DataError, match=r"MON \(2 image groups\)"):
        split(discover(matek))


def test_empty_folder_says_what_was_expected(tmp_path):
    (tmp_path / "blasts").mkdir()
    with pytest.raises(DataError, match="no images found.*class folders"):
        discover(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        discover(tmp_path / "missing")


def test_check_lists_unreadable_non_images_and_duplicates(pbc, tmp_path):
    for cls in ("lymphocyte", "monocyte"):
        (tmp_path / cls).mkdir()
        for f in sorted((pbc / cls).glob("*.jpg"))[:5]:
            shutil.copy(f, tmp_path / cls / f.name)
    first = sorted((tmp_path / "lymphocyte").glob("*.jpg"))[0]
    shutil.copy(first, tmp_path / "lymphocyte" / "copy_of_first.jpg")
    (tmp_path / "monocyte" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "monocyte" / "notes.txt").write_text("stain batch 4")
    r = check(tmp_path)
    assert r.counts == {"lymphocyte": 6, "monocyte": 5}
    assert [p for p, _ in r.unreadable] == [str(tmp_path / "monocyte" / "broken.jpg")]
    assert r.non_images == [str(tmp_path / "monocyte" / "notes.txt")]
    assert len(r.duplicate_sets) == 1 and len(r.duplicate_sets[0]) == 2
    table = r.table()
    assert "lymphocyte" in table and "broken.jpg" in table and "360x363" in table


def test_pack_shrinks_a_folder_into_webp_class_folders(pbc, tmp_path):
    import cv2

    from conftest import CLASSES, bmc, small_class_folders

    src = small_class_folders(pbc, tmp_path / "src", 3, CLASSES)
    (src / "lymphocyte" / "LY_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF truncated")
    p = bmc("data", "pack", src, tmp_path / "packed", "--side", "128")
    assert "12 images packed" in p.stdout and "LY_corrupt.jpg" in p.stderr  # listed, left out
    packed = discover(tmp_path / "packed")
    assert Counter(s.label for s in packed) == {c: 3 for c in CLASSES}
    for s in packed:
        assert s.path.endswith(".webp") and min(cv2.imread(s.path).shape[:2]) == 128


def test_data_split_cli_is_the_split_that_training_makes(matek, tmp_path):
    from conftest import bmc

    samples = [s for s in discover(matek) if s.label in ("ART", "BLA", "EOS", "LYT")]
    src = tmp_path / "bm"
    for s in samples:
        (src / s.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, src / s.label)
    p = bmc("data", "split", src, "--out", tmp_path / "split.json", "--seed", "4")
    assert "4 classes" in p.stdout
    made, expected = load_split(tmp_path / "split.json"), split(discover(src), seed=4)
    assert {k: [s.path for s in v] for k, v in made.items()} == {k: [s.path for s in v] for k, v in expected.items()}


def test_pack_from_a_split_keeps_the_partition(matek, tmp_path):
    from bmc.train.data import pack

    samples = [s for s in discover(matek) if s.label in ("ART", "BLA", "EOS", "LYT")]
    parts = split(samples, seed=3)
    save_split(parts, tmp_path / "split.json")
    n, skipped = pack(tmp_path / "split.json", tmp_path / "packed", side=64)
    assert n == len(samples) and not skipped
    (tmp_path / "packed").rename(tmp_path / "moved")  # the packed copy travels as one folder
    again = load_split(tmp_path / "moved" / "split.json")
    for k in ("train", "val", "test"):
        assert [(s.label, s.group) for s in again[k]] == [(s.label, s.group) for s in parts[k]]
        assert all(s.path.startswith(str(tmp_path / "moved")) and Path(s.path).is_file() for s in again[k])
