"""How much of the work the device does alone at a microscope (``bmc bench autonomy``).

For each field's white cell a laboratory asks: did the device count it on its own, and was it
right? The bench runs the real session over the fields of a truth file (``file,label``) and
scores each field's cell (the cell the field is scored on, :func:`bmc.benchmarks.detection.best_cells`):

* **counted unaided** — its flag is empty (counted with no person);
* their **balanced accuracy** — per class, the share right among the cells of that class counted
  unaided, averaged over the classes;
* the share **set aside as unknown** (the unknown-cell check) and as **unsure** (the confidence rule);
* the **differential's accuracy** — of every cell counted unaided into the differential (any call but a
  platelet), the share right: the field's white cell when named rightly; any other crop the device
  counted (a lobe, a red cell, a clump) is a cell the differential should not hold, and so wrong. This
  is the population the calibration statement speaks of, so the statement is checked against it.

With ``k`` > 0, for each seed, a laboratory's day is played first, as ``bmc bench adapt`` does: ``k``
fields of each class reviewed to teach the head, plus the first ``calibration`` cells of the
session's random calibration order (:mod:`bmc.edge_app.calibration`) reviewed whatever the model said
(the field's white cell named with its true class, a platelet call confirmed, any other cell
rejected); then ``bmc edge adapt`` (which calibrates the gates on that random sample), and the
adapted model over every field again. The figures are of the fields nobody reviewed, and the bench
checks the adapted model's stated accuracy: does its 95% interval cover the differential's accuracy
measured on those fields?
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from bmc.benchmarks.adapt import shipped_run, teach_fields
from bmc.edge_app import sessiondb
from bmc.edge_app.classifier import DEFAULT_ORIENTATIONS
from bmc.edge_app.differential import NOT_NUCLEATED

GROW = 0.9  # the confidence a counted cell needs to join the reference in sequence()


def cells_of(db_path: Path) -> dict[str, tuple[str, int, str]]:
    """``{field: (label, cell id, flag)}`` of each field's scored cell."""
    from bmc.benchmarks.detection import best_cells

    db = sessiondb.connect(db_path.parent)
    try:
        flags = {c.id: c.flag for c in sessiondb.cells(db)}
    finally:
        db.close()
    return {f: (label, cid, flags.get(cid, "")) for f, (label, cid, _) in best_cells(db_path).items()}


def in_differential(db_path: Path) -> dict[str, int]:
    """``{field: n}``: how many of the field's cells the session counted unaided into the differential
    (no flag, and a call that is not counted apart, i.e. not a platelet)."""
    db = sessiondb.connect(db_path.parent)
    try:
        found = sessiondb.cells(db)
    finally:
        db.close()
    n: dict[str, int] = {}
    for c in found:
        if not c.flag and c.model_label not in NOT_NUCLEATED:
            n[c.source] = n.get(c.source, 0) + 1
    return n


def score(
    truth: dict[str, str],
    cells: dict[str, tuple[str, int, str]],
    fields: list[str],
    classes,
    listed: dict[str, int] | None = None,
) -> dict:
    """The autonomy figures of ``fields``; with ``listed`` (:func:`in_differential`), the accuracy of
    every cell the differential counted unaided too."""
    counted = [f for f in fields if f in cells and not cells[f][2]]
    unknown = [f for f in fields if f in cells and cells[f][2].startswith("unknown")]
    unsure = [f for f in fields if f in cells and cells[f][2] and not cells[f][2].startswith("unknown")]
    per_class = {}
    for c in classes:
        mine = [f for f in fields if truth[f] == c]
        got = [f for f in counted if truth[f] == c]
        if mine:
            per_class[c] = {
                "fields": len(mine),
                "counted_share": len(got) / len(mine),
                "accuracy_counted": (float(np.mean([cells[f][0] == c for f in got])) if got else None),
            }
    accs = [v["accuracy_counted"] for v in per_class.values() if v["accuracy_counted"] is not None]
    right = sum(cells[f][0] == truth[f] for f in counted)
    out = {
        "fields": len(fields),
        "counted_share": len(counted) / max(len(fields), 1),
        "balanced_accuracy_counted": float(np.mean(accs)) if accs else 0.0,
        "accuracy_counted": right / len(counted) if counted else 0.0,
        "counted": len(counted),
        "right": right,
        "unknown_share": len(unknown) / max(len(fields), 1),
        "unsure_share": len(unsure) / max(len(fields), 1),
        "per_class": per_class,
    }
    if listed is not None:
        in_count = sum(listed.get(f, 0) for f in fields)
        out["differential_cells"] = in_count
        out["differential_right"] = sum(cells[f][0] == truth[f] for f in counted if cells[f][0] not in NOT_NUCLEATED)
        out["differential_accuracy"] = out["differential_right"] / in_count if in_count else 0.0
    return out


