"""Adaptation to another microscope, scored the way a laboratory lives it (``bmc bench adapt``).

For each seed:

1. run the shipped model over every field of ``--source`` (the real edge session: finder, scale,
   crops, classifier, database);
2. for ``k`` fields of each class, take the cell the field is scored on (field mode: its most
   confident white cell; cell mode: the frame's one cell) and record its true class as a person's
   review decision (``bmc edge review``'s audited rows, reviewer ``bench``);
3. ``bmc edge adapt`` on that session (:mod:`bmc.edge_app.adapt`: cross-validated, refused when not
   better; a refusal keeps the shipped model and is reported);
4. run the adapted model over every field again;
5. score the fields that were **not** labelled, before and after: balanced accuracy and recall of
   each class.

``--truth`` is a CSV with columns ``file,label``: a field (or cell image) path relative to
``--source`` and its class among the model's labels. ``bmc bench truth`` writes one for BCCD (the
fields with one WBC box and one white-cell type: 339) and for the Munich cells.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bmc.edge_app.classifier import DEFAULT_ORIENTATIONS
from bmc.errors import BmcError


class TruthError(BmcError, ValueError):
    pass


def read_truth(path: str | Path, source: str | Path) -> dict[str, str]:
    """``{relative file: class}`` from a ``file,label`` CSV, every file checked to exist under ``source``."""
    path, source = Path(path), Path(source)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as e:
        raise TruthError(f"{path}: cannot read the truth file ({e})") from e
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise TruthError(f"{path}: needs columns 'file' and 'label'")
    truth = {}
    for line, r in enumerate(rows, start=2):
        if not (source / r["file"]).is_file():
            raise TruthError(f"{path}:{line}: {source / r['file']} does not exist")
        truth[r["file"]] = r["label"].strip()
    return truth


def write_truth_bccd(bccd: str | Path, out: str | Path) -> int:
    """The BCCD fields with exactly one WBC box and one of the four white-cell types."""
    from bmc.benchmarks.bccd import single_cell_fields

    fields = single_cell_fields(bccd)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label"])
        w.writerows([f"JPEGImages/{f.image.name}", f.labels[0]] for f in fields)
    return len(fields)


def write_truth_matek(matek: str | Path, out: str | Path) -> int:
    """The Munich bone-marrow cells whose code the 8 PBC classes name (``MATEK_TO_LABEL``)."""
    from bmc.benchmarks.generalisation import MATEK_TO_LABEL

    root = Path(matek)
    rows = [
        (str(p.relative_to(root)), MATEK_TO_LABEL[p.relative_to(root).parts[0]])
        for p in sorted(root.rglob("*.jpg"))
        if p.relative_to(root).parts[0] in MATEK_TO_LABEL
    ]
    if not rows:
        raise TruthError(
            f"{root}: no Munich cells (class folders {', '.join(sorted(MATEK_TO_LABEL)[:4])}, … of .jpg files): "
            "is this the Munich data set (--format matek)?"
        )
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label"])
        w.writerows(rows)
    return len(rows)


def write_truth_split(data: str | Path, split: str | Path, out: str | Path) -> int:
    """A model's held-out cells (its ``*_test_split.csv``: ``path,label``, paths under ``data``)."""
    with open(split, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise TruthError(f"{split}: needs columns 'path' and 'label' (a model's held-out split)")
    for line, r in enumerate(rows, start=2):
        if not (Path(data) / r["path"]).is_file():
            raise TruthError(f"{split}:{line}: {Path(data) / r['path']} does not exist")
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label"])
        w.writerows([r["path"], r["label"]] for r in rows)
    return len(rows)


def field_answers(db_path: Path) -> dict[str, tuple[str, int]]:
    """``{field: (label, cell id)}``: each field's answer (:func:`bmc.benchmarks.detection.best_cells`)."""
    from bmc.benchmarks.detection import best_cells

    return {s: (label, cid) for s, (label, cid, _) in best_cells(db_path).items()}


def _score(truth: dict[str, str], answers: dict[str, tuple[str, int]], fields: list[str], classes) -> dict:
    recall = {}
    for c in classes:
        mine = [f for f in fields if truth[f] == c]
        if mine:
            recall[c] = float(np.mean([answers.get(f, ("none", 0))[0] == c for f in mine]))
    acc = float(np.mean([answers.get(f, ("none", 0))[0] == truth[f] for f in fields])) if fields else 0.0
    return {
        "balanced_accuracy": float(np.mean(list(recall.values()))) if recall else 0.0,
        "accuracy": acc,
        "recall": recall,
        "fields": len(fields),
    }


def teach_fields(truth: dict[str, str], answers: dict, classes, k: int, seed: int) -> dict[str, int]:
    """``{field: cell id}``: ``k`` fields of each class drawn with ``seed`` among those the session
    answered (``answers``: field → (label, cell id, …)), the cells a simulated laboratory reviews."""
    rng = np.random.default_rng(seed)
    picked: dict[str, int] = {}
    for c in classes:
        cands = sorted(f for f in truth if truth[f] == c and f in answers)
        for i in sorted(rng.choice(len(cands), min(k, len(cands)), replace=False)):
            picked[cands[i]] = answers[cands[i]][1]
    return picked


#: every benchmark session's recorded start: it seeds the session's random calibration order, so the
#: same command draws the same random sample on every run (the figures can be rerun)
BENCH_START = "2026-01-01T00:00:00.000+00:00"


def run_session(src: Path, model, out: Path, mode: str, orientations: int, threads: int | None):
    from bmc.edge_app.classifier import CellClassifier
    from bmc.edge_app.session import EdgeSession, SessionConfig

    clf = CellClassifier(model, threads=threads or os.cpu_count(), orientations=orientations)
    config = SessionConfig(mode=mode, save_crops=False, started=BENCH_START)
    EdgeSession(str(src), clf, out, config, echo=lambda m: None).run()
    return field_answers(out / "session.sqlite")


def link_truth_fields(source: Path, truth_file, dest: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The fields of a truth file linked into the one flat folder ``dest`` (``a/b.jpg`` as
    ``a__b.jpg``, so names stay unique): ({flat name: class}, {flat name: path in the truth file})."""
    truth_rel = read_truth(truth_file, source)
    dest.mkdir()
    rel_of = {rel.replace("/", "__"): rel for rel in truth_rel}
    for flat, rel in rel_of.items():
        (dest / flat).symlink_to((Path(source) / rel).resolve())
    return {flat: truth_rel[rel] for flat, rel in rel_of.items()}, rel_of


def shipped_run(
    source: Path, truth_file, tmp: Path, model: Path, mode: str, orientations: int, threads: int | None, log
):
    """(fields folder, {field: class}, classes, shipped answers): the scored fields linked into one
    flat folder under ``tmp`` (names kept unique) and the shipped model's session over them."""
    src = tmp / "fields"
    truth, _ = link_truth_fields(source, truth_file, src)
    classes = sorted(set(truth.values()))
    log(
        f"{len(truth)} fields of {len(classes)} classes ({', '.join(f'{c} {n}' for c, n in sorted(Counter(truth.values()).items()))})"
    )
    t0 = time.perf_counter()
    before = run_session(src, model, tmp / "shipped", mode, orientations, threads)
    log(f"shipped model over every field: {time.perf_counter() - t0:.0f} s")
    return src, truth, classes, before


def ceiling(
    source,
    truth_file,
    mode: str = "field",
    model=None,
    orientations: int = DEFAULT_ORIENTATIONS,
    threads: int | None = None,
    workdir=None,
    log=print,
) -> dict:
    """How far a refit head can go on this microscope: every field's scored cell labelled, and
    ``bmc edge adapt``'s own cross-validation (grouped by field, 5 folds, 3 fold assignments) of
    the shipped and the adapted head on cells they were not fitted on. The protocol's K labelled
    fields per class cannot do better than this, short of a better embedding."""
    from bmc.edge_app import adapt
    from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier
    from bmc.edge_app.review import Reviewer

    model = Path(model or DEFAULT_MODEL)
    with tempfile.TemporaryDirectory(prefix="bmc-bench-adapt-", dir=workdir) as keep:
        tmp = Path(keep)
        _, truth, classes, before = shipped_run(Path(source), truth_file, tmp, model, mode, orientations, threads, log)
        with Reviewer(tmp / "shipped", "bench") as r:
            for f, (_, cid) in before.items():
                r.decide(cid, truth[f])
        _, _, result = adapt.prepare([tmp / "shipped"], CellClassifier(model, orientations=1))
        cv = result.cross_validation
        log(result.table())
        return {
            "source": str(source),
            "truth": str(truth_file),
            "mode": mode,
            "model": model.name,
            "orientations": orientations,
            "fields": len(truth),
            "labelled": cv["cells"],
            "classes": classes,
            "shipped": cv["shipped"],
            "adapted": cv["adapted"],
            "guard": result.guard,
            "adapt_seconds": result.seconds,
        }


def run(
    source,
    truth_file,
    k: int = 10,
    seeds=(1, 2, 3),
    mode: str = "field",
    model=None,
    orientations: int = DEFAULT_ORIENTATIONS,
    threads: int | None = None,
    workdir=None,
    log=print,
) -> dict:
    from bmc.edge_app import adapt
    from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier
    from bmc.edge_app.review import Reviewer

    model = Path(model or DEFAULT_MODEL)
    source = Path(source)
    keep = tempfile.mkdtemp(prefix="bmc-bench-adapt-", dir=workdir)
    tmp = Path(keep)
    try:
        src, truth, classes, before = shipped_run(source, truth_file, tmp, model, mode, orientations, threads, log)
        runs = []
        for seed in seeds:
            picked = teach_fields(truth, before, classes, k, seed)
            sess = tmp / f"seed{seed}"
            shutil.copytree(tmp / "shipped", sess)
            with Reviewer(sess, "bench") as r:
                for f, cid in picked.items():
                    r.decide(cid, truth[f])
            clf = CellClassifier(model, orientations=1)
            t1 = time.perf_counter()
            guard, reviewed, result = adapt.prepare([sess], clf)
            adapt_s = time.perf_counter() - t1
            unlabelled = sorted(f for f in truth if f not in picked)
            row = {
                "seed": seed,
                "labelled": len(picked),
                "labelled_per_class": dict(Counter(truth[f] for f in picked)),
                "adapt_seconds": adapt_s,
                "accepted": result.accepted,
                "reasons": result.reasons,
                "cross_validation": result.cross_validation,
                "guard": result.guard,
                "before": _score(truth, before, unlabelled, classes),
            }
            if result.accepted:
                path = adapt.write_model(result, reviewed, clf, guard, tmp / "models", f"seed{seed}")
                after = run_session(src, path, tmp / f"after{seed}", mode, orientations, threads)
                row["after"] = _score(truth, after, unlabelled, classes)
            else:
                row["after"] = row["before"]  # refused: the laboratory keeps counting with the shipped model
            log(
                f"seed {seed}: {len(picked)} fields labelled, adapt {adapt_s:.1f} s"
                + ("" if result.accepted else " (refused: " + "; ".join(result.reasons) + ")")
                + f"; unlabelled fields balanced accuracy {row['before']['balanced_accuracy']:.3f} → "
                f"{row['after']['balanced_accuracy']:.3f}"
            )
            runs.append(row)
        return {
            "source": str(source),
            "truth": str(truth_file),
            "k": k,
            "mode": mode,
            "model": model.name,
            "orientations": orientations,
            "fields": len(truth),
            "classes": classes,
            "runs": runs,
            "min_after": min(r["after"]["balanced_accuracy"] for r in runs),
            "mean_after": float(np.mean([r["after"]["balanced_accuracy"] for r in runs])),
            "mean_before": float(np.mean([r["before"]["balanced_accuracy"] for r in runs])),
        }
    finally:
        shutil.rmtree(keep, ignore_errors=True)


def markdown(res: dict) -> str:
    classes = res["classes"]
    lines = [
        f"`bmc bench adapt`: {res['fields']} fields of `{res['source']}`, k = {res['k']} labelled per class, "
        f"mode {res['mode']}, {res['model']}, {res['orientations']} orientations",
        "",
        "| seed | labelled | adapt s | accepted | balanced acc. before | after | "
        + " | ".join(f"{c} before → after" for c in classes)
        + " |",
        "|---:|---:|---:|---|---:|---:|" + "---|" * len(classes),
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['seed']} | {r['labelled']} | {r['adapt_seconds']:.1f} | {'yes' if r['accepted'] else 'no'} | "
            f"{r['before']['balanced_accuracy']:.3f} | **{r['after']['balanced_accuracy']:.3f}** | "
            + " | ".join(
                f"{r['before']['recall'].get(c, float('nan')):.2f} → {r['after']['recall'].get(c, float('nan')):.2f}"
                for c in classes
            )
            + " |"
        )
    lines += [
        "",
        f"mean balanced accuracy on the unlabelled fields: {res['mean_before']:.3f} → {res['mean_after']:.3f} "
        f"(lowest seed {res['min_after']:.3f})",
    ]
    return "\n".join(lines)
