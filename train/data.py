"""Labelled cell-image data sets: discovery, checks and leak-free splits.

Three layouts are read:

* class folders — ``ROOT/<class>/*.jpg`` (the Barcelona PBC release);
* the Munich bone-marrow (Kaggle) layout — ``ROOT/<CODE>/0001-1000/<CODE>_00001.jpg`` or flat
  ``ROOT/<CODE>/<CODE>_00001.jpg``: the class is the first folder under ROOT, files are found at
  any depth below it;
* a CSV manifest with a path column, a label column and an optional group column (patient,
  slide) — paths relative to the manifest's folder or one of its parents.

Labels come from the folder (default), from the file-name prefix before the first ``_`` (the PBC
maturation stages: PMY, MY, MMY, BNE, SNE, …), from that prefix named as a stage (``stage``:
PMY → promyelocyte, BNE → band, …; images of an unspecified stage are left out) or from a
manifest column.

Splits are stratified, seeded and grouped: byte-identical files always share a group, and so do
images of one patient when the manifest gives a group, so that no group straddles
train/validation/test.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from bmc.errors import BmcError
from bmc.stages import PBC_PREFIX, stage_of_prefix

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SPLITS = ("train", "val", "test")


class DataError(BmcError, ValueError):
    """A data set that cannot be used as asked; the message names the folder or class."""


@dataclasses.dataclass(frozen=True)
class Sample:
    path: str
    label: str
    group: str = ""


LABEL_SOURCES = ("folder", "prefix", "stage")


def _label_of(path: Path, root: Path, label_from: str) -> str | None:
    """The label of one image; None leaves the image out (``stage``: an unspecified stage)."""
    if label_from == "folder":
        return path.relative_to(root).parts[0]
    if label_from == "prefix":
        return path.stem.split("_")[0]
    if label_from == "stage":
        return stage_of_prefix(path.stem)
    raise DataError(f"unknown label source {label_from!r}; use one of {LABEL_SOURCES} or a manifest")


def discover(
    root: str | Path,
    label_from: str = "folder",
    manifest: str | Path | None = None,
    label_column: str = "label",
    group_column: str | None = "group",
) -> list[Sample]:
    """All image files under ``root`` (or listed in ``manifest``) with their labels.

    Files that are not images by suffix are ignored here; unreadable images are found by
    :func:`check` and skipped (and listed) by training.
    """
    if manifest is not None:
        return _from_manifest(Path(manifest), label_column, group_column)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected class folders of cell images)")
    samples = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and len(p.relative_to(root).parts) >= 2:
            if any(part.startswith(".") for part in p.relative_to(root).parts):
                continue
            label = _label_of(p, root, label_from)
            if label is not None:
                samples.append(Sample(str(p), label))
    if not samples and label_from == "stage":
        raise DataError(
            f"{root}: no image has a stage prefix ({', '.join(PBC_PREFIX)}_…); "
            "--label-from stage reads the PBC release's file names"
        )
    if not samples:
        raise DataError(
            f"{root}: no images found. Expected class folders (ROOT/<class>/*.jpg) or the "
            f"bone-marrow layout (ROOT/<CODE>/0001-1000/<CODE>_00001.jpg); suffixes read: "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    return samples


def _from_manifest(manifest: Path, label_column: str, group_column: str | None) -> list[Sample]:
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest not found")
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "path" not in cols or label_column not in cols:
            raise DataError(f"{manifest}: needs columns 'path' and {label_column!r}; has {cols}")
        rows = list(reader)
    bases = [manifest.parent, *manifest.parent.parents]
    samples = []
    for i, row in enumerate(rows, start=2):
        rel = row["path"]
        path = next((b / rel for b in bases if (b / rel).exists()), None)
        if path is None:
            raise DataError(f"{manifest}:{i}: file {rel!r} not found next to the manifest or above it")
        group = row.get(group_column, "") if group_column else ""
        samples.append(Sample(str(path), row[label_column], group or ""))
    if not samples:
        raise DataError(f"{manifest}: manifest lists no images")
    return samples


def sha256_of(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


MIN_SIDE = 32  # pixels: a cell image smaller than this on a side holds no cell the models can read


@dataclasses.dataclass
class DataReport:
    """What ``bmc data check`` finds in a data set."""

    root: str
    counts: dict[str, int]
    sizes: dict[str, int]  # "WxH" -> count
    unreadable: list[tuple[str, str]]
    non_images: list[str]
    duplicate_sets: list[list[str]]
    empty_classes: list[str] = dataclasses.field(default_factory=list)  # class folders with no image
    too_small: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, size) under MIN_SIDE

    @property
    def imbalance(self) -> float:
        vals = [v for v in self.counts.values() if v]
        return max(vals) / min(vals) if vals else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["imbalance"] = self.imbalance
        return d

    def table(self) -> str:
        total = sum(self.counts.values())
        w = max([len("class"), *map(len, self.counts)])
        lines = [f"Data set: {self.root}", "", f"{'class':<{w}}  {'images':>7}  {'share':>6}"]
        for label, n in sorted(self.counts.items()):
            lines.append(f"{label:<{w}}  {n:>7}  {100 * n / max(total, 1):>5.1f}%")
        lines += [f"{'total':<{w}}  {total:>7}", ""]
        lines.append(
            "image sizes: " + ", ".join(f"{s} ({n})" for s, n in sorted(self.sizes.items(), key=lambda kv: -kv[1])[:6])
        )
        lines.append(
            f"class imbalance (largest/smallest): {self.imbalance:.1f}x"
            + ("  — consider class weights (bmc train uses them by default)" if self.imbalance > 3 else "")
        )
        lines.append(
            f"byte-identical duplicate sets: {len(self.duplicate_sets)}"
            + (" (kept together in one split)" if self.duplicate_sets else "")
        )
        for group in self.duplicate_sets[:10]:
            lines.append("  " + " = ".join(group))
        if self.empty_classes:
            lines.append(
                f"empty class folders (no image; not a class until it has some): {', '.join(self.empty_classes)}"
            )
        if self.too_small:
            lines.append(f"images too small to hold a cell (under {MIN_SIDE} px a side): {len(self.too_small)}")
            for path, size in self.too_small[:20]:
                lines.append(f"  {path}: {size}")
        lines.append(f"unreadable images: {len(self.unreadable)}")
        for path, why in self.unreadable[:20]:
            lines.append(f"  {path}: {why}")
        if self.non_images:
            lines.append(f"non-image files ignored: {len(self.non_images)}")
            for path in self.non_images[:10]:
                lines.append(f"  {path}")
        return "\n".join(lines)


def check(
    root: str | Path,
    label_from: str = "folder",
    manifest: str | Path | None = None,
    label_column: str = "label",
    group_column: str | None = "group",
) -> DataReport:
    """Decode every image and report counts, sizes, unreadable files and duplicates."""
    import cv2
    import numpy as np

    samples = discover(root, label_from, manifest, label_column, group_column)
    counts: Counter = Counter()
    sizes: Counter = Counter()
    unreadable = []
    too_small: list[tuple[str, str]] = []
    by_hash = defaultdict(list)
    for s in samples:
        data = Path(s.path).read_bytes()
        by_hash[hashlib.sha256(data).hexdigest()].append(s.path)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if img is None:
            unreadable.append((s.path, "cannot be decoded (empty, truncated or not an image)"))
            continue
        counts[s.label] += 1
        sizes[f"{img.shape[1]}x{img.shape[0]}"] += 1
        if min(img.shape[:2]) < MIN_SIDE:
            too_small.append((s.path, f"{img.shape[1]}x{img.shape[0]}"))
    non_images = []
    if manifest is None:
        rootp = Path(root)
        non_images = [
            str(p)
            for p in sorted(rootp.rglob("*"))
            if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES and len(p.relative_to(rootp).parts) >= 2
        ]
    dups = [sorted(v) for v in by_hash.values() if len(v) > 1]
    empty = []
    if manifest is None and label_from == "folder":
        empty = sorted(
            d.name
            for d in Path(root).iterdir()
            if d.is_dir()
            and not d.name.startswith(".")
            and not any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.rglob("*") if f.is_file())
        )
    return DataReport(str(root), dict(counts), dict(sizes), unreadable, non_images, sorted(dups), empty, too_small)


def assign_groups(samples: Iterable[Sample]) -> list[Sample]:
    """Give every sample a group: its manifest group, else its content hash (so copies share)."""
    out = []
    for s in samples:
        out.append(s if s.group else dataclasses.replace(s, group="sha256:" + sha256_of(s.path)))
    return out


def split(
    samples: list[Sample], fractions=(0.7, 0.15, 0.15), seed: int = 1337, min_per_class: int = 3
) -> dict[str, list[Sample]]:
    """Stratified, grouped, deterministic train/val/test split.

    Groups are shuffled per class with ``seed`` and dealt so that each class gets its share of
    every split; a group (duplicates, one patient) never straddles splits. A class with fewer
    groups than ``min_per_class`` cannot be split and is an error that names it.
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions must add up to 1, got {fractions}")
    samples = assign_groups(samples)
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group].append(s)
    by_class: dict[str, list[str]] = defaultdict(list)
    for g, members in groups.items():
        label = Counter(m.label for m in members).most_common(1)[0][0]
        by_class[label].append(g)
    too_small = {c: len(gs) for c, gs in by_class.items() if len(gs) < min_per_class}
    if too_small:
        raise DataError(
            "class(es) too small to split into train/val/test: "
            + ", ".join(f"{c} ({n} image groups)" for c, n in sorted(too_small.items()))
            + f"; need at least {min_per_class} each — add images or leave the class out"
        )
    rng = random.Random(seed)
    out: dict[str, list[Sample]] = {k: [] for k in SPLITS}
    for label in sorted(by_class):
        gs = sorted(by_class[label])
        rng.shuffle(gs)
        n = len(gs)
        n_val = max(1, round(n * fractions[1]))
        n_test = max(1, round(n * fractions[2]))
        n_train = n - n_val - n_test
        parts = {"train": gs[:n_train], "val": gs[n_train : n_train + n_val], "test": gs[n_train + n_val :]}
        for k, part in parts.items():
            for g in part:
                out[k].extend(groups[g])
    for k in SPLITS:
        out[k].sort(key=lambda s: s.path)
    return out