#: the gates a laboratory can set, searched by :func:`frontier`
FRONTIER_CONFIDENCES = tuple(round(0.5 + 0.01 * i, 2) for i in range(50))
FRONTIER_MARGINS = (0.0, 0.15)
FRONTIER_TARGETS = (0.90, 0.93, 0.95)


def gate_points(truth: dict[str, str], db_path: Path, clf, fields: list[str], classes) -> list[dict]:
    """Every setting of the gates a laboratory can choose (each unknown-cell level the card is
    calibrated at, and the check off; each confidence rule: top score, margin) applied to the
    recorded session's cells, each scored on ``fields`` as :func:`score` scores a session."""
    from bmc.edge_app.unknown import LEVELS, threshold_at

    db = sessiondb.connect(db_path.parent)
    try:
        found = {c.id: c for c in sessiondb.cells(db)}
        stored = sessiondb.embeddings(db)
    finally:
        db.close()
    cells = cells_of(db_path)
    scored = [f for f in fields if f in cells and cells[f][1] in stored]
    if not scored:
        return []
    ids = [cells[f][1] for f in scored]
    top2 = np.sort(np.stack([np.asarray(found[i].probabilities, np.float64) for i in ids]), axis=1)[:, -2:]
    truth_of = np.array([truth[f] for f in scored])
    right = np.array([cells[f][0] for f in scored]) == truth_of
    dist = clf.unknown.scores(np.stack([stored[i] for i in ids])) if clf.unknown is not None else None
    thresholds: list[tuple[str, float]] = [("off", np.inf)]
    if dist is not None:
        thresholds += [(f"{lv:g}", t) for lv in LEVELS if (t := threshold_at(clf.unknown.calib, lv)) is not None]
    points = []
    for level, t in thresholds:
        known = dist <= t if dist is not None else np.ones(len(scored), bool)
        for margin in FRONTIER_MARGINS:
            for conf in FRONTIER_CONFIDENCES:
                ok = known & (top2[:, 1] >= conf) & (top2[:, 1] - top2[:, 0] >= margin)
                accs = [float(right[ok & (truth_of == c)].mean()) for c in classes if (ok & (truth_of == c)).any()]
                points.append(
                    {
                        "unknown_level": level,
                        "min_confidence": conf,
                        "min_margin": margin,
                        "counted_share": float(ok.sum()) / max(len(fields), 1),
                        "balanced_accuracy_counted": float(np.mean(accs)) if accs else 0.0,
                    }
                )
    return points


def frontier(truth: dict[str, str], db_path: Path, clf, fields: list[str], classes) -> dict:
    """How far the gates alone could take this model here: of :func:`gate_points`, for each target
    balanced accuracy, the setting that counts the most unaided. It is chosen on the scored fields
    themselves, so it is a ceiling on any calibration of the gates, not a figure to be had: where it
    falls short of a target, only a better classifier (or embedding) reaches it."""
    points = gate_points(truth, db_path, clf, fields, classes)
    best = {}
    for target in FRONTIER_TARGETS:
        reach = [p for p in points if p["balanced_accuracy_counted"] >= target]
        best[f"{target:.2f}"] = max(reach, key=lambda p: p["counted_share"]) if reach else None
    return {"fields": len(fields), "settings": len(points), "best_at": best}


def review_day(sess: Path, truth, cells, classes, k: int, seed: int, calibration: int):
    """A simulated laboratory's day of review in the session ``sess``: ``k`` fields per class taught,
    then the first ``calibration`` cells of its random calibration order reviewed whatever the model
    said (the field's white cell named with its true class, a platelet call confirmed, any other cell
    rejected). Returns (taught {field: cell id}, the random sample, the fields reviewed)."""
    from bmc.edge_app import review

    teach = teach_fields(truth, cells, classes, k, seed)
    db = sessiondb.connect(sess)
    try:
        queue = review.calibration_queue(db, sessiondb.cells(db))
    finally:
        db.close()
    field_of = {cid: f for f, (_, cid, _) in cells.items()}
    sample = [c for c in queue if c.id not in teach.values()][:calibration]
    decisions = {cid: truth[f] for f, cid in teach.items()}
    for c in sample:
        f = field_of.get(c.id)
        decisions[c.id] = truth[f] if f else ("platelet" if c.model_label == "platelet" else review.REJECTED)
    with review.Reviewer(sess, "bench") as r:
        for cid in list(teach.values()) + [c.id for c in sample]:
            r.decide(cid, decisions[cid])
    return teach, sample, set(teach) | {field_of[c.id] for c in sample if c.id in field_of}


def run(
    source,
    truth_file,
    k: int = 0,
    seeds=(1, 2, 3),
    calibration: int = 60,
    mode: str = "field",
    model=None,
    orientations: int = DEFAULT_ORIENTATIONS,
    threads: int | None = None,
    workdir=None,
    log=print,
    gates: bool = False,
) -> dict:
    """The shipped model's autonomy over every field and, with ``k``, each seed's after adapting;
    ``gates``: each with :func:`frontier` too (``"frontier"`` beside its figures)."""
    from bmc.benchmarks.adapt import run_session
    from bmc.edge_app import adapt
    from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier

    model = Path(model or DEFAULT_MODEL)
    source = Path(source)
    keep = tempfile.mkdtemp(prefix="bmc-bench-autonomy-", dir=workdir)
    tmp = Path(keep)
    try:
        src, truth, classes, _ = shipped_run(source, truth_file, tmp, model, mode, orientations, threads, log)
        shipped = cells_of(tmp / "shipped" / "session.sqlite")
        shipped_listed = in_differential(tmp / "shipped" / "session.sqlite")
        out = {
            "source": str(source),
            "truth": str(truth_file),
            "mode": mode,
            "model": model.name,
            "orientations": orientations,
            "fields": len(truth),
            "classes": classes,
            "k": k,
            "calibration_cells": calibration if k else 0,
            "shipped": score(truth, shipped, sorted(truth), classes, shipped_listed),
            "runs": [],
        }
        log(_line("shipped, every field", out["shipped"]))
        shipped_clf = CellClassifier(model, orientations=1)
        if gates:
            out["shipped"]["frontier"] = frontier(
                truth, tmp / "shipped" / "session.sqlite", shipped_clf, sorted(truth), classes
            )
        for seed in seeds if k else ():
            sess = tmp / f"seed{seed}"
            shutil.copytree(tmp / "shipped", sess)
            teach, sample, reviewed_fields = review_day(sess, truth, shipped, classes, k, seed, calibration)
            clf = CellClassifier(model, orientations=1)
            # the reference does not grow here: the session holds the very fields scored after
            # (growth is measured over sessions that follow one another: sequence())
            settings = adapt.Settings(grow_confidence=0)
            guard, rev, result = adapt.prepare([sess], clf, settings)
            refused = [] if result.accepted else result.reasons
            # a refused head: the shipped one kept with the laboratory's gates, as `bmc edge adapt` does
            result = adapt.model_to_write(result, rev, guard, clf, settings) or result
            unreviewed = sorted(f for f in truth if f not in reviewed_fields)
            row = {
                "seed": seed,
                "taught": len(teach),
                "calibration_sample": len(sample),
                "accepted": result.accepted,
                "head_refused": refused,
                "reasons": result.reasons,
                "calibration": result.calibration.to_dict() if result.calibration else None,
                "before": score(truth, shipped, unreviewed, classes, shipped_listed),
            }
            if gates:
                db = tmp / "shipped" / "session.sqlite"
                row["before"]["frontier"] = frontier(truth, db, shipped_clf, unreviewed, classes)
            if result.accepted:
                path = adapt.write_model(result, rev, clf, guard, tmp / "models", f"seed{seed}")
                run_session(src, path, tmp / f"after{seed}", mode, orientations, threads)
                db = tmp / f"after{seed}" / "session.sqlite"
                row["after"] = score(truth, cells_of(db), unreviewed, classes, in_differential(db))
                if gates:
                    row["after"]["frontier"] = frontier(
                        truth, db, CellClassifier(path, orientations=1), unreviewed, classes
                    )
            else:
                row["after"] = row["before"]
            cal = result.calibration
            if (
                cal is not None
                and cal.interval is not None
                and result.accepted
                and row["after"].get("differential_cells")
            ):
                lo, hi = cal.interval
                row["interval_covers"] = bool(lo <= row["after"]["differential_accuracy"] <= hi)
            log(_line(f"seed {seed}, after adapt ({len(teach)} taught, {len(sample)} random)", row["after"]))
            out["runs"].append(row)
        if out["runs"]:
            out["mean_after"] = {
                key: float(np.mean([r["after"][key] for r in out["runs"]]))
                for key in ("counted_share", "balanced_accuracy_counted", "unknown_share", "unsure_share")
            }
            covered = [r["interval_covers"] for r in out["runs"] if "interval_covers" in r]
            out["interval_coverage"] = float(np.mean(covered)) if covered else None
        return out
    finally:
        shutil.rmtree(keep, ignore_errors=True)