def relabel(parts: dict[str, list[Sample]], label_from: str) -> tuple[dict[str, list[Sample]], int]:
    """An earlier split's assignment with labels read afresh from the file names (``prefix`` or
    ``stage``): a finer model trained on the same partition never tests on a cell the coarser one
    trained on, and the two compare on the same test images. Images without such a label are left
    out; returns ``(parts, number left out)``."""
    if label_from not in ("prefix", "stage"):
        raise DataError(f"a split is relabelled from file names: --label-from prefix or stage, not {label_from!r}")
    out, dropped = {}, 0
    for part, samples in parts.items():
        out[part] = []
        for s in samples:
            label = _label_of(Path(s.path), Path(s.path).parent, label_from)
            if label is None:
                dropped += 1
            else:
                out[part].append(dataclasses.replace(s, label=label))
    if not any(out.values()):
        raise DataError(f"no image of the split has a {label_from} label in its file name")
    return out, dropped


def save_split(split_: dict[str, list[Sample]], path: str | Path) -> None:
    rows = {k: [dataclasses.asdict(s) for s in v] for k, v in split_.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=1))


def load_split(path: str | Path) -> dict[str, list[Sample]]:
    """A saved split. A relative path is read from the split file's folder where the file is there
    (a packed data set), else from the working folder (a run trained on ``../shared/data/pbc``)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such split file (bmc data split writes one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a split file (JSON of train/val/test image lists: bmc data split): {e}") from None

    def resolve(p: str) -> str:
        beside = path.parent / p
        return str(beside) if not Path(p).is_absolute() and beside.exists() else p

    try:
        return {k: [Sample(**{**r, "path": resolve(r["path"])}) for r in v] for k, v in rows.items()}
    except (AttributeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a split file (each part a list of path,label,group rows): {e!r}") from None


def pack(
    source: str | Path, dest: str | Path, side: int = 256, quality: int = 70, label_from: str = "folder"
) -> tuple[int, list[tuple[str, str]]]:
    """A compact copy of a data set, to carry to a GPU server over a thin link.

    ``source`` is a data folder or a ``split.json``. Each image is shrunk to ``side`` pixels on its
    shorter side (never enlarged) and stored as WebP at ``quality`` in ``dest/<label>/``, so that
    the copy is a class-folder data set; from a split, ``dest/split.json`` lists the same split with
    paths relative to ``dest`` (``bmc train DEST --split DEST/split.json`` trains on the same
    partition). PBC's 10k images take about 38 MB at the defaults instead of 180 MB. Returns the
    number of images written and the unreadable ones, ``(path, why)``; those are left out.
    """
    import cv2

    from bmc.contract import read_image

    source, dest = Path(source), Path(dest)
    if source.is_file():
        parts = load_split(source)
    else:
        parts = {"all": discover(source, label_from)}
    names: dict[str, str] = {}  # source path -> path in dest
    used: set[str] = set()
    skipped: list[tuple[str, str]] = []
    out: dict[str, list[Sample]] = {}
    for part, samples in parts.items():
        out[part] = []
        for s in samples:
            if s.path not in names:
                try:
                    img = read_image(s.path)
                except ValueError as e:
                    skipped.append((s.path, str(e)))
                    continue
                h, w = img.shape[:2]
                if min(h, w) > side:
                    f = side / min(h, w)
                    img = cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
                rel, n = Path(s.label) / f"{Path(s.path).stem}.webp", 1
                while str(rel) in used:  # the same file name in two source folders
                    rel, n = Path(s.label) / f"{Path(s.path).stem}-{n}.webp", n + 1
                (dest / rel.parent).mkdir(parents=True, exist_ok=True)
                if not cv2.imwrite(str(dest / rel), img, [cv2.IMWRITE_WEBP_QUALITY, quality]):
                    raise DataError(f"{dest / rel}: could not write (disk full or read-only?)")
                names[s.path] = str(rel)
                used.add(str(rel))
            out[part].append(dataclasses.replace(s, path=names[s.path]))
    if "all" not in out:
        save_split(out, dest / "split.json")
    return len(names), skipped