def link_fields(src: Path, names, dest: Path) -> Path:
    dest.mkdir()
    for n in names:
        (dest / n).symlink_to((src / n).resolve())
    return dest


def sequence(
    source,
    truth_file,
    k: int = 10,
    seeds=(1, 2, 3),
    days: int = 3,
    calibration: int = 60,
    mode: str = "field",
    model=None,
    orientations: int = DEFAULT_ORIENTATIONS,
    threads: int | None = None,
    workdir=None,
    log=print,
) -> dict:
    """Does the laboratory's reference grow usefully from one session to the next?

    For each seed the fields are drawn into a first day (half of them) and ``days`` later days (the
    rest, evenly). On the first day the shipped model runs and the laboratory reviews as in
    :func:`run`; then ``bmc edge adapt``. Each later day runs the latest adapted model over its
    fields, which nobody reviews, and is scored; then ``bmc edge adapt`` runs again over every
    session so far, so that the cells they counted with no person, surely, join the reference
    (:func:`bmc.edge_app.adapt.grown_reference`). Beside it, the first day's model adapted without
    growth (``grow_confidence = 0``) runs over the same later days."""
    from bmc.benchmarks.adapt import link_truth_fields, run_session
    from bmc.edge_app import adapt
    from bmc.edge_app.classifier import DEFAULT_MODEL, CellClassifier

    model = Path(model or DEFAULT_MODEL)
    source = Path(source)
    grow = adapt.Settings(grow_confidence=GROW)
    keep = tempfile.mkdtemp(prefix="bmc-bench-autonomy-days-", dir=workdir)
    tmp = Path(keep)
    try:
        src = tmp / "fields"
        truth, _ = link_truth_fields(source, truth_file, src)
        classes = sorted(set(truth.values()))
        out: dict = {"source": str(source), "model": model.name, "fields": len(truth), "k": k, "days": days, "runs": []}
        for seed in seeds:
            order = [sorted(truth)[i] for i in np.random.default_rng(1000 + seed).permutation(len(truth))]
            first, later = order[: len(order) // 2], order[len(order) // 2 :]
            chunks = [later[d::days] for d in range(days)]
            base = tmp / f"seed{seed}"
            base.mkdir()
            day0 = base / "day0"
            run_session(link_fields(src, first, base / "fields0"), model, day0, mode, orientations, threads)
            cells0 = cells_of(day0 / "session.sqlite")
            teach, sample, _ = review_day(day0, {f: truth[f] for f in first}, cells0, classes, k, seed, calibration)
            clf = CellClassifier(model, orientations=1)
            rows = {"seed": seed, "taught": len(teach), "calibration_sample": len(sample), "grown": [], "fixed": []}
            paths = {}
            head = {}  # what each reference counts with: the adapted head, or the shipped one kept
            for growth, settings in (("fixed", adapt.Settings(grow_confidence=0)), ("grown", grow)):
                guard, rev, result = adapt.prepare([day0], clf, settings)
                if not result.accepted:
                    rows.setdefault("first_day_refused", []).append(growth)
                    log(f"seed {seed}: the first day's head was refused ({'; '.join(result.reasons)})")
                # what `bmc edge adapt` writes: a refused head leaves the shipped one with the laboratory's gates
                written = adapt.model_to_write(result, rev, guard, clf, settings)
                if written is None:
                    break
                paths[growth] = adapt.write_model(written, rev, clf, guard, base / "models", f"{growth}0", settings)
                head[growth] = "shipped head, laboratory's gates" if written.kept_shipped else "adapted"
            if len(paths) < 2:
                out["runs"].append({**rows, "refused": True})
                continue
            sessions = [day0]
            for d, chunk in enumerate(chunks, start=1):
                fields = link_fields(src, chunk, base / f"fields{d}")
                for growth in ("fixed", "grown"):
                    day = base / f"{growth}{d}"
                    run_session(fields, paths[growth], day, mode, orientations, threads)
                    s = score(truth, cells_of(day / "session.sqlite"), sorted(chunk), classes)
                    rows[growth].append({**s, "head": head[growth]})
                    log(_line(f"seed {seed}, day {d}, reference {growth}", s))
                sessions.append(base / f"grown{d}")
                guard, rev, result = adapt.prepare(sessions, clf, grow)
                if result.accepted:
                    paths["grown"] = adapt.write_model(result, rev, clf, guard, base / "models", f"grown{d}", grow)
                    head["grown"] = "adapted"
                    grown_n = 0 if result.grown is None else len(result.grown)
                    rows.setdefault("reference_counted", []).append(grown_n)
                    log(f"seed {seed}: after day {d}, {grown_n} counted cells in the reference")
                else:  # the laboratory goes on counting with the model it has
                    rows.setdefault("later_refused", []).append(d)
                    log(
                        f"seed {seed}: after day {d}, the head was refused ({'; '.join(result.reasons)}): the model kept"
                    )
            out["runs"].append(rows)
        return out
    finally:
        shutil.rmtree(keep, ignore_errors=True)


def sequence_markdown(r: dict) -> str:
    lines = [
        f"`bmc bench autonomy --days {r['days']}`: {r['fields']} fields of `{r['source']}` ({r['model']}), "
        f"first day half the fields with {r['k']} taught per class",
        "",
        "| seed | day | reference | counted unaided | balanced acc. of those | unknown | unsure |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for x in r["runs"]:
        if x.get("refused"):
            lines.append(f"| {x['seed']} | — | first day's head refused, and no random sample to keep gates | | | | |")
            continue
        for d, (fixed, grown) in enumerate(zip(x["fixed"], x["grown"]), start=1):
            for name, s in (("fixed after day 0", fixed), ("grown each day", grown)):
                if s.get("head", "adapted") != "adapted":
                    name += f" ({s['head']})"
                lines.append(
                    f"| {x['seed']} | {d} | {name} | {100 * s['counted_share']:.0f}% | "
                    f"{s['balanced_accuracy_counted']:.3f} | {100 * s['unknown_share']:.0f}% | "
                    f"{100 * s['unsure_share']:.0f}% |"
                )
    return "\n".join(lines)


def _line(what: str, s: dict) -> str:
    return (
        f"{what}: {100 * s['counted_share']:.0f}% of {s['fields']} white cells counted unaided, balanced accuracy "
        f"{s['balanced_accuracy_counted']:.3f} among them; {100 * s['unknown_share']:.0f}% set aside as unknown, "
        f"{100 * s['unsure_share']:.0f}% as unsure"
    )


def markdown(r: dict) -> str:
    lines = [
        f"`bmc bench autonomy`: {r['fields']} fields of `{r['source']}` ({r['model']}, {r['orientations']} "
        f"orientations, mode {r['mode']})",
        "",
        "| model | fields scored | counted unaided | balanced acc. of those | set aside: unknown | unsure | "
        "stated accuracy (95%) | the differential's cells right | covers |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]

    def row(name, s, cal=None, covers=None):
        stated = "—"
        if cal and cal.get("interval"):
            stated = f"{100 * cal['accuracy']:.0f}% ({100 * cal['interval'][0]:.0f}–{100 * cal['interval'][1]:.0f}%)"
        listed = "—"
        if "differential_cells" in s:
            listed = f"{s['differential_right']} / {s['differential_cells']}"
        return (
            f"| {name} | {s['fields']} | {100 * s['counted_share']:.0f}% | {s['balanced_accuracy_counted']:.3f} | "
            f"{100 * s['unknown_share']:.0f}% | {100 * s['unsure_share']:.0f}% | {stated} | {listed} | "
            f"{'—' if covers is None else ('yes' if covers else 'no')} |"
        )

    lines.append(row("shipped", r["shipped"]))
    for x in r["runs"]:
        name = f"seed {x['seed']}: adapted ({x['taught']} taught + {x['calibration_sample']} random)" + (
            (" — head refused, shipped head with the laboratory's gates" if x.get("head_refused") else "")
            if x["accepted"]
            else " — refused"
        )
        lines.append(row(name, x["after"], x["calibration"] if x["accepted"] else None, x.get("interval_covers")))
    if r.get("mean_after"):
        m = r["mean_after"]
        lines += [
            "",
            f"mean after adapting: {100 * m['counted_share']:.0f}% counted unaided at balanced accuracy "
            f"{m['balanced_accuracy_counted']:.3f}; the stated interval covers the measured accuracy on "
            f"{100 * (r['interval_coverage'] or 0):.0f}% of the seeds",
        ]
    ceilings = [("shipped, every field", r["shipped"])] + [
        (f"seed {x['seed']}, {when}", x[when]) for x in r["runs"] for when in ("before", "after")
    ]
    ceilings = [(name, s["frontier"]) for name, s in ceilings if s.get("frontier")]
    if ceilings:
        lines += [
            "",
            "The gates' ceiling (`--gates`): the most counted unaided that any unknown-cell level and "
            "confidence rule reaches at each balanced accuracy, the setting chosen on the scored fields "
            "themselves (no calibration can do better with this classifier):",
            "",
            "| model | " + " | ".join(f"at ≥ {t:.2f}" for t in FRONTIER_TARGETS) + " |",
            "|---|" + "---|" * len(FRONTIER_TARGETS),
        ]
        for name, fr in ceilings:
            cells = []
            for t in FRONTIER_TARGETS:
                p = fr["best_at"][f"{t:.2f}"]
                cells.append(
                    "none"
                    if p is None
                    else f"{100 * p['counted_share']:.0f}% (level {p['unknown_level']}, "
                    f"confidence ≥ {p['min_confidence']:.2f}, margin ≥ {p['min_margin']:.2f})"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    per = r["shipped"]["per_class"]
    lines += [
        "",
        "shipped model, per class: "
        + "; ".join(
            f"{c} {100 * v['counted_share']:.0f}% counted"
            + (f" ({100 * v['accuracy_counted']:.0f}% right)" if v["accuracy_counted"] is not None else "")
            for c, v in per.items()
        ),
    ]
    return "\n".join(lines)
